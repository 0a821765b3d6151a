"""Rerun the SlimGPT paper's experiments on slimgpt's built-in reference models.

    python benchmarks/paper_tables.py                          # all tables, tiny-mha and tiny-gqa
    python benchmarks/paper_tables.py --tables 5,6 --models tiny-mha
    python benchmarks/paper_tables.py --quick --out /tmp/check  # a few windows / items: checks the plumbing

Writes ``paper_tables.md`` (tables, the paper's claims marked HELD / NOT HELD, figures) and
``paper_tables.json`` (every row) into ``--out``; ``--quick`` writes ``paper_tables_quick.*`` so a check
never overwrites real results. Every finished row is saved at once, so an interrupted run resumes
where it stopped; a rerun skips finished rows (same model weights, same evaluation settings) unless
``--force``.

What is run (the paper's numbering):

- Table 1: every pruning method at 20 / 25 / 33 / 50% of decoder parameters, on every ``--models``
  model (GQA models with the default ``gqa_policy``): parameters, held-out perplexity on 128-token
  windows (the paper's protocol) and on windows of the model's whole context (512 tokens), and
  accuracy on the local zero-shot code tasks (``benchmarks/tasks.py``).
- Table 5: SlimGPT against -GCD (``head_score="diag"``), -DGS (``group_schedule="fixed"``) and no
  compensation, at 20% and 50%.
- Table 6: the five layer-ratio schedules at 50%.
- Table 14: calibration source: ``builtin`` (held-in Python code) against English prose taken from
  the docstrings and comments of the same training files; a stand-in for the paper's C4 vs Alpaca.
- Figure 3: 50% pruning with 1/8, 1/4, 1/2 and all of ``--nsamples`` calibration windows, and with
  1/8 .. 1 of ``--seqlen`` tokens per window.
- gqa: on GQA models, whole-KV-group against query-head removal at 20% and 50%: the measurement
  behind slimgpt's default ``gqa_policy``.
Tables 5, 6, 14 and Figure 3 run on ``--ablation-models`` (default: the first of ``--models``).

Budget: the default settings are sized for 2 CPU cores: 70 rows (43 on tiny-mha, 27 on tiny-gqa) at about
30 s each, 35-45 minutes for both models (measured: 42 min wall, 58 min CPU on a machine shared with other
benchmarks), plus ~3 minutes of tokenizing calibration text.
Calibration: 128 windows of 512 tokens (the models' whole context) from the built-in corpus's training
split, seed 0. Evaluation: 160 128-token and 40 512-token windows spread evenly over
the held-out split (about 20k tokens each, a quarter of it), and the first 100 items of each task.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import io
import itertools
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import tokenize
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

import tasks as code_tasks

from slimgpt import corpus
from slimgpt.models.families import get_adapter
from slimgpt.config import GQA_POLICIES, METHODS, PruneConfig
from slimgpt.data import calibration_windows, eval_windows
from slimgpt.errors import SlimGPTError
from slimgpt.evaluation import (
    PerplexityResult,
    TaskSuite,
    count_parameters,
    library_versions,
    load_tasks,
    perplexity,
    plot_ppl_vs_ratio,
    window_protocol,
    zero_shot,
)
from slimgpt.evaluation.ppl import model_context
from slimgpt.evaluation.report import format_count, format_ppl, markdown_table, write_atomic
from slimgpt.models.slim import load_model, resolve_model_path
from slimgpt.models.geometry import decoder_params
from slimgpt.prune import prune_model
from slimgpt.solver.schedule import SCHEDULES

logger = logging.getLogger("paper_tables")

FORMAT = "slimgpt.paper_tables"
FORMAT_VERSION = 1
ALL_TABLES = ("1", "5", "6", "14", "fig3", "gqa")
TABLE1_RATIOS = (0.2, 0.25, 0.33, 0.5)
ABLATION_RATIOS = (0.2, 0.5)
BASELINES = ("magnitude", "wanda-sp", "flap", "llm-pruner", "slicegpt")
TABLE1_METHODS = ("slimgpt", *BASELINES)
FINDINGS = "findings.md"  # hand-written analysis of the NOT HELD rows, kept next to the generated tables
ABLATIONS: Mapping[str, Mapping[str, Any]] = {
    "SlimGPT": {},
    "-GCD (head_score=diag)": {"head_score": "diag"},
    "-DGS (group_schedule=fixed)": {"group_schedule": "fixed"},
    "-compensation (compensate=False)": {"compensate": False},
}
FIG3_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)
BUILTIN_CALIB = "builtin"
PROSE_CALIB = "prose"
SHORT_WINDOW = 128  # the paper's (LLM-Pruner's) perplexity window
SEED = 0


# --- settings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """How every row is measured. A cached row is reused only if these are unchanged.

    windows_short / windows_context: windows of 128 tokens and of the model's context, taken evenly
    spread over the held-out split (the split's first windows are two files only). task_limit: the
    first items of each task (None: all).
    """

    windows_short: int = 160
    windows_context: int = 40
    task_limit: int | None = 100
    ppl_batch: int = 8
    task_batch: int = 16
    prune_batch: int = 8

    def fingerprint(self) -> dict[str, Any]:
        return {**asdict(self), "tasks": list(code_tasks.TASK_NAMES), "task_data": _tasks_digest()}


QUICK = EvalSettings(windows_short=8, windows_context=4, task_limit=16)


@dataclass(frozen=True)
class RowSpec:
    """One pruned (or dense) model to build and measure."""

    model: str
    method: str  # "dense" or a PruneConfig method
    ratio: float = 0.0
    calib: str = BUILTIN_CALIB
    nsamples: int = 128
    seqlen: int = 512
    options: tuple[tuple[str, Any], ...] = ()  # further PruneConfig fields (ablations, schedule, GQA)

    @property
    def key(self) -> str:
        if self.method == "dense":
            return f"{self.model}|dense"
        extra = ",".join(f"{name}={value}" for name, value in sorted(self.options))
        return (f"{self.model}|{self.method}|{self.ratio:.2f}|calib={self.calib}|n={self.nsamples}|"
                f"s={self.seqlen}|{extra}")

    def config(self) -> PruneConfig:
        return PruneConfig(method=self.method, ratio=self.ratio, calib=self.calib, nsamples=self.nsamples,
                           seqlen=self.seqlen, seed=SEED, **dict(self.options))


def with_options(spec: RowSpec, **options: Any) -> RowSpec:
    merged = dict(spec.options) | options
    return RowSpec(spec.model, spec.method, spec.ratio, spec.calib, spec.nsamples, spec.seqlen,
                   tuple(sorted(merged.items())))


# --- the data each model is measured on --------------------------------------------------------------


def _tasks_digest() -> str:
    digest = hashlib.sha1()
    for name in code_tasks.TASK_NAMES:
        digest.update((code_tasks.TASKS_DIR / f"{name}.jsonl").read_bytes())
    return digest.hexdigest()[:12]


def weights_digest(name: str) -> str:
    """SHA-1 of the model's safetensors files: retrained reference models invalidate cached rows."""
    digest = hashlib.sha1()
    for path in sorted(Path(resolve_model_path(name)).glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def is_gqa(name: str) -> bool:
    """Whether the model has fewer KV heads than query heads (read from its config only)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(name))
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(kv_heads) < int(config.num_attention_heads)


def spread(windows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` windows evenly spaced over all of them (all when there are fewer)."""
    if windows.shape[0] <= count:
        return windows
    index = torch.linspace(0, windows.shape[0] - 1, count).round().long()
    return windows[index]


def prose_text(max_file_chars: int = 4000, max_chars: int = 1_500_000) -> str:
    """English prose from the docstrings and comments of the TRAINING split of the built-in corpus.

    The stand-in for the paper's instruction-data calibration (Table 14): the same files as the code
    calibration, but natural language only. Docstrings (module, class, function) and runs of comment
    lines become paragraphs; lines that look like code (doctests, indented examples) and paragraphs
    with few words or few letters are dropped. At most ``max_file_chars`` per file, so every file
    contributes; deterministic (files in sorted order, nodes in ``ast.walk`` order).
    """
    pieces: list[str] = []
    total = 0
    for path in corpus.stdlib_files("train"):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        paragraphs: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                docstring = ast.get_docstring(node, clean=True)
                if docstring:
                    paragraphs += docstring.split("\n\n")
        paragraphs += _comment_paragraphs(source)
        kept, size = [], 0
        for paragraph in paragraphs:
            text = _prose(paragraph)
            if text is None or size + len(text) > max_file_chars:
                continue
            kept.append(text)
            size += len(text) + 2
        pieces += kept
        total += size
        if total >= max_chars:
            break
    return "\n\n".join(pieces) + "\n"


def _comment_paragraphs(source: str) -> list[str]:
    paragraphs: list[str] = []
    current: list[str] = []
    last_row = -2
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type != tokenize.COMMENT:
                continue
            text = token.string.lstrip("#").strip()
            if token.start[0] != last_row + 1 and current:
                paragraphs.append("\n".join(current))
                current = []
            if text and not text.startswith(("!", "-*-", "type:", "noqa", "pragma")):
                current.append(text)
            last_row = token.start[0]
    except (tokenize.TokenError, SyntaxError):
        pass
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _prose(paragraph: str) -> str | None:
    lines = [line.strip() for line in paragraph.splitlines()
             if line.strip() and not line.startswith((" ", "\t")) and not line.lstrip().startswith((">>>", "..."))]
    text = " ".join(lines)
    if len(text.split()) < 6:
        return None
    letters = sum(char.isalpha() or char == " " for char in text)
    return text if letters >= 0.85 * len(text) else None


class ModelBench:
    """One dense model, loaded once, and everything its rows share: windows, calibration, tasks."""

    def __init__(self, name: str, settings: EvalSettings, suite: TaskSuite, workdir: Path) -> None:
        self.name = name
        self.settings = settings
        self.suite = suite
        self.workdir = workdir
        # float32: the reference models ship in bf16, and CPU matmuls are faster and exact in float32.
        self.dense, self.tokenizer = load_model(name, dtype="float32")
        self.digest = weights_digest(name)
        self.fingerprint = settings.fingerprint()
        self.context = model_context(self.dense) or 2048
        self._windows: dict[int, torch.Tensor] = {}
        self._calibration: dict[tuple[str, int, int], torch.Tensor] = {}

    @property
    def eval_lengths(self) -> tuple[int, ...]:
        """The two perplexity windows: 128 tokens and the model's whole context (one if they coincide)."""
        return tuple(sorted({min(SHORT_WINDOW, self.context), self.context}))

    def windows(self, seqlen: int) -> torch.Tensor:
        if seqlen not in self._windows:
            count = self.settings.windows_short if seqlen == min(SHORT_WINDOW, self.context) \
                else self.settings.windows_context
            self._windows[seqlen] = spread(eval_windows(self.tokenizer, BUILTIN_CALIB, seqlen), count)
        return self._windows[seqlen]

    def calibration(self, source: str, nsamples: int, seqlen: int) -> torch.Tensor:
        key = (source, nsamples, seqlen)
        if key not in self._calibration:
            path = BUILTIN_CALIB if source == BUILTIN_CALIB else str(self._prose_file())
            self._calibration[key] = calibration_windows(self.tokenizer, path, nsamples, seqlen, seed=SEED)
        return self._calibration[key]

    def _prose_file(self) -> Path:
        path = self.workdir / "prose.txt"
        if not path.exists():
            path.write_text(prose_text(), encoding="utf-8")
        return path


# --- one row -------------------------------------------------------------------------------------


def measure_row(spec: RowSpec, bench: ModelBench) -> dict[str, Any]:
    """Prune a deep copy of the dense model as ``spec`` says, then measure it: a JSON-ready row."""
    start, cpu_start = time.perf_counter(), time.process_time()
    model = copy.deepcopy(bench.dense)
    adapter = get_adapter(model.config)
    decoder_before = decoder_params(model, adapter)
    prune_info: dict[str, Any] | None = None
    if spec.method != "dense":
        config = with_options(spec, batch_size=bench.settings.prune_batch).config()
        calibration = bench.calibration(spec.calib, spec.nsamples, spec.seqlen)
        report = prune_model(model, config, calibration, model_name=spec.model, progress=False)
        prune_info = {
            "config": config.to_dict(),
            "realised_ratio": report.realised_ratio,
            "schedule": report.schedule,
            "layers": [{"layer": r.layer, "heads_kept": r.heads_kept, "heads_total": r.heads_total,
                        "kv_heads_kept": r.kv_heads_kept, "ffn_kept": r.ffn_kept, "ffn_total": r.ffn_total}
                       for r in report.layers],
            "stage_seconds": report.stage_seconds,
        }
    prune_s = time.perf_counter() - start

    ppl = {}
    for seqlen in bench.eval_lengths:
        windows = bench.windows(seqlen)
        value = perplexity(model, windows, batch_size=bench.settings.ppl_batch, progress=False)
        protocol = window_protocol(seqlen, bench.context)[1] + f", {windows.shape[0]} windows spread over held-out"
        ppl[str(seqlen)] = PerplexityResult(value, BUILTIN_CALIB, protocol, seqlen, int(windows.shape[0]),
                                            int(windows.shape[0] * (seqlen - 1))).to_dict()
    scores = zero_shot(model, bench.tokenizer, bench.suite, batch_size=bench.settings.task_batch,
                       limit=bench.settings.task_limit)
    wall = time.perf_counter() - start
    return {
        "key": spec.key,
        "model": spec.model,
        "method": spec.method,
        "ratio": spec.ratio,
        "calib": spec.calib,
        "nsamples": spec.nsamples,
        "seqlen": spec.seqlen,
        "options": dict(spec.options),
        "parameters": count_parameters(model),
        "decoder_parameters": decoder_params(model, adapter),
        "realised_ratio": 1 - decoder_params(model, adapter) / decoder_before,
        "ppl": ppl,
        "zero_shot": scores.to_dict(),
        "prune": prune_info,
        "prune_s": round(prune_s, 2),
        "eval_s": round(wall - prune_s, 2),
        "wall_s": round(wall, 2),
        "cpu_s": round(time.process_time() - cpu_start, 2),
        "model_digest": bench.digest,
        "eval": bench.fingerprint,
    }


# --- which rows each table needs ------------------------------------------------------------------


@dataclass
class Plan:
    """The rows of every requested table, per model, in run order, without duplicates."""

    rows: dict[str, list[RowSpec]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, spec: RowSpec) -> RowSpec:
        bucket = self.rows.setdefault(spec.model, [])
        if all(existing.key != spec.key for existing in bucket):
            bucket.append(spec)
        return spec


@dataclass(frozen=True)
class Options:
    models: tuple[str, ...]
    ablation_models: tuple[str, ...]
    tables: tuple[str, ...]
    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    nsamples: int
    seqlen: int


def available_methods(requested: Iterable[str], notes: list[str]) -> list[str]:
    """The requested methods this slimgpt implements; a note for each one it does not (yet)."""
    chosen = []
    for method in requested:
        try:
            PruneConfig(method=method)
        except SlimGPTError:
            notes.append(f"method {method!r} is not available in this slimgpt (not in {', '.join(METHODS)}): skipped")
            continue
        chosen.append(method)
    return chosen


def base_row(model: str, options: Options, ratio: float, method: str = "slimgpt") -> RowSpec:
    return RowSpec(model, method, ratio, BUILTIN_CALIB, options.nsamples, options.seqlen)


def fig3_values(full: int) -> list[int]:
    return sorted({max(1, round(full * fraction)) for fraction in FIG3_FRACTIONS})


def build_plan(options: Options, is_gqa: Callable[[str], bool]) -> Plan:
    plan = Plan()
    methods = available_methods(options.methods, plan.notes)
    for model in dict.fromkeys([*options.models, *options.ablation_models]):
        plan.add(RowSpec(model, "dense"))
    if "1" in options.tables:
        for model in options.models:
            for method in methods:
                for ratio in options.ratios:
                    plan.add(base_row(model, options, ratio, method))
    for model in options.ablation_models:
        if "5" in options.tables:
            for ratio in ABLATION_RATIOS:
                for ablation in ABLATIONS.values():
                    plan.add(with_options(base_row(model, options, ratio), **ablation))
        if "6" in options.tables:
            for schedule in SCHEDULES:
                plan.add(with_options(base_row(model, options, 0.5), schedule=schedule)
                         if schedule != PruneConfig().schedule else base_row(model, options, 0.5))
        if "14" in options.tables:
            for ratio in ABLATION_RATIOS:
                for calib in (BUILTIN_CALIB, PROSE_CALIB):
                    plan.add(RowSpec(model, "slimgpt", ratio, calib, options.nsamples, options.seqlen))
        if "fig3" in options.tables:
            for nsamples in fig3_values(options.nsamples):
                plan.add(RowSpec(model, "slimgpt", 0.5, BUILTIN_CALIB, nsamples, options.seqlen))
            for seqlen in fig3_values(options.seqlen):
                plan.add(RowSpec(model, "slimgpt", 0.5, BUILTIN_CALIB, options.nsamples, seqlen))
    if "gqa" in options.tables:
        gqa_models = [model for model in options.models if is_gqa(model)]
        if not gqa_models:
            plan.notes.append("table gqa: none of --models has grouped KV heads: skipped")
        for model in gqa_models:
            for ratio in ABLATION_RATIOS:
                for policy in GQA_POLICIES:
                    plan.add(gqa_row(model, options, ratio, policy))
    return plan


def gqa_row(model: str, options: Options, ratio: float, policy: str) -> RowSpec:
    """The default policy's row is Table 1's row (same key); the other one names its policy."""
    spec = base_row(model, options, ratio)
    return spec if policy == PruneConfig().gqa_policy else with_options(spec, gqa_policy=policy)


# --- results file --------------------------------------------------------------------------------


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

    def valid(self, spec: RowSpec, digest: str, fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
        """The cached row for ``spec`` if it was measured on the same weights in the same way."""
        row = self.rows.get(spec.key)
        if row is None or row.get("model_digest") != digest or row.get("eval") != fingerprint:
            return None
        return row

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=1, allow_nan=True) + "\n")


# --- tables --------------------------------------------------------------------------------------


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def ppl_cell(row: Mapping[str, Any] | None, seqlen: int) -> str:
    if row is None:
        return "–"
    found = row["ppl"].get(str(seqlen))
    return "–" if found is None else format_ppl(float(found["value"]))


def ppl_of(row: Mapping[str, Any] | None, seqlen: int) -> float | None:
    if row is None or str(seqlen) not in row["ppl"]:
        return None
    return float(row["ppl"][str(seqlen)]["value"])


def task_cells(row: Mapping[str, Any] | None) -> list[str]:
    """acc / acc_norm per task, then the average (acc_norm where reported, as lm-eval's papers do)."""
    if row is None:
        return ["–"] * (len(code_tasks.TASK_NAMES) + 1)
    scores = {task["name"]: task for task in row["zero_shot"]["tasks"]}
    cells = []
    for name in code_tasks.TASK_NAMES:
        task = scores.get(name)
        if task is None:
            cells.append("–")
            continue
        norm = task.get("acc_norm")
        cells.append(pct(task["acc"]) + ("" if norm is None else f" / {pct(norm)}"))
    average = row["zero_shot"].get("average")
    cells.append("–" if average is None else pct(average))
    return cells


def task_header() -> list[str]:
    return [f"{name} acc / acc_norm" for name in code_tasks.TASK_NAMES] + ["avg"]


class Tables:
    """Renders the Markdown of every table from the finished rows."""

    def __init__(self, rows: Mapping[str, Mapping[str, Any]], lengths: Mapping[str, tuple[int, ...]]) -> None:
        self.rows = rows
        self.lengths = lengths

    def get(self, spec: RowSpec) -> Mapping[str, Any] | None:
        return self.rows.get(spec.key)

    def ppl_header(self, model: str) -> list[str]:
        return [f"PPL {n}" for n in self.lengths[model]]

    def ppl_cells(self, model: str, row: Mapping[str, Any] | None) -> list[str]:
        return [ppl_cell(row, n) for n in self.lengths[model]]

    def timing(self, row: Mapping[str, Any] | None) -> list[str]:
        return ["–", "–"] if row is None else [f"{row['prune_s']:.1f}", f"{row['wall_s']:.1f}"]

    def table1(self, plan: Plan, options: Options) -> str:
        parts = ["## Table 1: methods at 20 / 25 / 33 / 50% of decoder parameters", ""]
        for model in options.models:
            specs = [spec for spec in plan.rows.get(model, [])
                     if spec.method != "dense" and not spec.options and spec.calib == BUILTIN_CALIB
                     and spec.nsamples == options.nsamples and spec.seqlen == options.seqlen]
            header = ["method", "ratio", "realised", "params", *self.ppl_header(model), *task_header(),
                      "prune s", "row s"]
            lines = [self._line(RowSpec(model, "dense"), "dense", "0%")]
            order = sorted(specs, key=lambda s: (s.ratio, TABLE1_METHODS.index(s.method)
                                                 if s.method in TABLE1_METHODS else 99))
            lines += [self._line(spec, spec.method, f"{100 * spec.ratio:.0f}%") for spec in order
                      if spec.ratio in options.ratios]
            parts += [f"### {model_label(model)}", "", markdown_table(header, lines), ""]
        return "\n".join(parts)

    def _line(self, spec: RowSpec, label: str, ratio: str) -> list[str]:
        row = self.get(spec)
        dims = ((row or {}).get("prune") or {}).get("schedule", {}).get("slice_dims")
        if dims:  # SliceGPT's own ratio: the hidden width it keeps
            label += f" (width {dims[0]}/{dims[-1]})"
        realised = "–" if row is None else f"{100 * row['realised_ratio']:.1f}%"
        params = "–" if row is None else format_count(row["parameters"])
        return [label, ratio, realised, params, *self.ppl_cells(spec.model, row), *task_cells(row),
                *self.timing(row)]

    def variants(self, title: str, model: str, labelled: Sequence[tuple[str, RowSpec]]) -> str:
        header = ["variant", "ratio", "realised", "params", *self.ppl_header(model), *task_header(),
                  "prune s", "row s"]
        lines = [self._line(spec, label, f"{100 * spec.ratio:.0f}%") for label, spec in labelled]
        return "\n".join([f"### {title}: {model_label(model)}", "", markdown_table(header, lines), ""])


# --- claims --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    claim: str
    verdict: str  # HELD, NOT HELD, NOT MEASURED
    evidence: str


def _verdict(ok: bool | None) -> str:
    return "NOT MEASURED" if ok is None else ("HELD" if ok else "NOT HELD")


def check_claims(tables: Tables, options: Options) -> list[Claim]:
    """The paper's qualitative claims, judged on the 128-token perplexity (its protocol)."""
    claims: list[Claim] = []
    if "1" in options.tables:
        for model in options.models:
            claims += claims_methods(tables, options, model)
    for model in options.ablation_models:
        if "5" in options.tables:
            claims += claims_ablations(tables, options, model)
        if "6" in options.tables:
            claims += claims_schedules(tables, options, model)
        if "14" in options.tables:
            claims += claims_calibration(tables, options, model)
        if "fig3" in options.tables:
            claims += claims_fig3(tables, options, model)
    return claims


def claims_methods(tables: Tables, options: Options, model: str) -> list[Claim]:
    """Table 1: SlimGPT has a lower perplexity than every baseline at 20% and at 50%."""
    claims = []
    for ratio in ABLATION_RATIOS:
        ours = ppl_of(tables.get(base_row(model, options, ratio)), SHORT_WINDOW)
        others = {m: ppl_of(tables.get(base_row(model, options, ratio, m)), SHORT_WINDOW) for m in BASELINES}
        measured = {m: v for m, v in others.items() if v is not None}
        ok = None if ours is None or not measured else all(ours < v for v in measured.values())
        missing = sorted(set(BASELINES) - set(measured))
        evidence = f"SlimGPT {_num(ours)}; " + ", ".join(f"{m} {_num(v)}" for m, v in measured.items())
        evidence += f"; not measured: {', '.join(missing)}" if missing else ""
        claims.append(Claim(f"{model_label(model)} {100 * ratio:.0f}%: SlimGPT has a lower PPL than every baseline",
                            _verdict(ok), evidence))
    return claims


def claims_ablations(tables: Tables, options: Options, model: str) -> list[Claim]:
    """Table 5: removing GCD, DGS or the compensation makes SlimGPT worse."""
    claims = []
    for ratio in ABLATION_RATIOS:
        full = ppl_of(tables.get(base_row(model, options, ratio)), SHORT_WINDOW)
        for label, ablation in list(ABLATIONS.items())[1:]:
            value = ppl_of(tables.get(with_options(base_row(model, options, ratio), **ablation)), SHORT_WINDOW)
            ok = None if full is None or value is None else value > full
            claims.append(Claim(f"{model_label(model)} {100 * ratio:.0f}%: {label.split(' ')[0]} is worse than SlimGPT",
                                _verdict(ok), f"SlimGPT {_num(full)} vs {_num(value)}"))
    return claims


def claims_schedules(tables: Tables, options: Options, model: str) -> list[Claim]:
    """Table 6: log-increase beats uniform; the two decreasing schedules are the worst two."""
    values = {s: ppl_of(tables.get(schedule_row(model, options, s)), SHORT_WINDOW) for s in SCHEDULES}
    log, uniform = values["log-increase"], values["uniform"]
    evidence = ", ".join(f"{s} {_num(v)}" for s, v in values.items())
    ok = None if log is None or uniform is None else log < uniform
    claims = [Claim(f"{model_label(model)} 50%: log-increase beats uniform", _verdict(ok),
                    f"log-increase {_num(log)} vs uniform {_num(uniform)}")]
    measured = {s: v for s, v in values.items() if v is not None}
    worst_two = None
    if len(measured) == len(SCHEDULES):
        worst_two = set(sorted(measured, key=lambda s: measured[s])[-2:])
    ok = None if worst_two is None else worst_two == {"log-decrease", "linear-decrease"}
    claims.append(Claim(f"{model_label(model)} 50%: both decreasing schedules are the worst two", _verdict(ok),
                        evidence))
    return claims


def claims_calibration(tables: Tables, options: Options, model: str) -> list[Claim]:
    """Table 14, by analogy: calibrating on the evaluation's domain gives the lower perplexity."""
    claims = []
    for ratio in ABLATION_RATIOS:
        code, prose = (ppl_of(tables.get(RowSpec(model, "slimgpt", ratio, calib, options.nsamples, options.seqlen)),
                              SHORT_WINDOW) for calib in (BUILTIN_CALIB, PROSE_CALIB))
        ok = None if code is None or prose is None else code < prose
        claims.append(Claim(f"{model_label(model)} {100 * ratio:.0f}%: calibration on the evaluation's domain (code) "
                            "gives a lower PPL than prose (Table 14's C4-better-PPL, by analogy)",
                            _verdict(ok), f"code {_num(code)} vs prose {_num(prose)}"))
    return claims


def claims_fig3(tables: Tables, options: Options, model: str) -> list[Claim]:
    """Figure 3: more calibration samples, and longer ones, give a lower perplexity."""
    claims = []
    for axis, what in (("nsamples", "samples"), ("seqlen", "tokens per sample")):
        values = fig3_values(getattr(options, axis))
        series = [ppl_of(tables.get(fig3_row(model, options, axis, v)), SHORT_WINDOW) for v in values]
        evidence = ", ".join(f"{axis} {v}: {_num(p)}" for v, p in zip(values, series, strict=True))
        measured = [p for p in series if p is not None]
        ok = None
        if len(measured) == len(series):
            ok = measured[-1] < measured[0]
            monotone = all(b <= a for a, b in itertools.pairwise(measured))
            evidence += "; monotone" if monotone else "; not monotone"
        claims.append(Claim(f"{model_label(model)} 50%: more calibration {what} give a lower PPL (Figure 3)",
                            _verdict(ok), evidence))
    return claims


def schedule_row(model: str, options: Options, schedule: str) -> RowSpec:
    spec = base_row(model, options, 0.5)
    return spec if schedule == PruneConfig().schedule else with_options(spec, schedule=schedule)


def fig3_row(model: str, options: Options, axis: str, value: int) -> RowSpec:
    if axis == "nsamples":
        return RowSpec(model, "slimgpt", 0.5, BUILTIN_CALIB, value, options.seqlen)
    return RowSpec(model, "slimgpt", 0.5, BUILTIN_CALIB, options.nsamples, value)


def model_label(model: str) -> str:
    """A model as tables name it: a built-in name, or a folder's last component."""
    return Path(model).name or model


def _num(value: float | None) -> str:
    return "–" if value is None else format_ppl(value)


def gqa_verdict(tables: Tables, options: Options, model: str) -> str:
    """Which GQA policy gives the lower PPL at every measured ratio: the documented default."""
    wins = {policy: 0 for policy in GQA_POLICIES}
    measured = 0
    for ratio in ABLATION_RATIOS:
        for n in tables.lengths[model]:
            values = {p: ppl_of(tables.get(gqa_row(model, options, ratio, p)), n) for p in GQA_POLICIES}
            if any(v is None for v in values.values()):
                continue
            measured += 1
            wins[min(values, key=lambda p: values[p])] += 1  # type: ignore[arg-type,return-value]
    if not measured:
        return "not measured"
    best = max(wins, key=lambda p: wins[p])
    return (f"**{best}** has the lower perplexity in {wins[best]} of {measured} (ratio, window) cells: "
            f"it is the measured default for GQA models (`gqa_policy`)")


# --- figures -------------------------------------------------------------------------------------


def plot_fig3(model: str, series: Mapping[str, Mapping[int, Mapping[int, float]]], path: Path) -> Path:
    """Figure 3: PPL against calibration samples (left) and tokens per sample (right), log2 x axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (axis, label) in enumerate((("nsamples", "calibration samples"),
                                           ("seqlen", "tokens per calibration sample"))):
        axes = figure.add_subplot(1, 2, index + 1)
        for window, points in sorted(series[axis].items()):
            xs = sorted(points)
            axes.plot(xs, [points[x] for x in xs], marker="o", label=f"PPL, {window}-token windows")
        axes.set_xscale("log", base=2)
        axes.set_xticks(sorted({x for points in series[axis].values() for x in points}))
        axes.get_xaxis().set_major_formatter("{x:.0f}")
        axes.set_xlabel(label)
        axes.set_ylabel("held-out perplexity")
        axes.grid(alpha=0.3)
        axes.legend()
        axes.set_title(f"{model_label(model)}, SlimGPT 50%")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150, format="png")
    return path


# --- the run -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mha,tiny-gqa", help="built-in names or model folders")
    parser.add_argument("--ablation-models", default=None,
                        help="models for tables 5, 6, 14 and fig3 (default: the first of --models)")
    parser.add_argument("--tables", default=",".join(ALL_TABLES), help=f"any of {','.join(ALL_TABLES)}")
    parser.add_argument("--methods", default=",".join(TABLE1_METHODS), help="Table 1's methods")
    parser.add_argument("--ratios", default=",".join(str(r) for r in TABLE1_RATIOS), help="Table 1's ratios")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128; quick 16)")
    parser.add_argument("--seqlen", type=int, default=None,
                        help="tokens per calibration window (default 512, the models' context; quick 128)")
    parser.add_argument("--quick", action="store_true", help="few windows, items and samples: checks the plumbing")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--force", action="store_true", help="recompute rows that are already in the JSON")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def _split(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else EvalSettings()
    models = _split(args.models)
    unknown = set(_split(args.tables)) - set(ALL_TABLES)
    if unknown:
        print(f"error: unknown table(s) {', '.join(sorted(unknown))}; choose from {','.join(ALL_TABLES)}")
        return 2
    options = Options(
        models=models,
        ablation_models=_split(args.ablation_models) if args.ablation_models else models[:1],
        tables=_split(args.tables),
        methods=_split(args.methods),
        ratios=tuple(float(r) for r in _split(args.ratios)),
        nsamples=args.nsamples or (16 if args.quick else 128),
        seqlen=args.seqlen or (128 if args.quick else 512),
    )
    stem = "paper_tables_quick" if args.quick else "paper_tables"
    results = Results(args.out / f"{stem}.json")
    run_start, cpu_start = time.perf_counter(), time.process_time()

    with tempfile.TemporaryDirectory(prefix="slimgpt_paper_tables_") as tmp:
        workdir = Path(tmp)
        suite = load_tasks(list(code_tasks.TASK_NAMES), code_tasks.write_task_yamls(workdir / "tasks"))
        benches: dict[str, ModelBench] = {}

        def bench_for(model: str) -> ModelBench:
            if model not in benches:
                benches.clear()  # one dense model in memory at a time
                benches[model] = ModelBench(model, settings, suite, workdir)
            return benches[model]

        gqa = {model: is_gqa(model) for model in dict.fromkeys([*options.models, *options.ablation_models])}
        digests = {model: weights_digest(model) for model in gqa}
        plan = build_plan(options, lambda model: gqa[model])
        specs = [spec for model in plan.rows for spec in plan.rows[model]]
        fingerprint = settings.fingerprint()
        todo = [s for s in specs if args.force or results.valid(s, digests[s.model], fingerprint) is None]
        print_header(args, options, settings, plan, len(specs), len(todo))

        failures: list[str] = []
        done_times: list[float] = []
        for index, spec in enumerate(todo):
            bench = bench_for(spec.model)
            try:
                row = measure_row(spec, bench)
            except Exception as error:  # one broken method must not cost the other rows
                failures.append(f"{spec.key}: {type(error).__name__}: {error}")
                print(f"[{index + 1}/{len(todo)}] FAILED {spec.key}: {type(error).__name__}: {error}")
                logger.debug("%s", traceback.format_exc())
                continue
            results.rows[spec.key] = row
            results.save()
            done_times.append(row["wall_s"])
            eta = (len(todo) - index - 1) * sum(done_times) / len(done_times)
            print(f"[{index + 1}/{len(todo)}] {spec.key}: {_row_summary(row)}; {row['wall_s']:.1f} s "
                  f"(prune {row['prune_s']:.1f} s, cpu {row['cpu_s']:.1f} s); ETA {eta / 60:.1f} min", flush=True)
        lengths = {model: _eval_lengths(results, model) for model in gqa}

    wall, cpu = time.perf_counter() - run_start, time.process_time() - cpu_start
    tables = Tables(results.rows, lengths)
    claims = check_claims(tables, options)
    run = {"command": " ".join(["python", "benchmarks/paper_tables.py", *(argv or sys.argv[1:])]),
                           "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "rows_run": len(todo) - len(failures),
                           "failures": failures, "settings": fingerprint, "options": asdict(options),
                           "machine": machine(args.threads), "versions": library_versions()}
    results.data["runs"] = [*results.data.get("runs", []), run]  # a resumed table was built by several runs
    results.data["claims"] = [asdict(claim) for claim in claims]
    results.save()
    figures = draw_figures(tables, plan, options, args.out, stem)
    markdown = render(tables, plan, options, settings, claims, figures, results.data["runs"], args.out)
    write_atomic(args.out / f"{stem}.md", markdown)
    print(f"\n{len(todo) - len(failures)} rows run in {wall / 60:.1f} min (cpu {cpu / 60:.1f} min); "
          f"wrote {args.out / (stem + '.md')} and {results.path}")
    for claim in claims:
        print(f"  {claim.verdict:>12}  {claim.claim}  [{claim.evidence}]")
    if failures:
        print(f"{len(failures)} row(s) failed (rerun to retry them):\n  " + "\n  ".join(failures))
        return 1
    return 0


def _eval_lengths(results: Results, model: str) -> tuple[int, ...]:
    """The perplexity windows measured for ``model`` (from its dense row, else any row)."""
    for row in results.rows.values():
        if row["model"] == model:
            return tuple(sorted(int(n) for n in row["ppl"]))
    return (SHORT_WINDOW,)


def _row_summary(row: Mapping[str, Any]) -> str:
    ppl = ", ".join(f"PPL{n} {format_ppl(v['value'])}" for n, v in row["ppl"].items())
    average = row["zero_shot"].get("average")
    return f"{format_count(row['parameters'])} params, {ppl}, avg acc {'–' if average is None else pct(average)}"


def machine(threads: int) -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch_threads": threads, "processor": platform.processor() or platform.machine()}


def print_header(args: argparse.Namespace, options: Options, settings: EvalSettings, plan: Plan,
                 n_rows: int, n_todo: int) -> None:
    # Measured on tiny-mha, one thread: a SlimGPT / FLAP / Wanda-sp row costs 45-60 CPU-s (pruning with
    # 128 x 512 calibration tokens ~30-40 s, perplexity ~9 s, 300 task items ~9 s), magnitude and
    # LLM-Pruner rows ~18 s; with 2 threads about 30 s of wall time per row on average.
    per_row = 30.0 if not args.quick else 5.0
    print(f"SlimGPT paper tables on {', '.join(options.models)}: tables {','.join(options.tables)}")
    print(f"CPU time budget: {n_todo} of {n_rows} rows to run (the rest cached) x ~{per_row:.0f} s/row on "
          f"{args.threads} threads = ~{n_todo * per_row / 60:.0f} min. The default run is sized for 2 cores: "
          "70 rows, 35-45 min for both models.")
    print(f"calibration: {options.nsamples} x {options.seqlen} tokens, builtin train split, seed {SEED}; "
          f"eval: {settings.windows_short} x 128-token and {settings.windows_context} x context windows spread "
          f"over held-out; zero-shot: first {settings.task_limit or 'all'} items of {', '.join(code_tasks.TASK_NAMES)}")
    for note in plan.notes:
        print(f"note: {note}")


def draw_figures(tables: Tables, plan: Plan, options: Options, out: Path, stem: str) -> dict[str, Path]:
    """PPL against ratio per model (Table 1) and Figure 3; only figures whose rows exist."""
    figures: dict[str, Path] = {}
    if "1" in options.tables:
        for model in options.models:
            dense = tables.get(RowSpec(model, "dense"))
            curves: dict[str, list[tuple[float, float]]] = {}
            for spec in plan.rows.get(model, []):
                row = tables.get(spec)
                if spec.method == "dense" or spec.options or spec.calib != BUILTIN_CALIB or row is None \
                        or spec.nsamples != options.nsamples or spec.seqlen != options.seqlen:
                    continue
                value = ppl_of(row, SHORT_WINDOW)
                if value is not None:
                    curves.setdefault(spec.method, []).append((row["realised_ratio"], value))
            if dense is not None and (dense_ppl := ppl_of(dense, SHORT_WINDOW)) is not None:
                curves = {method: [(0.0, dense_ppl), *points] for method, points in curves.items()}
            if curves:
                path = out / f"{stem}_ppl_vs_ratio_{_slug(model)}.png"
                title = f"{model_label(model)}: held-out PPL ({SHORT_WINDOW}-token windows)"
                figures[f"ppl_vs_ratio {model}"] = plot_ppl_vs_ratio(curves, path, title=title, dataset="held-out")
    if "fig3" in options.tables:
        for model in options.ablation_models:
            series: dict[str, dict[int, dict[int, float]]] = {"nsamples": {}, "seqlen": {}}
            for axis, values in (("nsamples", fig3_values(options.nsamples)), ("seqlen", fig3_values(options.seqlen))):
                for value in values:
                    row = tables.get(fig3_row(model, options, axis, value))
                    for n in tables.lengths[model]:
                        if (ppl := ppl_of(row, n)) is not None:
                            series[axis].setdefault(n, {})[value] = ppl
            if series["nsamples"] and series["seqlen"]:
                figures[f"fig3 {model}"] = plot_fig3(model, series, out / f"{stem}_fig3_{_slug(model)}.png")
    return figures


def _slug(text: str) -> str:
    return "".join(char if char.isalnum() or char == "-" else "_" for char in Path(text).name or text)


def render(tables: Tables, plan: Plan, options: Options, settings: EvalSettings, claims: Sequence[Claim],
           figures: Mapping[str, Path], runs: Sequence[Mapping[str, Any]], out: Path) -> str:
    chance = code_tasks.task_chance(limit=settings.task_limit)
    run = runs[-1]
    shown = [row for specs in plan.rows.values() for spec in specs if (row := tables.get(spec)) is not None]
    total_row_s = sum(row["wall_s"] for row in shown)
    total_cpu_s = sum(row["cpu_s"] for row in shown)
    parts = [
        "# SlimGPT paper tables on the built-in reference models",
        "",
        f"Generated by `{run['command']}`.",
        "",
        f"- machine: {run['machine']['processor']}, {run['machine']['cpus']} CPUs, torch threads "
        f"{run['machine']['torch_threads']}; {', '.join(f'{k} {v}' for k, v in run['versions'].items())}",
        f"- CPU time budget: the default run is sized for 2 idle cores (70 rows at ~30 s, 35-45 min for both "
        f"models). The {len(shown)} rows below took {total_row_s / 60:.1f} min wall, {total_cpu_s / 60:.1f} min "
        f"CPU (column `row s` per row; `prune s` is its pruning part) over {len(runs)} invocation(s); the last "
        f"ran {run['rows_run']} rows in {run['wall_s'] / 60:.1f} min.",
        f"- calibration: {options.nsamples} windows of {options.seqlen} tokens from the built-in corpus's "
        f"training split (`slimgpt.data.calibration_windows(tok, 'builtin', ...)`), seed {SEED}, unless a "
        "table varies it.",
        f"- perplexity: held-out split (`slimgpt.corpus.heldout_text()`), non-overlapping windows of 128 "
        f"tokens (the paper's protocol; {settings.windows_short} windows) and of the model's context "
        f"({settings.windows_context} windows), evenly spread over the split; each window from an empty "
        "context (`slimgpt.evaluation.perplexity`).",
        f"- zero-shot: local lm-eval tasks built from held-out files (`benchmarks/tasks.py`), first "
        f"{settings.task_limit or 'all'} items each; cells are acc / acc_norm in %, `avg` is the mean of "
        "acc_norm. Chance: " + ", ".join(f"{name} {pct(value)}" for name, value in chance.items())
        + f". With {settings.task_limit or 'all'} items a task's standard error is up to "
        f"{50 / math.sqrt(settings.task_limit or code_tasks.DEFAULT_ITEMS):.1f} points: perplexity is the "
        "finer measure.",
        "- ratio = fraction of decoder-layer parameters removed (embeddings excluded); `realised` is what "
        "each method actually removed, `params` counts the whole model. SliceGPT's rows name the hidden width "
        "it keeps (its own ratio convention is the width sliced); its decoder count includes the shortcut "
        "matrices, and its `params` include the lm_head it unties from the (sliced) embeddings.",
        "",
    ]
    if plan.notes:
        parts += ["Notes:", "", *[f"- {note}" for note in plan.notes], ""]
    if run["failures"]:
        parts += ["Rows that failed in this run (rerun to retry):", "", *[f"- {f}" for f in run["failures"]], ""]
    if claims:
        parts += ["## The paper's claims", "", markdown_table(
            ["claim", "verdict", f"evidence (PPL, {SHORT_WINDOW}-token windows)"],
            [[c.claim, f"**{c.verdict}**", c.evidence] for c in claims]), ""]
        if (out / FINDINGS).exists():
            parts += [f"Why a claim is not held, row by row (bug, scale or method): [{FINDINGS}]({FINDINGS}).", ""]
    if "1" in options.tables:
        parts.append(tables.table1(plan, options))
        parts += [f"![{name}]({path.relative_to(out) if path.is_relative_to(out) else path})" for name, path
                  in figures.items() if name.startswith("ppl_vs_ratio")] + [""]
    for model in options.ablation_models:
        if "5" in options.tables:
            parts += ["## Table 5: ablations", ""]
            for ratio in ABLATION_RATIOS:
                labelled = [(label, with_options(base_row(model, options, ratio), **ablation))
                            for label, ablation in ABLATIONS.items()]
                parts.append(tables.variants(f"{100 * ratio:.0f}%", model, labelled))
        if "6" in options.tables:
            parts += ["## Table 6: layer-ratio schedules at 50%", ""]
            parts.append(tables.variants("50%", model, [(s, schedule_row(model, options, s)) for s in SCHEDULES]))
        if "14" in options.tables:
            parts += ["## Table 14: calibration source", "",
                      "`prose` is English text from the docstrings and comments of the same training files "
                      "(`prose_text()` in this script): a stand-in for the paper's C4-vs-Alpaca comparison, "
                      "which needs Hub data. The evaluation is code, so `builtin` is the in-domain source.", ""]
            for ratio in ABLATION_RATIOS:
                labelled = [(calib, RowSpec(model, "slimgpt", ratio, calib, options.nsamples, options.seqlen))
                            for calib in (BUILTIN_CALIB, PROSE_CALIB)]
                parts.append(tables.variants(f"{100 * ratio:.0f}%", model, labelled))
        if "fig3" in options.tables:
            parts += ["## Figure 3: calibration samples and sequence length at 50%", ""]
            labelled = [(f"{axis} {value}", fig3_row(model, options, axis, value))
                        for axis in ("nsamples", "seqlen") for value in fig3_values(getattr(options, axis))]
            parts.append(tables.variants("50%", model, labelled))
            if (path := figures.get(f"fig3 {model}")) is not None:
                parts += [f"![Figure 3 {model}]({path.relative_to(out) if path.is_relative_to(out) else path})", ""]
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


if __name__ == "__main__":
    sys.exit(main())
