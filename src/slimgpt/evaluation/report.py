"""The evaluation report: one object per model, saved as JSON, rendered as Markdown.

Results are objects, never scraped from logs (style guide). A report carries the versions of the
libraries that produced it, because lm-eval and transformers releases move the numbers (peers.md,
complaint 5).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimgpt._util.files import write_atomic
from slimgpt._util.versions import package_version
from slimgpt.errors import DataError
from slimgpt.evaluation.harness import ZeroShotResult
from slimgpt.evaluation.ppl import PerplexityResult
from slimgpt.evaluation.speed import SpeedResult

REPORT_FORMAT = "slimgpt.eval_report"
REPORT_VERSION = 1
VERSIONED_PACKAGES = ("slimgpt", "torch", "transformers", "lm_eval", "datasets")
MISSING = "–"


@dataclass(frozen=True)
class LayerWidths:
    """Surviving attention heads and FFN channels of one decoder layer (for the kept-ratio plot)."""

    layer: int
    heads_kept: int
    heads_total: int
    ffn_kept: int
    ffn_total: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerWidths:
        return cls(
            **{key: int(data[key]) for key in ("layer", "heads_kept", "heads_total", "ffn_kept", "ffn_total")}
        )


@dataclass(frozen=True)
class EvalReport:
    """Everything measured on one model.

    model: the name or path it was loaded from. method / pruning_ratio: how it was made, when known
    (they group the points of the perplexity-against-ratio plot); a dense model has ratio 0.
    """

    model: str
    n_parameters: int
    weight_bytes: int
    dtype: str
    device: str
    perplexities: tuple[PerplexityResult, ...] = ()
    zero_shot: ZeroShotResult | None = None
    speed: SpeedResult | None = None
    method: str | None = None
    pruning_ratio: float | None = None
    layers: tuple[LayerWidths, ...] | None = None
    versions: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "format_version": REPORT_VERSION,
            "model": self.model,
            "n_parameters": self.n_parameters,
            "weight_bytes": self.weight_bytes,
            "dtype": self.dtype,
            "device": self.device,
            "method": self.method,
            "pruning_ratio": self.pruning_ratio,
            "perplexities": [result.to_dict() for result in self.perplexities],
            "zero_shot": None if self.zero_shot is None else self.zero_shot.to_dict(),
            "speed": None if self.speed is None else self.speed.to_dict(),
            "layers": None if self.layers is None else [layer.to_dict() for layer in self.layers],
            "versions": dict(self.versions),
        }

    def to_json(self) -> str:
        # A broken model's perplexity can be inf or NaN; Python's json writes and reads those back.
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        if data.get("format") != REPORT_FORMAT:
            raise DataError("not a slimgpt evaluation report (no 'format': 'slimgpt.eval_report')")
        if int(data.get("format_version", 0)) > REPORT_VERSION:
            raise DataError(
                f"report format version {data['format_version']} is newer than this slimgpt reads "
                f"({REPORT_VERSION}): upgrade slimgpt"
            )
        return cls(
            model=str(data["model"]),
            n_parameters=int(data["n_parameters"]),
            weight_bytes=int(data["weight_bytes"]),
            dtype=str(data["dtype"]),
            device=str(data["device"]),
            method=data.get("method"),
            pruning_ratio=None if data.get("pruning_ratio") is None else float(data["pruning_ratio"]),
            perplexities=tuple(PerplexityResult.from_dict(item) for item in data.get("perplexities", [])),
            zero_shot=None if data.get("zero_shot") is None else ZeroShotResult.from_dict(data["zero_shot"]),
            speed=None if data.get("speed") is None else SpeedResult.from_dict(data["speed"]),
            layers=None
            if data.get("layers") is None
            else tuple(LayerWidths.from_dict(item) for item in data["layers"]),
            versions={str(key): str(value) for key, value in data.get("versions", {}).items()},
        )

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        """Read a report file; a missing or malformed file is a one-line DataError."""
        try:
            return cls.from_json(Path(path).read_text())
        except FileNotFoundError as error:
            raise DataError(f"{path}: no such report file") from error
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise DataError(f"{path}: not a valid slimgpt evaluation report ({error})") from error

    def save(self, path: str | Path) -> Path:
        """Write the JSON atomically: a temporary file in the same directory, then os.replace."""
        return write_atomic(Path(path), self.to_json())

    def to_markdown(self) -> str:
        return render_markdown(self)


def library_versions() -> dict[str, str]:
    """Installed versions of the packages that change the numbers; "not installed" when absent."""
    return {package: package_version(package) for package in VERSIONED_PACKAGES}


# ---------------------------------------------------------------------------------------- Markdown


def format_count(value: float) -> str:
    """1234567 -> "1.23M": parameter counts read at a glance."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def format_bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def format_percent(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.2f}"


