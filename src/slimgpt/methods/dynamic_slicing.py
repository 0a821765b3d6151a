"""Dynamic LLM slicing (Dumitru et al., EMNLP 2024 Findings) as a slimgpt method: ``--method dynamic-slicing``.

SliceGPT (slimgpt.methods.slicegpt) with a residual width of its own for every layer, set by how little
the layer changes its input:

1. Block influence, measured once on the dense model before anything is folded or sliced: capture layer
   0's inputs on the calibration windows, run the dense layers one after the other, and for every layer
   take BI_l = mean over all calibration tokens of 1 - cos(x_l, x_{l+1}), x_l being the layer's input and
   x_{l+1} its output (the next layer's input; for the last layer its raw output, before the final norm).
   A token whose cosine is not finite counts 0.5, as the authors.
2. Redundancy r_l = 1 - (BI_l - min BI) / (max BI - min BI), so 1 is the most redundant layer (the one
   that changes its input least); all layers equally redundant (r_l = 1) when every BI is the same.
3. Slice fractions s_l = mu + a (r_l / mean(r) - 1), the authors' (mu - a) + a r_l / mean(r), with the
   redundancy-driven part a = ``spread`` * mu (``spread`` in [0, 1]; 0 is constant slicing). Each s_l is
   clipped to [0, max(0.9, mu)] and layer l keeps d_l = round((1 - s_l) D) dimensions, rounded to
   ``round_to``: its input, its attention output and its FFN input are d_l wide, its FFN output d_{l+1}
   (rectangular shortcut), and the last layer writes the full D back, so the head is not sliced.
4. ``--ratio`` is the fraction of decoder parameters removed, shortcuts counted, as for SliceGPT: the mean
   slice mu is solved (bisection; the parameter count falls as mu grows) for the widths whose count is
   closest to the target. With zero spread every width is the same, the solve visits exactly SliceGPT's
   candidate widths, and the result is SliceGPT's model bit for bit.

Then SliceGPT runs unchanged on the widths ``slice_dims`` (the saved format of slimgpt.models.sliced,
which already holds one width per stream).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError
from slimgpt.layerwise.capture import dense_pass
from slimgpt.layerwise.run import LayerLoop
from slimgpt.methods.base import register
from slimgpt.methods.slicegpt import SliceGPTMethod
from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.rotate import sliced_layer_params
from slimgpt.models.sliced import layer_widths
from slimgpt.report import LayerReport, PruneReport

logger = logging.getLogger(__name__)

DEFAULT_SPREAD = 0.25  # a / mu: the authors' best a at mu = 0.3 was 0.06-0.10 (docs/method.md)
MAX_SLICE = 0.9  # no layer loses more than this fraction of its width (unless the mean slice does)
NAN_INFLUENCE = 0.5  # what a token with a non-finite cosine contributes to 1 - cos (the authors' value)


@torch.no_grad()
def block_influence(model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor, config: PruneConfig,
                    device: torch.device) -> list[float]:
    """BI_l = mean over calibration tokens of 1 - cos(layer l's input, its output), on the dense model.

    Each layer visits ``device`` in turn; the activations are stored as SliceGPT's (CPU with offload).
    """
    result = []
    for _layer, batches in dense_pass(model, adapter, calibration, config, device):
        total, tokens = 0.0, 0
        for h, out in batches:
            x, y = h.to(torch.float64), out.to(torch.float64)
            cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
            change = torch.where(torch.isfinite(cos), 1 - cos, torch.full_like(cos, NAN_INFLUENCE))
            total += float(change.sum())
            tokens += change.numel()
        result.append(total / tokens)
    return result


def redundancy(influence: list[float]) -> list[float]:
    """Min-max normalised redundancy 1 - (BI - min) / (max - min): 1 = most redundant; all 1 if BI is flat."""
    low, high = min(influence), max(influence)
    if not high > low:
        return [1.0] * len(influence)
    return [1 - (b - low) / (high - low) for b in influence]


def slice_fractions(redundancies: list[float], mean_slice: float, spread: float) -> list[float]:
    """s_l = mu (1 + spread (r_l / mean(r) - 1)), clipped to [0, max(0.9, mu)] (exactly mu at zero spread)."""
    mean_r = sum(redundancies) / len(redundancies)
    cap = max(MAX_SLICE, mean_slice)
    return [min(max(mean_slice * (1 + spread * (r / mean_r - 1)), 0.0), cap) for r in redundancies]


def stream_dims(fractions: list[float], full: int, round_to: int = 1) -> list[int]:
    """``slice_dims`` for per-layer slice fractions: d_l for layer l's input and middle, then D for the head.

    Widths are rounded to multiples of ``round_to`` within SliceGPT's candidates (slimgpt.models.rotate).
    """
    candidates = list(range(round_to, full + 1, round_to)) or [full]
    widths = [min(max(round((1 - s) * full / round_to) * round_to, candidates[0]), candidates[-1]) for s in fractions]
    return [d for width in widths for d in (width, width)] + [full]


def plan_dynamic_dims(adapter: ModelAdapter, layers: list[nn.Module], redundancies: list[float], ratio: float,
                      spread: float, round_to: int = 1) -> tuple[list[int], float]:
    """The ``slice_dims`` (and mean slice mu) whose decoder parameter count is closest to ``ratio`` removed.

    The count never grows with mu; bisection finds the two neighbouring width sets around the target and
    keeps the closer one (the larger on a tie), as SliceGPT's ``plan_width`` does for one width.
    """
    full = adapter.hidden_size
    target = sum(sum(p.numel() for p in layer.parameters()) for layer in layers) * (1 - ratio)

    def dims_at(mean_slice: float) -> list[int]:
        return stream_dims(slice_fractions(redundancies, mean_slice, spread), full, round_to)

    def params(dims: list[int]) -> int:
        return sum(sliced_layer_params(adapter, layer, layer_widths(dims, i)) for i, layer in enumerate(layers))

    low, high = 0.0, 1.0  # params(dims_at(low)) > target >= params(dims_at(high)), unless an end already decides
    if params(dims_at(low)) <= target:
        return dims_at(low), low
    if params(dims_at(high)) > target:
        return dims_at(high), high
    while True:
        mid = (low + high) / 2
        if mid in (low, high):
            break
        low, high = (low, mid) if params(dims_at(mid)) <= target else (mid, high)
    near = [(dims_at(high), high), (dims_at(low), low)]
    return min(near, key=lambda pair: (abs(params(pair[0]) - target), -params(pair[0])))


def _summarise(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values)


@register
class DynamicSlicingMethod(SliceGPTMethod):
    """SliceGPT with one width per layer, the most redundant layers (1 - cos of input and output) sliced most."""

    name = "dynamic-slicing"
    summary = ("Dynamic LLM slicing (Dumitru et al., EMNLP 2024 Findings; baseline): SliceGPT with a residual width "
               "per\nlayer, set by layer redundancy (1 - cos of each layer's input and output on the calibration "
               "data):\nthe most redundant layers are sliced most, with rectangular shortcut matrices.")
    help = "baseline: SliceGPT with per-layer widths from layer redundancy (Dynamic slicing)"

    def __init__(self, config: PruneConfig, width: int | None = None, spread: float = DEFAULT_SPREAD) -> None:
        super().__init__(config, width)
        if not 0.0 <= spread <= 1.0:
            raise ConfigError(f"spread {spread} must be in [0, 1] (the redundancy-driven share of the mean slice)")
        self.spread = spread
        self.influence: list[float] = []
        self.redundancies: list[float] = []
        self.mean_slice = 0.0

    def plan_dims(self, model: nn.Module, adapter: ModelAdapter, layers: list[nn.Module], calibration: torch.Tensor,
                  loop: LayerLoop) -> list[int]:
        """Block influence on the dense model (stage ``redundancy``), then widths that hit ``--ratio``."""
        if self.width is not None:
            return super().plan_dims(model, adapter, layers, calibration, loop)
        config = self.config
        with loop.watch.stage("redundancy", loop.device):
            self.influence = block_influence(model, adapter, calibration, config, loop.device)
        self.redundancies = redundancy(self.influence)
        dims, self.mean_slice = plan_dynamic_dims(adapter, layers, self.redundancies, config.ratio, self.spread,
                                                  config.round_to)
        logger.info("dynamic-slicing: block influence %s; widths %s of %d (mean slice %.3f, spread %.2f)",
                    _summarise(self.influence), dims[0:-1:2], adapter.hidden_size, self.mean_slice, self.spread)
        return dims

    def schedule_summary(self, dims: list[int], full: int, rows: list[LayerReport]) -> dict[str, Any]:
        if self.width is not None:
            return super().schedule_summary(dims, full, rows)
        sliced = [1 - d / full for d in dims[0:-1:2]]
        return {"name": "dynamic-slicing", "high": max(sliced), "low": min(sliced), "planned_ratio": None,
                "ratios": [r.ratio for r in rows], "slice_dims": dims, "layer_slice": sliced,
                "mean_slice": self.mean_slice, "spread": self.spread, "block_influence": self.influence,
                "redundancy": self.redundancies}

    def slicing_convention(self, report: PruneReport, dims: list[int], full: int) -> str:
        kept = dims[0:-1:2]
        average = sum(1 - d / full for d in kept) / len(kept)
        return (f"Dynamic slicing quotes the average slicing of the hidden width over the layers: {average:.1%} "
                f"here (layer widths {min(kept)}..{max(kept)} of {full}, spread {self.spread:.2f} of the mean slice "
                f"by redundancy); that removes {report.realised_ratio:.2%} of decoder-layer parameters, shortcut "
                f"matrices counted, and {report.realised_total_ratio:.2%} of all parameters (embeddings sliced; a "
                "tied lm_head is untied and kept whole)")
