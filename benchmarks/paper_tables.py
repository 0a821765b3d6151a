"""Rerun the SlimGPT paper's experiments on slimgpt's built-in models: the tiny reference models and SmolLM2-135M.

    python benchmarks/paper_tables.py                          # all tables, tiny-mha and tiny-gqa (fast)
    python benchmarks/paper_tables.py --tables 5,6 --models tiny-mha
    python benchmarks/paper_tables.py --models smollm2-135m --ratios 0.2,0.5,0.33 --peer-ratios 0.2,0.5,0.33
    python benchmarks/paper_tables.py --quick --out /tmp/check  # a few windows / items: checks the plumbing

Writes ``<stem>.md`` (tables, the paper's claims marked HELD / NOT HELD, figures) and ``<stem>.json``
(every row) into ``--out``. The stem is ``paper_tables`` for the tiny models and
``paper_tables_<model>`` when any model is measured on English (``paper_tables_smollm2-135m``);
``--quick`` adds ``_quick``, so a check never overwrites real results. Every finished row is saved at
once, so an interrupted run resumes where it stopped; a rerun skips finished rows (same model weights,
same evaluation settings) unless ``--force``.

Protocols (``paper_plan.py``): the tiny models (trained on Python) are calibrated on the built-in code
corpus and measured on its held-out split and the code tasks (``benchmarks/tasks.py``); SmolLM2-135M
(``--protocol auto`` picks it by name) on the shipped English corpus (``slimgpt.data.english``: its
calibration chapters for calibration, its eval chapters for perplexity) and the English tasks
(``benchmarks/english_tasks.py``).

What is run (the paper's numbering), in this order:

- Table 1: every registered pruning method (``slimgpt.config.METHODS``; methods added later join by
  themselves, an unavailable one is skipped with a note) and SlimGPT with ``--schedule auto`` ("SlimGPT
  auto"), at 20% and 50% of decoder parameters first, then the other ratios: the paper's methods at
  ``--ratios``, the peers at ``--peer-ratios``. Columns: parameters, held-out perplexity on 128-token
  windows (the paper's protocol) and on long windows (the model's context, capped at 512 tokens for
  SmolLM2, whose context is 8192), zero-shot accuracy, pruning time and the pruning run's peak memory
  above the loaded model (``paper_bench.PeakRss``).
- Table 6: the five layer-ratio schedules at 50%.
- Table 5: SlimGPT against -GCD (``head_score="diag"``), -DGS (``group_schedule="fixed"``) and no
  compensation, at 20% and 50%.
- Table 14: calibration source, the evaluation's own domain against the other one: code against English
  prose from the same training files' docstrings for the tiny models, English against code for SmolLM2
  (a stand-in for the paper's C4 vs Alpaca).
- Figure 3: 50% pruning with 1/8, 1/4, 1/2 and all of the calibration windows, and with 1/8 .. 1 of
  the tokens per window.
- gqa: on GQA models, whole-KV-group against query-head removal at 20% and 50%: the measurement
  behind slimgpt's default ``gqa_policy``.
Tables 5, 6, 14 and Figure 3 run on ``--ablation-models`` (default: the first of ``--models``).

Budget, tiny models (code protocol): 2 CPU cores, 70 rows of the paper's six methods (43 on tiny-mha,
27 on tiny-gqa) at about 30 s each, 35-45 minutes for both models (measured: 42 min wall, 58 min CPU on
a machine shared with other benchmarks), plus ~3 minutes of tokenizing calibration text; the peers add
2 rows each per model at 20% and 50%. Calibration: 128 windows of 512 tokens from the built-in corpus's
training split, seed 0. Evaluation: 160 128-token and 40 512-token windows spread evenly over the
held-out split, and the first 100 items of each task.

Budget, SmolLM2-135M (english protocol): 57 rows (54 without DISP-LLM, which is not run on it: see
docs/results/peers.md), Table 1 at 20% and 50% first.
Calibration: 32 windows of 256 tokens of the English calibration chapters, seed 0. Evaluation: 100
128-token and 25 512-token windows spread evenly over the eval chapters; zero-shot on the first 100
items of each English task for Table 1's rows only (the ablation tables are judged on perplexity, as
their claims are). Measured with OpenMP's passive waits (benchmarks/omp_wait.py) on 2 shared cores at
load 2-7: a Table 1 row (pruning, both perplexities, 800 zero-shot requests) 93-350 s, SlimGPT auto
about 2-3.5 min, an ablation row 25-90 s: about 2.1 h for the 57 rows (docs/results/smollm2.md). With
spinning waits on a saturated machine the same rows took 10-55 min each.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as slimgpt does, before torch loads (omp_wait.py)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

from paper_bench import (
    SLICED_METHODS,
    ModelBench,
    fill_bits_back,
    fingerprint,
    is_gqa,
    measure_row,
    prose_text,
    spread,
    task_module,
    weights_digest,
)
from paper_plan import (
    ABLATION_RATIOS,
    ABLATIONS,
    ALL_TABLES,
    PAPER_METHODS,
    PROTOCOLS,
    SHORT_WINDOW,
    TABLE1_RATIOS,
    Options,
    Plan,
    RowSpec,
    base_row,
    build_plan,
    calib_row,
    fig3_row,
    fig3_values,
    gqa_row,
    model_label,
    protocol_name,
    registry_methods,
    schedule_row,
    with_options,
)
from paper_render import Claim, Tables, check_claims, draw_figures, gqa_verdict, pct

from slimgpt.config import GQA_POLICIES
from slimgpt.evaluation import library_versions
from slimgpt.evaluation.report import format_count, format_ppl, markdown_table, write_atomic
from slimgpt.solver.schedule import SCHEDULES

logger = logging.getLogger("paper_tables")

__all__ = ["ALL_TABLES", "PAPER_METHODS", "TABLE1_RATIOS", "Options", "build_plan", "main", "prose_text",
           "registry_methods", "spread"]
FORMAT = "slimgpt.paper_tables"
FORMAT_VERSION = 1
FINDINGS = "findings.md"  # hand-written analysis of the NOT HELD rows, kept next to the generated tables


class Results:
    """The JSON of every row, rewritten atomically after each row so that a run can resume."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "rows": {}}
        if path.exists():
            loaded = json.loads(path.read_text())
            if loaded.get("format") == FORMAT:
                self.data = loaded

    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = self.data["rows"]
        return rows

    def valid(self, spec: RowSpec, digest: str, fingerprint: Mapping[str, Any], tasks: bool) -> dict[str, Any] | None:
        """The cached row for ``spec`` if it was measured on the same weights in the same way."""
        row = self.rows.get(spec.key)
        if row is None or row.get("model_digest") != digest or row.get("eval") != fingerprint:
            return None
        if tasks and not row.get("zero_shot"):
            return None
        return row

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=1, allow_nan=True) + "\n")


