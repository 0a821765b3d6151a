"""SlimGPT's ``--schedule auto``: every layer's head and FFN-channel counts from measured costs.

1. One pass of the planning windows (the first calibration windows: ``PLAN_FRACTION`` of them, and no
   more than hold ``PLAN_TOKENS_PER_INPUT`` tokens per input of the widest o_proj or down_proj)
   through the dense model collects every layer's o_proj and down_proj input Hessians, and keeps the
   sensitivity windows' activations (slimgpt.methods.auto_sensitivity.dense_run).
2. Per layer and module, the OBS cost curve of successive removals along SlimGPT's own greedy path: head
   rounds (grouped-Cholesky scores) and 16 channel steps, up to a fraction min(1, 2.5 ratio + 0.15) of
   the module's units (the allocation never goes further; slimgpt.solver.allocation). A cost is the
   relative layer-wise output error ||dW X||^2 / ||W X||^2.
3. Per layer and module, a sensitivity: on the first calibration windows (at most ``SENSITIVITY_TOKENS``
   tokens), the mean KL divergence of the model's next-token distribution from the dense one when only
   that module's weight is replaced by its compensated weight at the probe count (the uniform ratio's
   count), divided by the layer-wise cost there. It turns a layer's relative error into predicted
   output divergence, so error in a layer whose output the rest of the model amplifies counts for more.
   A probe's forward starts at its own layer from the dense activations
   (slimgpt.methods.auto_sensitivity.staircase_divergences).
4. A global allocation over all layers and both modules: the least sum of sensitivity x cost whose
   removed parameters land on the goal (slimgpt.solver.allocation.allocate), keeping one attention unit
   and ``round_to`` channels per layer, and FFN widths multiples of ``round_to``.

Everything runs on the dense model, so the plan is deterministic given the calibration windows (a
resumed run plans the same), and it needs every layer in memory (``--stream`` is refused).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimgpt.config import PruneConfig
from slimgpt.methods.auto_sensitivity import DenseRun, Probe, dense_run, staircase_divergences
from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.geometry import attention_units, model_geometry
from slimgpt.solver.allocation import (
    CostCurve,
    Layer,
    Option,
    allocate,
    allowed_channel_counts,
    channel_checkpoints,
    channel_cost_curve,
    interpolate,
    unit_cost_curve,
)
from slimgpt.solver.hessian import InputStatistics, prepare_hessian
from slimgpt.solver.schedule import AUTO, LayerGeometry, LayerPlan, SchedulePlan

CHANNEL_STEPS = 16  # points of each FFN cost curve
SENSITIVITY_TOKENS = 512  # calibration tokens of the sensitivity probes (the first windows)
# Of the calibration windows, the first ones, for the planning pass. A quarter was as good on the tiny
# models, but on SmolLM2-135M at 20% it gave 39.60 PPL against 37.17 with every window (32 x 256 tokens;
# docs/results/auto_schedule.md): a 1536-wide FFN Hessian from 2048 tokens is too noisy to rank channels.
PLAN_FRACTION = 1.0
# ... and no more windows than hold this many tokens per input of the widest Hessian (SmolLM2-135M's
# 1536-wide FFN: 24,576 tokens, every window of 32 x 256, 48 of 128 x 512, where all 128 gave 34.43 PPL at
# 20%, 48 34.46 and 18 (6 per input) 35.56; docs/results/auto_schedule.md).
PLAN_TOKENS_PER_INPUT = 16
REACH = (2.5, 0.15)  # curves reach a fraction min(1, 2.5 ratio + 0.15) of each module's units
STREAM_REFUSAL = ("--schedule auto measures every layer of the dense model before pruning any, which needs the "
                  "whole model in memory")


def _measured(weight: nn.Linear, stats: InputStatistics, config: PruneConfig, device: torch.device) -> Layer:
    W = weight.weight.detach().to(device, torch.float32, copy=True)
    H = prepare_hessian(stats.hessian, W, config.percdamp)
    return Layer(W, H, stats.hessian, config.solver, config.compensate)


def _layer_curves(layer: nn.Module, adapter: ModelAdapter, geometry: LayerGeometry,
                  stats: tuple[InputStatistics, InputStatistics], config: PruneConfig) -> tuple[CostCurve, CostCurve]:
    """The attention and FFN cost curves of one dense layer, each with its probe's weight change."""
    device = torch.device(config.device)
    units, buckets, _ = attention_units(adapter, adapter.layer_sizes(layer), config.gqa_policy)
    reach = min(1.0, REACH[0] * config.ratio + REACH[1])
    rounds = min(geometry.attn_units - 1, math.ceil(reach * geometry.attn_units))
    probe_round = min(rounds, max(1, round(config.ratio * geometry.attn_units))) if rounds > 0 else 0
    attn = unit_cost_curve(_measured(adapter.attn_output(layer), stats[0], config, device), units, rounds, buckets,
                           config.head_score, probe_round)
    allowed = allowed_channel_counts(geometry.ffn_channels, config.round_to)
    reachable = [c for c in allowed if c <= reach * geometry.ffn_channels] or allowed[:2]
    checkpoints = channel_checkpoints(reachable, CHANNEL_STEPS)
    target = config.ratio * geometry.ffn_channels
    probe = min(checkpoints[1:], key=lambda c: (abs(c - target), c), default=0)
    ffn = channel_cost_curve(_measured(adapter.mlp_output(layer), stats[1], config, device), checkpoints, probe)
    return _on_cpu(attn), _on_cpu(ffn)


