"""What the baselines share: coupled-weight scores of a layer and the lowest-scored-units method.

Attention units follow the driver's ``gqa_policy`` (slimgpt.models.geometry.attention_units): a head
(MHA), a KV group with its query heads ("kv-group"), or a query head, every KV group losing the same
number ("query-heads"). A unit's coupled weights are the q rows and o_proj columns of its query heads,
plus the k / v rows of its KV head when the unit removes it (MHA, kv-group). An FFN channel's coupled
weights are its gate / up rows (OPT: fc1) and its down_proj (fc2) column. Biases are not scored
(LLM-Pruner's Taylor importance scores weights only; a norm of weights is what magnitude pruning means).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimgpt.config import PruneConfig
from slimgpt.methods.base import Decision, LayerMethod, PruneJob
from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.geometry import attention_units, model_geometry
from slimgpt.report import PruneReport
from slimgpt.solver.schedule import SchedulePlan, plan_schedule
from slimgpt.solver.scores import attention_group_sums, channel_group_sums, drop_columns, lowest_units


def coupled_scores(adapter: ModelAdapter, layer: nn.Module, policy: str,
                   per_weight: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of ``per_weight(W)`` (one number per weight) over every attention unit's and FFN channel's
    coupled weights; returns ([n_units] in the driver's unit order, [d_ff])."""
    sizes = adapter.layer_sizes(layer)
    _, _, kind = attention_units(adapter, sizes, policy)
    q, k, v = (per_weight(m.weight).float() for m in adapter.attn_inputs(layer))
    o = per_weight(adapter.attn_output(layer).weight).float()
    attn = attention_group_sums(q, k, v, o, sizes.n_heads, sizes.n_kv_heads, kind)
    channels = channel_group_sums([per_weight(m.weight).float() for m in adapter.mlp_inputs(layer)],
                                  per_weight(adapter.mlp_output(layer).weight).float())
    return attn.cpu(), channels.cpu()


def with_totals(report: PruneReport) -> str:
    return (f"{report.realised_ratio:.2%} of decoder parameters, {report.realised_total_ratio:.2%} of all "
            "parameters (embeddings and lm_head included)")


class ScoredMethod(LayerMethod):
    """Removes the lowest-scored units of each layer; subclasses say where the scores come from.

    Scores are per layer, in the driver's unit order; ``plan`` decides how many units go.
    """

    def __init__(self, config: PruneConfig) -> None:
        super().__init__(config)
        self.attention_scores: dict[int, torch.Tensor] = {}
        self.channel_scores: dict[int, torch.Tensor] = {}

    def plan(self, model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor | None) -> SchedulePlan:
        """Uniform: every layer loses the same fraction of its heads and channels, solved for the target."""
        c = self.config
        return plan_schedule(model_geometry(model, adapter, c.gqa_policy), c.ratio, "uniform", round_to=c.round_to)

    def score_attention(self, job: PruneJob) -> torch.Tensor:
        return self.attention_scores[job.layer]

    def score_ffn(self, job: PruneJob) -> torch.Tensor:
        return self.channel_scores[job.layer]

    def prune_attention(self, job: PruneJob) -> Decision:
        if job.rounds == 0:
            return Decision([], job.weight)
        removed = lowest_units(self.score_attention(job), job.rounds, job.buckets)
        return Decision(removed, drop_columns(job.weight, job.units, removed))

    def prune_ffn(self, job: PruneJob) -> Decision:
        if job.rounds == 0:
            return Decision([], job.weight)
        removed = lowest_units(self.score_ffn(job), job.rounds)
        return Decision(removed, drop_columns(job.weight, job.units, removed))

    def ratio_convention(self, report: PruneReport) -> str:
        return (f"uniform per-layer fraction r = {report.schedule['high']:.3f} of heads and FFN channels (the "
                f"ratio FLAP's code takes for {self.name}), solved to remove {with_totals(report)}")