# --- the run -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mha,tiny-gqa", help="built-in names or model folders")
    parser.add_argument("--ablation-models", default=None,
                        help="models for tables 5, 6, 14 and fig3 (default: the first of --models)")
    parser.add_argument("--tables", default=",".join(ALL_TABLES), help=f"any of {','.join(ALL_TABLES)}")
    parser.add_argument("--methods", default=None,
                        help="Table 1's methods (default: every registered method, and slimgpt-auto)")
    parser.add_argument("--ratios", default=",".join(str(r) for r in TABLE1_RATIOS),
                        help="Table 1's ratios for the paper's methods")
    parser.add_argument("--peer-ratios", default=",".join(str(r) for r in ABLATION_RATIOS),
                        help="Table 1's ratios for the other methods (peers, slimgpt-auto)")
    parser.add_argument("--protocol", choices=["auto", *PROTOCOLS], default="auto",
                        help="how the models are calibrated and measured (auto: english for smollm2-135m, else code)")
    parser.add_argument("--nsamples", type=int, default=None,
                        help="calibration windows (default: the protocol's, 128 code / 32 english; quick 16)")
    parser.add_argument("--seqlen", type=int, default=None,
                        help="tokens per calibration window (default: the protocol's, 512 / 256; quick 128)")
    parser.add_argument("--quick", action="store_true", help="few windows, items and samples: checks the plumbing")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--force", action="store_true", help="recompute rows that are already in the JSON")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--render-only", action="store_true",
                        help="run no row and leave the JSON alone: rewrite the Markdown and figures from the rows "
                             "measured so far (safe while another invocation is still filling the JSON)")
    return parser.parse_args(argv)


