"""Figures of the SlimGPT paper, drawn from evaluation results.

- kept ratio of heads and FFN channels per layer (paper Fig. 4);
- per-layer output error against the dense model (paper Fig. 2);
- perplexity against pruning ratio, one line per method.

matplotlib is an optional extra, imported only here and only when a plot is drawn. Figures are made
with ``matplotlib.figure.Figure`` and the Agg canvas directly, not pyplot, so drawing changes no global
backend or figure registry of the caller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from slimgpt.errors import ConfigError, SlimGPTError

DPI = 150


def _new_figure(width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise SlimGPTError("plots need matplotlib: pip install slimgpt[plot]") from error
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Any, path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=DPI, format="png")
    return target


def _plain_log_labels(axes: Any, values: Sequence[float]) -> None:
    """Label a log axis 20, 30, 50 rather than 2x10^1: perplexities are read as plain numbers.

    Over a narrow range every minor tick gets a label; over more than about a decade only 1, 2, 5
    times a power of ten do, so the labels never overlap.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    formatter = FuncFormatter(lambda value, _: f"{value:g}")
    axes.yaxis.set_major_formatter(formatter)
    positive = [value for value in values if value > 0]
    if positive and math.log10(max(positive) / min(positive)) <= 1.0:
        axes.yaxis.set_minor_formatter(formatter)
    else:
        axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axes.yaxis.set_minor_formatter(NullFormatter())


def plot_kept_ratio(layers: Sequence[Mapping[str, int]], path: str | Path, title: str | None = None) -> Path:
    """Bar chart of the fraction of heads and FFN channels kept in each layer (paper Fig. 4).

    layers: one dict per layer, ``{"layer", "heads_kept", "heads_total", "ffn_kept", "ffn_total"}``.
    """
    if not layers:
        raise ConfigError("plot_kept_ratio needs at least one layer")
    ordered = sorted(layers, key=lambda item: item["layer"])
    index = [int(item["layer"]) for item in ordered]
    heads = [item["heads_kept"] / item["heads_total"] for item in ordered]
    ffn = [item["ffn_kept"] / item["ffn_total"] for item in ordered]
    figure, axes = _new_figure(max(6.0, 0.25 * len(index) + 3), 4.0)
    width = 0.4
    axes.bar([i - width / 2 for i in index], heads, width, label="attention heads", color="#4C72B0")
    axes.bar([i + width / 2 for i in index], ffn, width, label="FFN channels", color="#DD8452")
    axes.set_xlabel("layer")
    axes.set_ylabel("fraction kept")
    axes.set_ylim(0, 1.15)  # headroom above 1.0 for the legend
    axes.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes.set_xticks(index)
    axes.tick_params(axis="x", labelsize=8 if len(index) > 24 else 10)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(loc="upper right", ncols=2)
    axes.set_title(title or "Kept ratio per layer")
    return _save(figure, path)


def plot_layer_error(
    errors: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str | None = None,
    ylabel: str = "output error vs dense",
    log_scale: bool | None = None,
) -> Path:
    """Per-layer output error of one or more pruned models against the dense one (paper Fig. 2).

    errors: model label -> one error per layer. The y axis is logarithmic when the values span more
    than two decades (errors typically grow by orders of magnitude with depth), unless ``log_scale``
    says otherwise.
    """
    if not errors or not any(errors.values()):
        raise ConfigError("plot_layer_error needs at least one model with per-layer errors")
    figure, axes = _new_figure()
    for label, values in errors.items():
        axes.plot(range(len(values)), list(values), marker="o", markersize=3, label=label)
    positive = [value for values in errors.values() for value in values if value > 0]
    if log_scale is None:
        log_scale = bool(positive) and max(positive) / min(positive) > 100
    if log_scale:
        axes.set_yscale("log")
    axes.set_xlabel("layer")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(title or "Per-layer output error")
    return _save(figure, path)


def plot_ppl_vs_ratio(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str | None = None,
    dataset: str = "",
) -> Path:
    """Perplexity against pruning ratio, one line per method, on a log y axis.

    curves: method -> [(pruning ratio in [0, 1), perplexity), ...]; points are sorted by ratio.
    """
    if not curves or not any(curves.values()):
        raise ConfigError("plot_ppl_vs_ratio needs at least one method with points")
    figure, axes = _new_figure()
    for method, points in curves.items():
        ordered = sorted(points)
        axes.plot(
            [100 * ratio for ratio, _ in ordered], [ppl for _, ppl in ordered], marker="o", label=method
        )
    axes.set_yscale("log")
    _plain_log_labels(axes, [ppl for points in curves.values() for _, ppl in points])
    axes.set_xlabel("pruning ratio (% of parameters removed)")
    axes.set_ylabel(f"perplexity{f' ({dataset})' if dataset else ''}")
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    axes.set_title(title or "Perplexity against pruning ratio")
    return _save(figure, path)
