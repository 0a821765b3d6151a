"""Structured magnitude pruning (baseline): no data, uniform per-layer ratio, no compensation."""

from __future__ import annotations

from torch import nn

from slimgpt.methods.base import register
from slimgpt.methods.scoring import ScoredMethod, coupled_scores
from slimgpt.models.adapters import ModelAdapter


@register
class MagnitudeMethod(ScoredMethod):
    """Magnitude pruning: a unit's score is the Frobenius norm of all the weights it removes (q/k/v rows
    and o_proj columns for a head; gate/up rows and the down_proj column for a channel). No data."""

    name = "magnitude"
    summary = ("Structured magnitude pruning (baseline): the heads and FFN channels with the smallest weight "
               "norm removed,\nuniform per-layer ratio, no data, no compensation.")
    help = "baseline: smallest weight norm, uniform ratio, no data"
    needs_data = False
    needs_layer_inputs = False

    def prepare_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter) -> None:
        attn, channels = coupled_scores(adapter, layer, self.config.gqa_policy,
                                        lambda w: w.detach().float().square())
        self.attention_scores[index], self.channel_scores[index] = attn.sqrt(), channels.sqrt()
