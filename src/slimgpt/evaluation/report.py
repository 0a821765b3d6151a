"""The evaluation report: one object per model, saved as JSON, rendered as Markdown.

Results are objects, never scraped from logs. A report carries the versions of the libraries that
produced it, because lm-eval and transformers releases move the numbers. The Markdown of each section
is in ``markdown.py``; the side-by-side table of several reports (``compare``) is here.
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
from slimgpt.evaluation.markdown import (
    MISSING,
    format_bytes,
    format_count,
    format_percent,
    format_ppl,
    markdown_table,
    perplexity_section,
    speed_section,
    zero_shot_section,
)
from slimgpt.evaluation.ppl import PerplexityResult
from slimgpt.evaluation.speed import SpeedResult

REPORT_FORMAT = "slimgpt.eval_report"
REPORT_VERSION = 1
VERSIONED_PACKAGES = ("slimgpt", "torch", "transformers", "lm_eval", "datasets")


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
        if not isinstance(data, Mapping) or data.get("format") != REPORT_FORMAT:
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
        except IsADirectoryError as error:
            raise DataError(f"{path} is a folder: pass the report files written by `slimgpt eval --json`") from error
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
    parts += perplexity_section(report.perplexities)
    parts += zero_shot_section(report.zero_shot)
    parts += speed_section(report.speed)
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
    header = ["", *(_column_name(report, index) for index, report in enumerate(reports))]
    rows = _size_rows(reports) + _ppl_rows(reports) + _zero_shot_rows(reports) + _speed_rows(reports)
    parts = [markdown_table(header, rows), ""]
    parts += _compare_notes(reports)
    return "\n".join(parts)


def _size_rows(reports: Sequence[EvalReport]) -> list[list[str]]:
    first = reports[0]
    return [
        ["method", *(report.method or ("dense" if report.pruning_ratio == 0 else MISSING) for report in reports)],
        ["parameters", *(format_count(r.n_parameters) + _relative(r.n_parameters, first.n_parameters)
                         for r in reports)],
        ["weights", *(format_bytes(r.weight_bytes) + _relative(r.weight_bytes, first.weight_bytes) for r in reports)],
    ]


def _ppl_rows(reports: Sequence[EvalReport]) -> list[list[str]]:
    rows = []
    for dataset, protocol in _ordered_unique((p.dataset, p.protocol) for r in reports for p in r.perplexities):
        cells = []
        for report in reports:
            found = next(
                (p for p in report.perplexities if (p.dataset, p.protocol) == (dataset, protocol)), None
            )
            cells.append(MISSING if found is None else format_ppl(found.value))
        rows.append([f"PPL {dataset}, {protocol}", *cells])
    return rows


def _zero_shot_rows(reports: Sequence[EvalReport]) -> list[list[str]]:
    rows = []
    for name in _ordered_unique(t.name for r in reports if r.zero_shot for t in r.zero_shot.tasks):
        cells = []
        for report in reports:
            score = report.zero_shot.score(name) if report.zero_shot else None
            cells.append(MISSING if score is None else _score_cell(score.acc, score.acc_norm))
        rows.append([f"{name} acc / acc_norm (%)", *cells])
    if any(r.zero_shot is not None and r.zero_shot.average is not None for r in reports):
        rows.append(["average, acc_norm else acc (%)", *(_average_cell(r, "average") for r in reports)])
        rows.append(["average, acc (%)", *(_average_cell(r, "average_acc") for r in reports)])
    return rows


def _speed_rows(reports: Sequence[EvalReport]) -> list[list[str]]:
    if not any(r.speed is not None for r in reports):
        return []
    first_speed = reports[0].speed
    first_peak = first_speed.peak_memory_bytes if first_speed else None
    return [
        ["prefill (tokens/s)", *(_speed_cell(r, "prefill_tokens_per_s", None) for r in reports)],
        ["decode (tokens/s)", *(_speed_cell(r, "decode_tokens_per_s", None) for r in reports)],
        ["generate (s)", *(_speed_cell(r, "generate_seconds", first_speed) for r in reports)],
        [
            "peak memory",
            *(
                MISSING
                if r.speed is None
                else format_bytes(r.speed.peak_memory_bytes) + _relative(r.speed.peak_memory_bytes, first_peak)
                for r in reports
            ),
        ],
    ]


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