def _split(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def make_options(args: argparse.Namespace) -> Options:
    models = _split(args.models)
    ablation = _split(args.ablation_models) if args.ablation_models else models[:1]
    return Options(
        models=models, ablation_models=ablation, tables=_split(args.tables),
        methods=_split(args.methods) if args.methods else registry_methods(),
        ratios=tuple(float(r) for r in _split(args.ratios)),
        peer_ratios=tuple(float(r) for r in _split(args.peer_ratios)),
        nsamples=args.nsamples or (16 if args.quick else None), seqlen=args.seqlen or (128 if args.quick else None),
        protocols={model: protocol_name(model, args.protocol) for model in dict.fromkeys([*models, *ablation])},
    )


def output_stem(options: Options, quick: bool) -> str:
    english = [model_label(m) for m in options.protocols if options.protocol(m).name != "code"]
    stem = "paper_tables" + "".join(f"_{name}" for name in english)
    return stem + ("_quick" if quick else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    unknown = set(_split(args.tables)) - set(ALL_TABLES)
    if unknown:
        print(f"error: unknown table(s) {', '.join(sorted(unknown))}; choose from {','.join(ALL_TABLES)}")
        return 2
    options = make_options(args)
    stem = output_stem(options, args.quick)
    results = Results(args.out / f"{stem}.json")
    run_start, cpu_start = time.perf_counter(), time.process_time()
    models = list(options.protocols)
    gqa = {model: is_gqa(model) for model in models}
    digests = {model: weights_digest(model) for model in models}
    prints = {model: fingerprint(options.protocol(model), args.quick) for model in models}
    plan = build_plan(options, lambda model: gqa[model])
    specs = [spec for model in plan.rows for spec in plan.rows[model]]
    todo = [s for s in specs if args.force
            or results.valid(s, digests[s.model], prints[s.model], s.key in plan.tasks) is None]
    print_header(args, options, plan, len(specs), len(todo))
    # sliced rows measured before the bits-back size column existed: prune again and export (no eval)
    fills = [s for s in specs if s not in todo and s.method in SLICED_METHODS
             and "bits_back" not in results.rows[s.key]]
    if args.render_only:
        todo, fills = [], []
    failures = run_rows(todo, plan, options, results, args.quick)
    failures.update(fill_rows(fills, options, results, args.quick))

    wall, cpu = time.perf_counter() - run_start, time.process_time() - cpu_start
    tables = Tables(results.rows, {m: _eval_lengths(results, m) for m in models},
                    {m: tuple(task_module(options.protocol(m)).TASK_NAMES) for m in models})
    claims = check_claims(tables, options, plan)
    run = {"command": " ".join(["python", "benchmarks/paper_tables.py", *(argv or sys.argv[1:])]),
           "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "rows_run": len(todo) - len(failures),
           "failures": [f"{key}: {error}" for key, error in failures.items()],
           "settings": {m: prints[m] for m in models}, "options": options.to_dict(),
           "machine": machine(args.threads), "load_average": os.getloadavg(), "versions": library_versions()}
    runs = [*results.data.get("runs", []), run]  # a resumed table was built by several runs
    if args.render_only:  # the last real invocation describes the rows (this one ran none)
        runs = results.data.get("runs") or [run]
    if not args.render_only:
        results.data["runs"] = runs
        results.data["claims"] = [asdict(claim) for claim in claims]
        results.save()
    figures = draw_figures(tables, plan, options, args.out, stem)
    markdown = render(tables, plan, options, claims, figures, runs, args.out, failures)
    write_atomic(args.out / f"{stem}.md", markdown)
    print(f"\n{len(todo) - len(failures)} rows run in {wall / 60:.1f} min (cpu {cpu / 60:.1f} min); "
          f"wrote {args.out / (stem + '.md')} and {results.path}")
    for claim in claims:
        print(f"  {claim.verdict:>12}  {claim.claim}  [{claim.evidence}]")
    if failures:
        print(f"{len(failures)} row(s) failed (rerun to retry them):\n  "
              + "\n  ".join(f"{k}: {e}" for k, e in failures.items()))
        return 1
    return 0


def run_rows(todo: Sequence[RowSpec], plan: Plan, options: Options, results: Results, quick: bool) -> dict[str, str]:
    """Measure every row of ``todo`` (one dense model in memory at a time), saving each; the failures."""
    failures: dict[str, str] = {}
    done_times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="slimgpt_paper_tables_") as tmp:
        bench: ModelBench | None = None
        for index, spec in enumerate(todo):
            if bench is None or bench.name != spec.model:
                bench = None  # one dense model in memory at a time
                bench = ModelBench(spec.model, options.protocol(spec.model), quick, Path(tmp))
            try:
                row = measure_row(spec, bench, with_tasks=spec.key in plan.tasks)
            except Exception as error:  # one broken method must not cost the other rows
                failures[spec.key] = _error_line(error)
                print(f"[{index + 1}/{len(todo)}] FAILED {spec.key}: {failures[spec.key]}", flush=True)
                logger.debug("%s", traceback.format_exc())
                continue
            results.rows[spec.key] = row
            results.save()
            done_times.append(row["wall_s"])
            eta = (len(todo) - index - 1) * sum(done_times) / len(done_times)
            print(f"[{index + 1}/{len(todo)}] {spec.key}: {_row_summary(row)}; {row['wall_s']:.1f} s "
                  f"(prune {row['prune_s']:.1f} s, cpu {row['cpu_s']:.1f} s); load {os.getloadavg()[0]:.1f}; "
                  f"ETA {eta / 60:.1f} min", flush=True)
    return failures


def fill_rows(fills: Sequence[RowSpec], options: Options, results: Results, quick: bool) -> dict[str, str]:
    """Add the bits-back column to finished sliced rows that lack it; the failures."""
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="slimgpt_paper_tables_") as tmp:
        bench: ModelBench | None = None
        for index, spec in enumerate(fills):
            if bench is None or bench.name != spec.model:
                bench = None
                bench = ModelBench(spec.model, options.protocol(spec.model), quick, Path(tmp))
            row = results.rows[spec.key]
            try:
                filled = fill_bits_back(spec, bench)
                if filled["parameters"] != row["parameters"]:
                    raise RuntimeError(f"pruning again gave {filled['parameters']} parameters, the row has "
                                       f"{row['parameters']}: rerun the row with --force")
            except Exception as error:
                failures[spec.key] = f"bits-back: {_error_line(error)}"
                print(f"[bits-back {index + 1}/{len(fills)}] FAILED {spec.key}: {failures[spec.key]}", flush=True)
                continue
            row["bits_back"] = filled["bits_back"]
            results.save()
            saved = ", ".join(f"{d} {v['saved_percent']:.2f}%" for d, v in filled["bits_back"].items())
            print(f"[bits-back {index + 1}/{len(fills)}] {spec.key}: saved {saved}", flush=True)
    return failures


