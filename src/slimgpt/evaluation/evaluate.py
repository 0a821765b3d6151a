"""One call that measures a model the way the papers do and returns an ``EvalReport``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from slimgpt.errors import UnsupportedModelError
from slimgpt.evaluation.harness import DEFAULT_FEWSHOT, TaskSuite, ZeroShotResult, load_tasks, zero_shot
from slimgpt.evaluation.plots import plot_kept_ratio, plot_ppl_vs_ratio
from slimgpt.evaluation.ppl import (
    PerplexityResult,
    evaluate_perplexity,
    model_context,
    window_protocol,
)
from slimgpt.evaluation.report import EvalReport, LayerWidths, library_versions
from slimgpt.evaluation.speed import SpeedResult, count_parameters, measure_speed, weight_bytes
from slimgpt.models.families import get_adapter

logger = logging.getLogger(__name__)

# The two window protocols of the literature (128 and 2048 tokens): never compare numbers across them.
DEFAULT_SEQLENS = (128, 2048)


def layer_widths(model: Any) -> tuple[LayerWidths, ...] | None:
    """Heads and FFN channels kept per layer, against the widths the config declares for the family.

    None when slimgpt has no adapter for the model (the kept-ratio plot is then skipped). A pruned
    ``slimgpt_<family>`` config keeps the dense widths in its stock fields and the pruned ones in
    per-layer lists, so the stock fields are the totals.
    """
    config = model.config
    try:
        adapter = get_adapter(config)
    except UnsupportedModelError:
        return None
    heads_total = int(config.num_attention_heads)
    ffn_total = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
    if ffn_total is None:
        return None
    widths = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        sizes = adapter.layer_sizes(layer)
        widths.append(LayerWidths(index, sizes.n_heads, heads_total, sizes.ffn_dim, int(ffn_total)))
    return tuple(widths)


@dataclass(frozen=True)
class EvalOptions:
    """What ``evaluate_model`` measures and how; every part left empty is skipped.

    Perplexity: ``ppl_datasets`` (names ``slimgpt.data`` knows, or paths) at each of ``seqlens``, on at
    most ``max_windows`` windows. Zero-shot: ``tasks`` (names, or a ``TaskSuite`` already loaded with
    ``load_tasks``, as the CLI does before loading the model), from ``tasks_dir`` when given, with
    ``fewshot`` examples per task and at most ``limit`` documents. Speed (when ``speed``): ``runs`` timed
    runs after ``warmup`` untimed ones, ``prompt_tokens`` in, ``gen_tokens`` out. ``batch_size`` applies
    to all three; ``device`` defaults to where the model's parameters are. ``method`` / ``pruning_ratio``
    say how the model was made (for the report and its plots).
    """

    ppl_datasets: Sequence[str] = ()
    seqlens: Sequence[int] = DEFAULT_SEQLENS
    tasks: Sequence[str] | TaskSuite = ()
    tasks_dir: str | Path | None = None
    fewshot: Mapping[str, int] = field(default_factory=lambda: DEFAULT_FEWSHOT)
    limit: int | None = None
    max_windows: int | None = None
    speed: bool = False
    gen_tokens: int = 512
    prompt_tokens: int = 128
    runs: int = 3
    warmup: int = 1
    batch_size: int = 1
    device: str | torch.device | None = None
    method: str | None = None
    pruning_ratio: float | None = None


def evaluate_model(
    model: Any, tokenizer: Any, name: str, options: EvalOptions | None = None, **overrides: Any
) -> EvalReport:
    """Perplexity on each dataset and window length, zero-shot tasks and speed; what is empty is skipped.

    ``options`` (default ``EvalOptions()``) says what to measure; keyword ``overrides`` replace its
    fields, so ``evaluate_model(model, tokenizer, name, ppl_datasets=["builtin"], speed=True)`` works
    too. Task names are resolved and their data loaded first, so that a missing dataset fails before
    minutes of perplexity.
    """
    opts = replace(options or EvalOptions(), **overrides)
    first = next(model.parameters())
    device = torch.device(opts.device) if opts.device is not None else first.device
    if isinstance(opts.tasks, TaskSuite):
        suite: TaskSuite | None = opts.tasks
    else:
        suite = load_tasks(opts.tasks, opts.tasks_dir) if opts.tasks else None

    perplexities = _perplexities(model, tokenizer, opts, device)
    zero_shot_result: ZeroShotResult | None = None
    if suite is not None:
        zero_shot_result = zero_shot(
            model, tokenizer, suite, fewshot=opts.fewshot, batch_size=opts.batch_size, limit=opts.limit
        )
    speed_result: SpeedResult | None = None
    if opts.speed:
        speed_result = measure_speed(
            model, prompt_tokens=opts.prompt_tokens, gen_tokens=opts.gen_tokens, runs=opts.runs,
            warmup=opts.warmup, device=device,
        )
    return EvalReport(
        model=name,
        n_parameters=count_parameters(model),
        weight_bytes=weight_bytes(model),
        dtype=str(first.dtype).removeprefix("torch."),
        device=str(device),
        perplexities=tuple(perplexities),
        zero_shot=zero_shot_result,
        speed=speed_result,
        method=opts.method,
        pruning_ratio=opts.pruning_ratio,
        layers=layer_widths(model),
        versions=library_versions(),
    )


def _perplexities(model: Any, tokenizer: Any, opts: EvalOptions, device: torch.device) -> list[PerplexityResult]:
    """Each dataset at each window length; a length the model context clips to one already measured is skipped."""
    perplexities: list[PerplexityResult] = []
    context = model_context(model)
    for dataset in opts.ppl_datasets:
        measured: set[int] = set()
        for seqlen in opts.seqlens:
            used, protocol = window_protocol(seqlen, context)
            if used in measured:  # two requests clipped to the same model context: same number
                logger.info("%s: skipping %s, already measured at %d tokens", dataset, protocol, used)
                continue
            measured.add(used)
            result = evaluate_perplexity(
                model, tokenizer, dataset, seqlen, batch_size=opts.batch_size, device=device,
                max_windows=opts.max_windows,
            )
            logger.info("%s, %s: PPL %.3f", dataset, result.protocol, result.value)
            perplexities.append(result)
    return perplexities


def realised_ratios(reports: Sequence[EvalReport]) -> list[float]:
    """Fraction of parameters removed, against the largest model of the set (taken as the dense one).

    Methods are compared at the same realised parameter count, not at their nominal ratio.
    """
    reference = max(report.n_parameters for report in reports)
    return [1.0 - report.n_parameters / reference for report in reports]


def report_plots(reports: Sequence[EvalReport], directory: str | Path) -> list[Path]:
    """Draw every figure the reports support into ``directory``; return the files written.

    - ``kept_ratio_<n>.png`` for each report that knows its per-layer widths and is pruned;
    - ``ppl_vs_ratio_<dataset>_<seqlen>.png`` for each perplexity measured on two or more models,
      one line per method; the dense model (nothing removed) starts every line.
    """
    out = Path(directory)
    written: list[Path] = []
    for index, report in enumerate(reports):
        pruned = report.layers and any(
            w.heads_kept < w.heads_total or w.ffn_kept < w.ffn_total for w in report.layers
        )
        if report.layers and (pruned or len(reports) == 1):
            title = f"Kept ratio per layer: {Path(report.model).name or report.model}"
            path = out / f"kept_ratio_{index + 1}.png"
            written.append(plot_kept_ratio([w.to_dict() for w in report.layers], path, title=title))

    ratios = realised_ratios(reports) if reports else []
    keys = list(dict.fromkeys((p.dataset, p.seqlen) for r in reports for p in r.perplexities))
    for dataset, seqlen in keys:
        points: dict[str, list[tuple[float, float]]] = {}
        dense: list[tuple[float, float]] = []
        for report, ratio in zip(reports, ratios, strict=True):
            found = next((p for p in report.perplexities if (p.dataset, p.seqlen) == (dataset, seqlen)), None)
            if found is None:
                continue
            if ratio < 1e-9:
                dense.append((0.0, found.value))
            else:
                points.setdefault(report.method or "pruned", []).append((ratio, found.value))
        if len(dense) + sum(len(p) for p in points.values()) < 2:
            continue
        curves = {method: dense + values for method, values in points.items()} or {"dense": dense}
        path = out / f"ppl_vs_ratio_{_slug(dataset)}_{seqlen}.png"
        title = f"Perplexity against pruning ratio ({seqlen}-token windows)"
        written.append(plot_ppl_vs_ratio(curves, path, title=title, dataset=dataset))
    return written


def _slug(text: str) -> str:
    return "".join(char if char.isalnum() else "_" for char in Path(text).name or text)