def _on_cpu(curve: CostCurve) -> CostCurve:
    probe = curve.probe.cpu() if curve.probe is not None else None
    return CostCurve(curve.counts, curve.costs, probe, curve.probe_count)


def _sensitivities(model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor, dense: DenseRun,
                   config: PruneConfig, curves: list[tuple[CostCurve, CostCurve]]) -> list[list[float]]:
    """Per layer, [attention, FFN] output divergence per unit of relative layer-wise error."""
    probes: list[Probe] = []
    where: list[tuple[int, int, float]] = []  # (layer, module, cost at the probe) of each probe
    for index, pair in enumerate(curves):
        for m, curve in enumerate(pair):
            cost = curve.costs[curve.counts.index(curve.probe_count)] if curve.probe is not None else 0.0
            if curve.probe is not None and cost > 0:
                probes.append((index, m, curve.probe))
                where.append((index, m, cost))
    weights = [[0.0, 0.0] for _ in curves]
    if probes:
        kls = staircase_divergences(model, adapter, windows, dense, probes, config)
        for (index, m, cost), kl in zip(where, kls, strict=True):
            weights[index][m] = max(kl, 0.0) / cost
    return weights


@torch.no_grad()
def plan_auto(model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor, config: PruneConfig) -> SchedulePlan:
    """SlimGPT's ``auto`` schedule: measured cost curves, measured sensitivities, one global allocation."""
    geometries = model_geometry(model, adapter, config.gqa_policy)
    total = sum(g.layer_params for g in geometries)
    if config.ratio == 0:
        zero = [LayerPlan(0.0, 0, 0, 0) for _ in geometries]
        return SchedulePlan(zero, 0.0, 0.0, 0.0, 0.0, AUTO, total, 0, {"method": "nothing to remove"})
    n, seqlen = calibration.shape
    windows = calibration[:max(1, SENSITIVITY_TOKENS // seqlen)].long()
    widest = max(max(adapter.attn_output(layer).in_features, adapter.mlp_output(layer).in_features)
                 for layer in adapter.decoder_layers(model))
    enough = math.ceil(PLAN_TOKENS_PER_INPUT * widest / seqlen)
    planning = calibration[:max(len(windows), min(math.ceil(PLAN_FRACTION * n), enough))].long()
    dense = dense_run(model, adapter, planning, len(windows), config)
    curves = []
    for layer, geometry, layer_stats in zip(adapter.decoder_layers(model), geometries, dense.stats, strict=True):
        curves.append(_layer_curves(layer, adapter, geometry, layer_stats, config))
    dense.stats.clear()
    weights = _sensitivities(model, adapter, windows, dense, config, curves)
    options = []
    for geometry, (attn, ffn), (w_attn, w_ffn) in zip(geometries, curves, weights, strict=True):
        allowed = [c for c in allowed_channel_counts(geometry.ffn_channels, config.round_to) if c <= ffn.counts[-1]]
        options.append(Option(attn.counts, [w_attn * c for c in attn.costs], geometry.params_per_attn_unit))
        options.append(Option(allowed, [w_ffn * c for c in interpolate(ffn, allowed)], geometry.params_per_channel))
    counts = allocate(options, config.ratio * total)
    plans = []
    for i, geometry in enumerate(geometries):
        units, channels = counts[2 * i], counts[2 * i + 1]
        params = units * geometry.params_per_attn_unit + channels * geometry.params_per_channel
        plans.append(LayerPlan(params / geometry.layer_params, units, channels, params))
    removed = sum(p.params_removed for p in plans)
    predicted = sum(o.costs[o.counts.index(c)] for o, c in zip(options, counts, strict=True))
    details = {
        "method": "OBS cost curves of the dense layers x KL sensitivity per module, global greedy allocation",
        "sensitivity_windows": len(windows), "planning_windows": len(planning),
        "attn_sensitivity": [w[0] for w in weights],
        "ffn_sensitivity": [w[1] for w in weights], "predicted_kl": predicted,
        "attn_units_removed": [p.attn_units_removed for p in plans],
        "channels_removed": [p.channels_removed for p in plans],
    }
    ratios = [p.ratio for p in plans]
    return SchedulePlan(plans, config.ratio, removed / total, max(ratios), min(ratios), AUTO, total, removed, details)