def _error_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _eval_lengths(results: Results, model: str) -> tuple[int, ...]:
    """The perplexity windows measured for ``model`` (from its dense row, else any row)."""
    for row in results.rows.values():
        if row["model"] == model:
            return tuple(sorted(int(n) for n in row["ppl"]))
    return (SHORT_WINDOW,)


def _row_summary(row: Mapping[str, Any]) -> str:
    ppl = ", ".join(f"PPL{n} {format_ppl(v['value'])}" for n, v in row["ppl"].items())
    average = (row.get("zero_shot") or {}).get("average")
    return f"{format_count(row['parameters'])} params, {ppl}, avg acc {'–' if average is None else pct(average)}"


def machine(threads: int) -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch_threads": threads, "processor": platform.processor() or platform.machine()}


def print_header(args: argparse.Namespace, options: Options, plan: Plan, n_rows: int, n_todo: int) -> None:
    # Measured with 2 threads and passive OpenMP waits: a tiny-model row 10-30 s of wall time; a SmolLM2
    # Table 1 row 93-350 s, an ablation row 47-80 s (docs/results/smollm2.md).
    print(f"SlimGPT paper tables on {', '.join(options.models)}: tables {','.join(options.tables)}")
    todo = "none (--render-only)" if args.render_only else f"{n_todo} of {n_rows} rows to run (the rest cached)"
    print(f"CPU time budget: {todo} on {args.threads} threads; tiny models ~30 s/row (70 rows, 35-45 min for "
          "both), smollm2-135m ~2-3 min per Table 1 row and ~1 min per ablation row on 2 cores.")
    for model in options.protocols:
        protocol = options.protocol(model)
        calib, nsamples, seqlen = options.calibration(model)
        settings = protocol.settings
        print(f"{model}: protocol {protocol.name}; calibration {nsamples} x {seqlen} tokens of {calib}, seed 0; "
              f"PPL on {settings.windows_short} x 128 and {settings.windows_context} x long windows of "
              f"{protocol.ppl} held-out; zero-shot: first {settings.task_limit or 'all'} items of "
              f"{', '.join(task_module(protocol).TASK_NAMES)}")
    for note in plan.notes:
        print(f"note: {note}")


