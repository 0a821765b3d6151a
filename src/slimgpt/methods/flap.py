"""FLAP (An et al., AAAI 2024; baseline): fluctuation scores ranked globally, bias compensation."""

from __future__ import annotations

import logging

import torch
from torch import nn

from slimgpt.layerwise.capture import dense_input_statistics
from slimgpt.methods.base import Decision, PruneJob, register
from slimgpt.methods.scoring import ScoredMethod, with_totals
from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.geometry import attention_units, model_geometry
from slimgpt.report import PruneReport
from slimgpt.solver.hessian import InputStatistics
from slimgpt.solver.schedule import LayerGeometry, LayerPlan, SchedulePlan
from slimgpt.solver.scores import (
    drop_columns,
    flap_attention_scores,
    flap_bias,
    flap_channel_scores,
    global_counts,
    lowest_units,
    round_scores,
)

logger = logging.getLogger(__name__)


@register
class FLAPMethod(ScoredMethod):
    """FLAP: fluctuation scores of the dense model, ranked globally; removed columns compensated by a bias.

    ``plan`` runs the calibration data through the dense model once, scores every o_proj / down_proj
    input column, standardises per layer and module, and ranks all units of all layers together
    (adaptive per-layer and per-module ratios). In the layer loop the bias b = W[:, P] mean(X_P) uses
    the mean of the inputs the layer actually receives after its predecessors were pruned (the driver's
    statistics; FLAP's code uses the dense model's means), which makes the mean output exact.
    Wherever the family has no o_proj / down_proj bias (LLaMA), every layer gets one
    (``layer_output_bias`` in the saved config); the added parameters count against the target.
    """

    name = "flap"
    summary = ("FLAP (An et al., AAAI 2024; baseline): fluctuation-ranked heads and FFN channels, global adaptive "
               "per-layer ratios,\nremoved channels compensated by an output bias of o_proj / down_proj.")
    help = "baseline: fluctuation scores, global ranking, bias compensation"
    plan_reads_weights = True
    plan_needs_data = True

    def plan(self, model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor | None) -> SchedulePlan:
        assert calibration is not None
        config = self.config
        if config.round_to > 1:
            logger.warning("flap chooses every layer's width by a global ranking; --round-to %d is not applied",
                           config.round_to)
        geometries = model_geometry(model, adapter, config.gqa_policy)
        stats = dense_input_statistics(model, adapter, calibration, config)
        module_scores: list[torch.Tensor] = []
        unit_params: list[int] = []
        caps: list[int] = []
        added: list[int] = []  # bias parameters this method adds to each layer
        for index, (layer, geometry, layer_stats) in enumerate(zip(adapter.decoder_layers(model), geometries, stats,
                                                                   strict=True)):
            buckets, bias_params = self._score_layer(index, layer, adapter, layer_stats)
            module_scores += [round_scores(self.attention_scores[index], buckets),
                              self.channel_scores[index].sort().values]
            unit_params += [geometry.params_per_attn_unit, geometry.params_per_channel]
            caps += [geometry.attn_units - 1, geometry.ffn_channels - 1]
            added.append(bias_params)
        total = sum(g.layer_params for g in geometries)
        goal = config.ratio * total + (sum(added) if config.ratio > 0 else 0)
        counts = global_counts(module_scores, unit_params, caps, goal)
        return self._schedule(geometries, counts, added, total)

    def _score_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter,
                     layer_stats: tuple[InputStatistics, InputStatistics]) -> tuple[list[list[int]] | None, int]:
        """Fluctuation scores of one dense layer's units; returns (its buckets, the bias parameters FLAP adds)."""
        attn_stats, ffn_stats = layer_stats
        units, buckets, _ = attention_units(adapter, adapter.layer_sizes(layer), self.config.gqa_policy)
        o_proj, down_proj = adapter.attn_output(layer), adapter.mlp_output(layer)
        variance_o, variance_down = attn_stats.variance, ffn_stats.variance
        W_o = o_proj.weight.detach().float().to(variance_o.device)
        W_down = down_proj.weight.detach().float().to(variance_down.device)
        self.attention_scores[index] = flap_attention_scores(W_o, variance_o, units.to(W_o.device)).cpu()
        self.channel_scores[index] = flap_channel_scores(W_down, variance_down).cpu()
        return buckets, sum(m.out_features for m in (o_proj, down_proj) if m.bias is None)

    def _schedule(self, geometries: list[LayerGeometry], counts: list[int], added: list[int],
                  total: int) -> SchedulePlan:
        ratio = self.config.ratio
        plans = []
        for index, geometry in enumerate(geometries):
            units_removed, channels_removed = counts[2 * index], counts[2 * index + 1]
            net = (units_removed * geometry.params_per_attn_unit + channels_removed * geometry.params_per_channel
                   - (added[index] if ratio > 0 else 0))
            plans.append(LayerPlan(net / geometry.layer_params, units_removed, channels_removed, net))
        removed = sum(p.params_removed for p in plans)
        ratios = [p.ratio for p in plans]
        return SchedulePlan(layers=plans, target_ratio=ratio, realised_ratio=removed / total,
                            high=max(ratios), low=min(ratios), schedule="flap-global", total_params=total,
                            params_removed=removed)

    def _compensated(self, job: PruneJob, removed: list[int]) -> Decision:
        weight = drop_columns(job.weight, job.units, removed)
        if not removed:
            return Decision([], weight, bias_delta=torch.zeros(job.weight.shape[0], device=job.weight.device))
        assert job.stats is not None and job.stats.tokens, "the driver collects input statistics when units go"
        columns = job.units[removed].flatten().to(job.weight.device)
        bias = flap_bias(job.weight, job.stats.mean.to(job.weight.device), columns)
        return Decision(removed, weight, bias_delta=bias)

    def prune_attention(self, job: PruneJob) -> Decision:
        if self.config.ratio == 0:
            return Decision([], job.weight)
        return self._compensated(job, lowest_units(self.attention_scores[job.layer], job.rounds, job.buckets))

    def prune_ffn(self, job: PruneJob) -> Decision:
        if self.config.ratio == 0:
            return Decision([], job.weight)
        return self._compensated(job, lowest_units(self.channel_scores[job.layer], job.rounds))

    def ratio_convention(self, report: PruneReport) -> str:
        return ("FLAP's --pruning_ratio counts only the projection weights (q, k, v, o, gate, up, down), so it "
                "reads slightly above the decoder-parameter fraction, which also counts norms and biases; "
                "per-layer ratios are adaptive "
                f"({report.schedule['low']:.3f}..{report.schedule['high']:.3f}); here {with_totals(report)}, "
                "net of the output biases FLAP adds")
