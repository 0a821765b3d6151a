"""Markdown for evaluation results: number formats, tables, and one section per kind of result."""

from __future__ import annotations

from collections.abc import Sequence

from slimgpt.evaluation.harness import ZeroShotResult
from slimgpt.evaluation.ppl import PerplexityResult
from slimgpt.evaluation.speed import SpeedResult

MISSING = "–"


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


def perplexity_section(perplexities: Sequence[PerplexityResult]) -> list[str]:
    """The perplexity table of one model, as lines (none when nothing was measured)."""
    if not perplexities:
        return []
    rows = [
        [r.dataset, r.protocol, format_ppl(r.value), str(r.n_windows), f"{r.n_tokens:,}"]
        for r in perplexities
    ]
    return [
        "### Perplexity",
        "",
        markdown_table(["dataset", "protocol", "PPL", "windows", "tokens"], rows),
        "",
    ]


def zero_shot_section(zs: ZeroShotResult | None) -> list[str]:
    """The zero-shot table of one model with its notes (task source, average convention, limit)."""
    if zs is None:
        return []
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
    notes = [f"tasks: {zs.task_source}; lm-eval {zs.lm_eval_version}"]
    if zs.average is not None:
        notes.append(
            f"average over {', '.join(zs.average_tasks)}: acc_norm column = {zs.average_convention}; "
            "acc column = mean of acc"
        )
    if zs.limit is not None:
        notes.append(f"limited to {zs.limit} documents per task: not comparable with published numbers")
    return [
        "### Zero-shot accuracy (%)",
        "",
        markdown_table(["task", "shots", "acc", "acc_norm", "n"], rows),
        "",
        *(f"- {note}" for note in notes),
        "",
    ]


def speed_section(s: SpeedResult | None) -> list[str]:
    """The speed and memory table of one model, with how it was measured."""
    if s is None:
        return []
    rows = [
        ["prefill (tokens/s)", f"{s.prefill_tokens_per_s:.1f} ± {s.prefill_tokens_per_s_std:.1f}"],
        ["decode (tokens/s)", f"{s.decode_tokens_per_s:.1f} ± {s.decode_tokens_per_s_std:.1f}"],
        [
            f"generate {s.gen_tokens} tokens (s)",
            f"{s.generate_seconds:.3f} ± {s.generate_seconds_std:.3f}",
        ],
        ["peak memory", format_bytes(s.peak_memory_bytes)],
    ]
    return [
        "### Speed and memory",
        "",
        markdown_table(["measure", "mean ± std"], rows),
        "",
        f"- {s.device}, {s.dtype}, batch {s.batch_size}, prompt {s.prompt_tokens} tokens, "
        f"{s.runs} runs after {s.warmup} warm-up",
        f"- peak memory: {s.peak_memory_note}",
        "",
    ]
