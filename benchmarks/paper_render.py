"""The paper tables' Markdown, claims (HELD / NOT HELD) and figures, from the finished rows (``paper_tables.py``)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paper_plan import (
    ABLATION_RATIOS,
    ABLATIONS,
    AUTO_ROW,
    BASELINES,
    LABELS,
    PAPER_METHODS,
    SHORT_WINDOW,
    Options,
    Plan,
    RowSpec,
    base_row,
    calib_row,
    fig3_row,
    fig3_values,
    gqa_row,
    model_label,
    schedule_row,
    with_options,
)

from slimgpt.config import GQA_POLICIES, PruneConfig
from slimgpt.evaluation import plot_ppl_vs_ratio
from slimgpt.evaluation.report import format_count, format_ppl, markdown_table
from slimgpt.solver.schedule import SCHEDULES


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def ppl_of(row: Mapping[str, Any] | None, seqlen: int) -> float | None:
    if row is None or str(seqlen) not in row["ppl"]:
        return None
    return float(row["ppl"][str(seqlen)]["value"])


def _num(value: float | None) -> str:
    return "–" if value is None else format_ppl(value)


def method_label(method: str) -> str:
    return LABELS.get(method, method)


class Tables:
    """Renders the Markdown of every table from the finished rows.

    lengths: each model's perplexity windows; tasks: each model's zero-shot task names.
    """

    def __init__(self, rows: Mapping[str, Mapping[str, Any]], lengths: Mapping[str, tuple[int, ...]],
                 tasks: Mapping[str, tuple[str, ...]]) -> None:
        self.rows = rows
        self.lengths = lengths
        self.tasks = tasks

    def get(self, spec: RowSpec) -> Mapping[str, Any] | None:
        return self.rows.get(spec.key)

    def header(self, model: str, first: str) -> list[str]:
        return [first, "ratio", "realised", "params", *[f"PPL {n}" for n in self.lengths[model]],
                *[f"{name} acc / acc_norm" for name in self.tasks[model]], "avg", "prune s", "prune MiB", "row s"]

    def line(self, spec: RowSpec, label: str) -> list[str]:
        row = self.get(spec)
        ratio = "0%" if spec.method == "dense" else f"{100 * spec.ratio:.0f}%"
        dims = ((row or {}).get("prune") or {}).get("schedule", {}).get("slice_dims")
        if dims:  # SliceGPT's own ratio: the hidden width it keeps
            label += f" (width {min(dims[:-1] or dims)}..{max(dims[:-1] or dims)}/{dims[-1]})" \
                if len(set(dims[:-1])) > 1 else f" (width {dims[0]}/{dims[-1]})"
        if row is None:
            return [label, ratio, *["–"] * (len(self.header(spec.model, "")) - 2)]
        ppl = [ppl_of(row, n) for n in self.lengths[spec.model]]
        return [label, ratio, f"{100 * row['realised_ratio']:.1f}%", format_count(row["parameters"]),
                *[_num(v) for v in ppl], *self.task_cells(spec.model, row), f"{row['prune_s']:.1f}",
                memory_cell(row), f"{row['wall_s']:.1f}"]

    def task_cells(self, model: str, row: Mapping[str, Any]) -> list[str]:
        """acc / acc_norm per task, then the average (acc_norm where reported, as lm-eval's papers do)."""
        if not row.get("zero_shot"):
            return ["–"] * (len(self.tasks[model]) + 1)
        scores = {task["name"]: task for task in row["zero_shot"]["tasks"]}
        cells = []
        for name in self.tasks[model]:
            task = scores.get(name)
            norm = None if task is None else task.get("acc_norm")
            cells.append("–" if task is None else pct(task["acc"]) + ("" if norm is None else f" / {pct(norm)}"))
        average = row["zero_shot"].get("average")
        return [*cells, "–" if average is None else pct(average)]

    def table1(self, plan: Plan, options: Options, failures: Mapping[str, str]) -> str:
        parts = ["## Table 1: every method at the same count of decoder parameters", ""]
        for model in options.models:
            specs = {spec.key for spec in plan.rows.get(model, [])}
            lines = [self.line(RowSpec(model, "dense"), "dense")]
            ratios = sorted({spec.ratio for spec in plan.rows.get(model, []) if spec.method != "dense"})
            for ratio in ratios:
                for method in plan.methods:
                    spec = base_row(model, options, ratio, method)
                    if spec.key in specs:
                        line = self.line(spec, method_label(method))
                        if self.get(spec) is None and spec.key in failures:
                            line[2] = f"failed: {failures[spec.key]}"
                        lines.append(line)
            parts += [f"### {model_label(model)}", "", markdown_table(self.header(model, "method"), lines), ""]
        return "\n".join(parts)

    def bits_back(self, plan: Plan, options: Options) -> str:
        """Table 1's sliced rows stored with bits-back coding: the bytes against plain safetensors."""
        lines = []
        for model in options.models:
            for spec in plan.rows.get(model, []):
                sizes = (self.get(spec) or {}).get("bits_back")
                if spec.options or not sizes:
                    continue
                for dtype, size in sizes.items():
                    lines.append([model_label(model), method_label(spec.method), f"{100 * spec.ratio:.0f}%", dtype,
                                  f"{size['safetensors_bytes']:,}", f"{size['bitsback_bytes']:,}",
                                  f"{size['saved_percent']:.2f}%", f"{size['rotation_bits_returned']:,}",
                                  f"{size['correction_bits']:,}", f"{size['encode_seconds']:.1f}",
                                  f"{size['decode_seconds']:.1f}"])
        if not lines:
            return ""
        head = ["model", "method", "ratio", "precision", "safetensors bytes", "bits-back bytes", "saved",
                "rotation bits returned", "correction bits", "encode s", "decode s"]
        return "\n".join([
            "### Bits-back export of the sliced rows", "",
            "`slimgpt export --format bits-back` on each SliceGPT / dynamic-slicing row of Table 1, at the "
            "precision users ship (bfloat16) and the one the rows were pruned in (float32); the decode is "
            "checked bit for bit (SHA-256) in the same run. Byte counts are exact; times are one thread.", "",
            markdown_table(head, lines), ""])

    def variants(self, title: str, model: str, labelled: Sequence[tuple[str, RowSpec]]) -> str:
        lines = [self.line(spec, label) for label, spec in labelled]
        table = markdown_table(self.header(model, "variant"), lines)
        return "\n".join([f"### {title}: {model_label(model)}", "", table, ""])


def memory_cell(row: Mapping[str, Any]) -> str:
    memory = (row.get("prune") or {}).get("memory")
    return "–" if not memory else f"{memory['above_before'] / 2**20:,.0f}"


# --- claims --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    claim: str
    verdict: str  # HELD, HELD so far (rows missing), NOT HELD, NOT MEASURED
    evidence: str


def _verdict(ok: bool | None, partial: bool = False) -> str:
    """partial: some of the rows the claim compares with are not measured yet, so a HELD may still turn."""
    if ok is None:
        return "NOT MEASURED"
    return ("HELD so far" if partial else "HELD") if ok else "NOT HELD"


def check_claims(tables: Tables, options: Options, plan: Plan) -> list[Claim]:
    """The paper's qualitative claims, judged on the 128-token perplexity (its protocol)."""
    claims: list[Claim] = []
    if "1" in options.tables:
        for model in options.models:
            claims += claims_methods(tables, options, model, plan)
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


def _versus(tables: Tables, options: Options, model: str, ratio: float, others: Sequence[str], claim: str,
            method: str = "slimgpt") -> Claim:
    """Whether ``method``'s row has a lower 128-token perplexity than each of ``others`` at ``ratio``."""
    ours = ppl_of(tables.get(base_row(model, options, ratio, method)), SHORT_WINDOW)
    values = {m: ppl_of(tables.get(base_row(model, options, ratio, m)), SHORT_WINDOW) for m in others}
    measured = {m: v for m, v in values.items() if v is not None}
    ok = None if ours is None or not measured else all(ours < v for v in measured.values())
    missing = sorted(set(others) - set(measured))
    label = "SlimGPT" if method == "slimgpt" else method_label(method)
    pieces = [f"{label} {_num(ours)}", ", ".join(f"{method_label(m)} {_num(v)}" for m, v in measured.items()),
              f"not measured: {', '.join(missing)}" if missing else ""]
    evidence = "; ".join(piece for piece in pieces if piece)
    return Claim(f"{model_label(model)} {100 * ratio:.0f}%: {claim}", _verdict(ok, bool(missing)), evidence)


def claims_methods(tables: Tables, options: Options, model: str, plan: Plan) -> list[Claim]:
    """Table 1: SlimGPT has a lower perplexity than every baseline at 20% and at 50%; and (beyond the
    paper, informative only) than every peer method this package also implements; and whether SlimGPT
    with ``--schedule auto`` (this package's own schedule, not a peer) is lower than every other method."""
    peers = [m for m in plan.methods if m not in PAPER_METHODS and m != AUTO_ROW]
    claims = [_versus(tables, options, model, ratio, BASELINES, "SlimGPT has a lower PPL than every baseline")
              for ratio in ABLATION_RATIOS]
    if peers:
        claims += [_versus(tables, options, model, ratio, peers,
                           "SlimGPT has a lower PPL than every peer method (beyond the paper)")
                   for ratio in ABLATION_RATIOS]
    if AUTO_ROW in plan.methods:
        others = [m for m in plan.methods if m != AUTO_ROW]
        claims += [_versus(tables, options, model, ratio, others,
                           "SlimGPT auto has a lower PPL than every other method (beyond the paper)", AUTO_ROW)
                   for ratio in ABLATION_RATIOS]
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
    protocol = options.protocol(model)
    own, other = protocol.calib, protocol.alt_calib
    claims = []
    for ratio in ABLATION_RATIOS:
        mine, theirs = (ppl_of(tables.get(calib_row(model, options, ratio, c)), SHORT_WINDOW) for c in (own, other))
        ok = None if mine is None or theirs is None else mine < theirs
        claims.append(Claim(f"{model_label(model)} {100 * ratio:.0f}%: calibration on the evaluation's domain ({own}) "
                            f"gives a lower PPL than {other} (Table 14's C4-better-PPL, by analogy)",
                            _verdict(ok), f"{own} {_num(mine)} vs {other} {_num(theirs)}"))
    return claims


def claims_fig3(tables: Tables, options: Options, model: str) -> list[Claim]:
    """Figure 3: more calibration samples, and longer ones, give a lower perplexity."""
    claims = []
    _, nsamples, seqlen = options.calibration(model)
    for axis, what, full in (("nsamples", "samples", nsamples), ("seqlen", "tokens per sample", seqlen)):
        values = fig3_values(full)
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


def gqa_verdict(tables: Tables, options: Options, model: str) -> str:
    """Which GQA policy gives the lower PPL in most measured (ratio, window) cells, against the default."""
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
    default = PruneConfig().gqa_policy
    best = max(wins, key=lambda p: wins[p])
    if sorted(wins.values())[-1] == sorted(wins.values())[-2]:
        return (f"neither policy has the lower perplexity in most (ratio, window) cells ({wins[best]} of {measured} "
                f"each); the default is `{default}` (`docs/method.md`, GQA)")
    lead = f"**{best}** has the lower perplexity in {wins[best]} of {measured} (ratio, window) cells"
    if best == default:
        return f"{lead}: the default (`gqa_policy = {default}`)"
    return (f"{lead}; the default stays `{default}` (`docs/method.md`, GQA, says why), so pass "
            f"`--gqa-policy {best}` for the lower perplexity on this model")


# --- figures -------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return "".join(char if char.isalnum() or char == "-" else "_" for char in Path(text).name or text)


def draw_figures(tables: Tables, plan: Plan, options: Options, out: Path, stem: str) -> dict[str, Path]:
    """PPL against ratio per model (Table 1) and Figure 3; only figures whose rows exist."""
    figures: dict[str, Path] = {}
    if "1" in options.tables:
        for model in options.models:
            curves: dict[str, list[tuple[float, float]]] = {}
            for method in plan.methods:
                for ratio in sorted({s.ratio for s in plan.rows.get(model, []) if s.method != "dense"}):
                    row = tables.get(base_row(model, options, ratio, method))
                    if row is not None and (value := ppl_of(row, SHORT_WINDOW)) is not None:
                        curves.setdefault(method_label(method), []).append((row["realised_ratio"], value))
            dense = ppl_of(tables.get(RowSpec(model, "dense")), SHORT_WINDOW)
            if dense is not None:
                curves = {method: [(0.0, dense), *points] for method, points in curves.items()}
            if curves:
                path = out / f"{stem}_ppl_vs_ratio_{_slug(model)}.png"
                title = f"{model_label(model)}: held-out PPL ({SHORT_WINDOW}-token windows)"
                figures[f"ppl_vs_ratio {model}"] = plot_ppl_vs_ratio(curves, path, title=title, dataset="held-out")
    if "fig3" in options.tables:
        for model in options.ablation_models:
            _, nsamples, seqlen = options.calibration(model)
            series: dict[str, dict[int, dict[int, float]]] = {"nsamples": {}, "seqlen": {}}
            for axis, full in (("nsamples", nsamples), ("seqlen", seqlen)):
                for value in fig3_values(full):
                    row = tables.get(fig3_row(model, options, axis, value))
                    for n in tables.lengths[model]:
                        if (ppl := ppl_of(row, n)) is not None:
                            series[axis].setdefault(n, {})[value] = ppl
            if series["nsamples"] and series["seqlen"]:
                figures[f"fig3 {model}"] = plot_fig3(model, series, out / f"{stem}_fig3_{_slug(model)}.png")
    return figures


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