# --- the Markdown --------------------------------------------------------------------------------


def protocol_lines(options: Options, runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """What each protocol in this file means: calibration, perplexity text, tasks and chance."""
    lines = []
    for name in dict.fromkeys(options.protocol(m).name for m in options.protocols):
        protocol = PROTOCOLS[name]
        models = ", ".join(model_label(m) for m in options.protocols if options.protocol(m).name == name)
        module = task_module(protocol)
        settings = protocol.settings
        calib, nsamples, seqlen = options.calibration(next(m for m in options.protocols
                                                             if options.protocol(m).name == name))
        chance = module.task_chance(limit=settings.task_limit)
        limit = settings.task_limit or module.DEFAULT_ITEMS
        text = ("the built-in corpus's held-out split (`slimgpt.corpus.heldout_text()`)" if protocol.ppl == "builtin"
                else "the eval chapters of the shipped English corpus (`slimgpt.data.english`, `--ppl english`)")
        long = "the model's context" if protocol.long_window is None else f"{protocol.long_window} tokens"
        lines += [
            f"- protocol `{name}` ({models}): calibration {nsamples} windows of {seqlen} tokens of `{calib}` "
            f"(`slimgpt.data.calibration_windows`), seed 0, unless a table varies it. Perplexity: {text}, "
            f"non-overlapping windows of 128 tokens (the paper's protocol; {settings.windows_short} windows) and of "
            f"{long} ({settings.windows_context} windows), evenly spread over the split, each from an empty context. "
            f"Zero-shot: `benchmarks/{'tasks' if protocol.tasks == 'code' else 'english_tasks'}.py`, first {limit} "
            f"items each" + ("" if protocol.ablation_tasks else ", on Table 1's rows only")
            + "; cells are acc / acc_norm in %, `avg` is the mean of acc_norm. Chance: "
            + ", ".join(f"{task} {pct(value)}" for task, value in chance.items())
            + f". With {limit} items a task's standard error is up to {50 / math.sqrt(limit):.1f} points: "
            "perplexity is the finer measure.",
        ]
    return lines


def render(tables: Tables, plan: Plan, options: Options, claims: Sequence[Claim], figures: Mapping[str, Path],
           runs: Sequence[Mapping[str, Any]], out: Path, failures: Mapping[str, str]) -> str:
    run = runs[-1]
    shown = [row for specs in plan.rows.values() for spec in specs if (row := tables.get(spec)) is not None]
    parts = [
        f"# SlimGPT paper tables on {', '.join(model_label(m) for m in options.protocols)}",
        "",
        f"Generated by `{run['command']}`.",
        "",
        f"- machine: {run['machine']['processor']}, {run['machine']['cpus']} CPUs, torch threads "
        f"{run['machine']['torch_threads']}; {', '.join(f'{k} {v}' for k, v in run['versions'].items())}",
        f"- CPU time budget: the {len(shown)} rows below took {sum(r['wall_s'] for r in shown) / 60:.1f} min wall, "
        f"{sum(r['cpu_s'] for r in shown) / 60:.1f} min CPU (column `row s` per row; `prune s` is its pruning "
        f"part, `prune MiB` the pruning run's peak resident memory above the process's before it, i.e. on top of "
        f"the loaded model) over {len(runs)} invocation(s); the last ran {run['rows_run']} rows in "
        f"{run['wall_s'] / 60:.1f} min. The machine is shared: see the budget in the script's docstring.",
        *protocol_lines(options, runs),
        "- ratio = fraction of decoder-layer parameters removed (embeddings excluded); `realised` is what "
        "each method actually removed, `params` counts the whole model. SliceGPT's rows name the hidden width "
        "it keeps (its own ratio convention is the width sliced); its decoder count includes the shortcut "
        "matrices, and its `params` include the lm_head it unties from the (sliced) embeddings.",
        "",
    ]
    if plan.notes:
        parts += ["Notes:", "", *[f"- {note}" for note in plan.notes], ""]
    missing = [key for specs in plan.rows.values() for spec in specs if (key := spec.key) not in tables.rows]
    if failures:
        parts += ["Rows that failed in the last run (rerun to retry):", "",
                  *[f"- `{key}`: {error}" for key, error in failures.items()], ""]
    if missing:
        parts += [f"{len(missing)} planned row(s) are not measured yet (shown as –); rerun the command to resume.", ""]
    if claims:
        parts += ["## The paper's claims", "", markdown_table(
            ["claim", "verdict", f"evidence (PPL, {SHORT_WINDOW}-token windows)"],
            [[c.claim, f"**{c.verdict}**", c.evidence] for c in claims]), ""]
        if (out / FINDINGS).exists():
            parts += [f"Why a claim is not held, row by row (bug, scale or method): [{FINDINGS}]({FINDINGS}).", ""]
    if "1" in options.tables:
        parts.append(tables.table1(plan, options, failures))
        parts.append(tables.bits_back(plan, options))
        parts += [f"![{name}]({_rel(path, out)})" for name, path in figures.items()
                  if name.startswith("ppl_vs_ratio")] + [""]
    for model in options.ablation_models:
        parts += ablation_sections(tables, options, model, figures, out)
    if "gqa" in options.tables:
        for model in options.models:
            if not any(spec.options and dict(spec.options).get("gqa_policy") for spec in plan.rows.get(model, [])):
                continue
            parts += ["## GQA policy: whole KV groups against query heads", ""]
            labelled = [(policy, gqa_row(model, options, ratio, policy))
                        for ratio in ABLATION_RATIOS for policy in GQA_POLICIES]
            parts.append(tables.variants("SlimGPT", model, labelled))
            parts += [f"Verdict: {gqa_verdict(tables, options, model)}.", ""]
    return "\n".join(parts)


def _rel(path: Path, out: Path) -> Path:
    return path.relative_to(out) if path.is_relative_to(out) else path


def ablation_sections(tables: Tables, options: Options, model: str, figures: Mapping[str, Path],
                      out: Path) -> list[str]:
    parts: list[str] = []
    protocol = options.protocol(model)
    if "6" in options.tables:
        parts += ["## Table 6: layer-ratio schedules at 50%", ""]
        parts.append(tables.variants("50%", model, [(s, schedule_row(model, options, s)) for s in SCHEDULES]))
    if "5" in options.tables:
        parts += ["## Table 5: ablations", ""]
        for ratio in ABLATION_RATIOS:
            labelled = [(label, with_options(base_row(model, options, ratio), **ablation))
                        for label, ablation in ABLATIONS.items()]
            parts.append(tables.variants(f"{100 * ratio:.0f}%", model, labelled))
    if "14" in options.tables:
        note = ("`prose` is English text from the docstrings and comments of the same training files "
                "(`paper_bench.prose_text()`): a stand-in for the paper's C4-vs-Alpaca comparison, which needs Hub "
                "data. The evaluation is code, so `builtin` is the in-domain source."
                if protocol.name == "code" else
                "`english` is the shipped English corpus's calibration chapters, `builtin` the built-in Python "
                "corpus's training split: a stand-in for the paper's C4-vs-Alpaca comparison. The evaluation is "
                "English, so `english` is the in-domain source.")
        parts += ["## Table 14: calibration source", "", note, ""]
        for ratio in ABLATION_RATIOS:
            labelled = [(calib, calib_row(model, options, ratio, calib))
                        for calib in (protocol.calib, protocol.alt_calib)]
            parts.append(tables.variants(f"{100 * ratio:.0f}%", model, labelled))
    if "fig3" in options.tables:
        _, nsamples, seqlen = options.calibration(model)
        parts += ["## Figure 3: calibration samples and sequence length at 50%", ""]
        labelled = [(f"{axis} {value}", fig3_row(model, options, axis, value))
                    for axis, full in (("nsamples", nsamples), ("seqlen", seqlen)) for value in fig3_values(full)]
        parts.append(tables.variants("50%", model, labelled))
        if (path := figures.get(f"fig3 {model}")) is not None:
            parts += [f"![Figure 3 {model}]({_rel(path, out)})", ""]
    return parts


if __name__ == "__main__":
    sys.exit(main())