def format_ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: EvalReport) -> str:
    """One model's report: size, perplexities, zero-shot and speed tables, then versions."""
    parts = [f"## {report.model}", ""]
    facts = [
        f"parameters: {format_count(report.n_parameters)} ({report.n_parameters:,})",
        f"weights: {format_bytes(report.weight_bytes)} ({report.dtype})",
        f"device: {report.device}",
    ]
    if report.method is not None:
        ratio = "" if report.pruning_ratio is None else f" at {100 * report.pruning_ratio:.0f}%"
        facts.append(f"method: {report.method}{ratio}")
    parts += [f"- {fact}" for fact in facts] + [""]

    if report.perplexities:
        rows = [
            [r.dataset, r.protocol, format_ppl(r.value), str(r.n_windows), f"{r.n_tokens:,}"]
            for r in report.perplexities
        ]
        parts += [
            "### Perplexity",
            "",
            markdown_table(["dataset", "protocol", "PPL", "windows", "tokens"], rows),
            "",
        ]

    if report.zero_shot is not None:
        zs = report.zero_shot
        rows = [
            [
                t.name,
                str(t.num_fewshot),
                format_percent(t.acc),
                format_percent(t.acc_norm),
                str(t.n_samples) if t.n_samples is not None else MISSING,
            ]
            for t in zs.tasks
        ]
        if zs.average is not None:
            rows.append(
                [
                    f"**average** ({len(zs.average_tasks)} task{'s' if len(zs.average_tasks) != 1 else ''})",
                    "",
                    format_percent(zs.average_acc),
                    format_percent(zs.average),
                    "",
                ]
            )
        parts += [
            "### Zero-shot accuracy (%)",
            "",
            markdown_table(["task", "shots", "acc", "acc_norm", "n"], rows),
            "",
        ]
        notes = [f"tasks: {zs.task_source}; lm-eval {zs.lm_eval_version}"]
        if zs.average is not None:
            notes.append(
                f"average over {', '.join(zs.average_tasks)}: acc_norm column = {zs.average_convention}; "
                "acc column = mean of acc"
            )
        if zs.limit is not None:
            notes.append(f"limited to {zs.limit} documents per task: not comparable with published numbers")
        parts += [f"- {note}" for note in notes] + [""]

    if report.speed is not None:
        s = report.speed
        rows = [
            ["prefill (tokens/s)", f"{s.prefill_tokens_per_s:.1f} ± {s.prefill_tokens_per_s_std:.1f}"],
            ["decode (tokens/s)", f"{s.decode_tokens_per_s:.1f} ± {s.decode_tokens_per_s_std:.1f}"],
            [
                f"generate {s.gen_tokens} tokens (s)",
                f"{s.generate_seconds:.3f} ± {s.generate_seconds_std:.3f}",
            ],
            ["peak memory", format_bytes(s.peak_memory_bytes)],
        ]
        parts += [
            "### Speed and memory",
            "",
            markdown_table(["measure", "mean ± std"], rows),
            "",
            f"- {s.device}, {s.dtype}, batch {s.batch_size}, prompt {s.prompt_tokens} tokens, "
            f"{s.runs} runs after {s.warmup} warm-up",
            f"- peak memory: {s.peak_memory_note}",
            "",
        ]

    if report.versions:
        parts += [
            "versions: " + ", ".join(f"{name} {version}" for name, version in report.versions.items()),
            "",
        ]
    return "\n".join(parts)


def _relative(value: float, reference: float | None) -> str:
    return "" if not reference else f" ({100 * value / reference:.0f}%)"


def compare(reports: Sequence[EvalReport]) -> str:
    """Markdown with one column per model and one row per measure.

    Measures are many and models few, so models go across. Size, latency and memory rows also give
    each model's value as a percentage of the first model's (put the dense model first), which is how
    the SlimGPT paper's Table 4 reads. A model that lacks a measure shows "–".
    """
    if not reports:
        raise DataError("compare needs at least one report")
    first = reports[0]
    header = ["", *(_column_name(report, index) for index, report in enumerate(reports))]
    rows: list[list[str]] = []

    def add(label: str, cells: Sequence[str]) -> None:
        rows.append([label, *cells])

    add(
        "method", [report.method or ("dense" if report.pruning_ratio == 0 else MISSING) for report in reports]
    )
    add(
        "parameters",
        [format_count(r.n_parameters) + _relative(r.n_parameters, first.n_parameters) for r in reports],
    )
    add(
        "weights",
        [format_bytes(r.weight_bytes) + _relative(r.weight_bytes, first.weight_bytes) for r in reports],
    )

    ppl_keys = _ordered_unique((p.dataset, p.protocol) for r in reports for p in r.perplexities)
    for dataset, protocol in ppl_keys:
        cells = []
        for report in reports:
            found = next(
                (p for p in report.perplexities if (p.dataset, p.protocol) == (dataset, protocol)), None
            )
            cells.append(MISSING if found is None else format_ppl(found.value))
        add(f"PPL {dataset}, {protocol}", cells)

    task_names = _ordered_unique(t.name for r in reports if r.zero_shot for t in r.zero_shot.tasks)
    for name in task_names:
        cells = []
        for report in reports:
            score = report.zero_shot.score(name) if report.zero_shot else None
            cells.append(MISSING if score is None else _score_cell(score.acc, score.acc_norm))
        add(f"{name} acc / acc_norm (%)", cells)
    if any(r.zero_shot is not None and r.zero_shot.average is not None for r in reports):
        add("average, acc_norm else acc (%)", [_average_cell(r, "average") for r in reports])
        add("average, acc (%)", [_average_cell(r, "average_acc") for r in reports])

    first_speed = first.speed
    if any(r.speed is not None for r in reports):
        add("prefill (tokens/s)", [_speed_cell(r, "prefill_tokens_per_s", None) for r in reports])
        add("decode (tokens/s)", [_speed_cell(r, "decode_tokens_per_s", None) for r in reports])
        add("generate (s)", [_speed_cell(r, "generate_seconds", first_speed) for r in reports])
        add(
            "peak memory",
            [
                MISSING
                if r.speed is None
                else format_bytes(r.speed.peak_memory_bytes)
                + _relative(r.speed.peak_memory_bytes, first_speed.peak_memory_bytes if first_speed else None)
                for r in reports
            ],
        )

    parts = [markdown_table(header, rows), ""]
    parts += _compare_notes(reports)
    return "\n".join(parts)


def _column_name(report: EvalReport, index: int) -> str:
    name = Path(report.model).name or report.model
    return f"{name} [{index + 1}]"


def _ordered_unique(items: Any) -> list[Any]:
    return list(dict.fromkeys(items))


def _score_cell(acc: float, acc_norm: float | None) -> str:
    return f"{100 * acc:.2f} / {format_percent(acc_norm)}"


def _average_cell(report: EvalReport, attribute: str) -> str:
    if report.zero_shot is None:
        return MISSING
    value = getattr(report.zero_shot, attribute)
    return format_percent(value) if value is not None else MISSING


def _speed_cell(report: EvalReport, attribute: str, reference: SpeedResult | None) -> str:
    if report.speed is None:
        return MISSING
    mean = getattr(report.speed, attribute)
    std = getattr(report.speed, attribute + "_std")
    digits = 3 if attribute == "generate_seconds" else 1
    relative = _relative(mean, getattr(reference, attribute)) if reference is not None else ""
    return f"{mean:.{digits}f} ± {std:.{digits}f}{relative}"


def _compare_notes(reports: Sequence[EvalReport]) -> list[str]:
    """Footnotes: which model each column is, and every way the columns differ in how they were measured."""
    notes = [f"- [{index + 1}] {report.model}" for index, report in enumerate(reports)]
    averages = {
        tuple(r.zero_shot.average_tasks) for r in reports if r.zero_shot and r.zero_shot.average is not None
    }
    if len(averages) > 1:
        notes.append("- warning: the zero-shot averages are over different task sets; do not compare them")
    sources = {r.zero_shot.task_source for r in reports if r.zero_shot}
    if len(sources) > 1:
        notes.append("- warning: zero-shot tasks come from different sources: " + "; ".join(sorted(sources)))
    if any(r.zero_shot and r.zero_shot.limit is not None for r in reports):
        notes.append("- some zero-shot results use --limit: not comparable with published numbers")
    setups = {
        (s.device, s.dtype, s.batch_size, s.prompt_tokens, s.gen_tokens) for r in reports if (s := r.speed)
    }
    if len(setups) > 1:
        notes.append(
            "- warning: speed was measured in different setups (device, dtype, batch, prompt, tokens)"
        )
    versions = {tuple(sorted(r.versions.items())) for r in reports if r.versions}
    if len(versions) > 1:
        notes.append("- note: the reports were made with different library versions")
    return notes
