"""The baselines SlimGPT is measured against, in SlimGPT's own framework (docs/peers.md).

Same driver, adapters, calibration data, saved format and evaluation as SlimGPT, so one command compares
them; every method removes whole attention units and FFN channels and hits the requested fraction of
decoder parameters (``--ratio``), so they compare at equal size.

| method | unit score | per-layer amounts | compensation |
| --- | --- | --- | --- |
| magnitude | Frobenius norm of the unit's coupled weights | uniform | none |
| wanda-sp | mean_i abs(W_ij) * norm(X_j), summed over a head | uniform | none |
| flap | var(X_j) * norm(W[:, j])^2, standardised per layer | global ranking | output bias |
| llm-pruner | sum of abs(w * dL/dw) over the coupled group | uniform, middle layers | none |

The maths are pure functions on tensors (first half of this file, formulas in the docstrings); the
method classes (second half) plug them into the driver through the ``LayerMethod`` protocol and its
optional hooks (``plan``, ``prepare_layer``, ``ratio_convention``: see slimgpt.methods).

Attention units follow the driver's ``gqa_policy`` (slimgpt.prune.attention_units): a head (MHA), a
KV group with its query heads ("kv-group"), or a query head, every KV group losing the same number
("query-heads"). A unit's coupled weights are the q rows and o_proj columns of its query heads, plus
the k / v rows of its KV head when the unit removes it (MHA, kv-group). An FFN channel's coupled weights
are its gate / up rows (OPT: fc1) and its down_proj (fc2) column. Biases are not scored (LLM-Pruner's
Taylor importance scores weights only; a norm of weights is what magnitude pruning means).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimgpt.adapters import ModelAdapter
from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError
from slimgpt.methods import Decision, PruneJob
from slimgpt.report import PruneReport
from slimgpt.solver.hessian import InputStatistics
from slimgpt.solver.schedule import LayerGeometry, LayerPlan, SchedulePlan, plan_layer, plan_schedule

logger = logging.getLogger(__name__)


# === pure maths ======================================================================================

def lowest_units(scores: torch.Tensor, rounds: int, buckets: list[list[int]] | None = None) -> list[int]:
    """The ``rounds`` lowest-scored units; with buckets, the ``rounds`` lowest of every bucket.

    Ties go to the lower index (stable sort), so the choice is deterministic.
    """
    if rounds <= 0:
        return []
    scores = scores.detach().to("cpu", torch.float64)
    if buckets is None:
        return torch.argsort(scores, stable=True)[:rounds].tolist()
    removed: list[int] = []
    for bucket in buckets:
        order = torch.argsort(scores[bucket], stable=True)[:rounds]
        removed.extend(bucket[i] for i in order.tolist())
    return removed


def drop_columns(weight: torch.Tensor, units: torch.Tensor, removed: list[int]) -> torch.Tensor:
    """W with the columns of the removed units zeroed (no compensation). units: [n_units, g]."""
    pruned = weight.clone()
    if removed:
        pruned[:, units[removed].flatten().to(weight.device)] = 0
    return pruned


def attention_group_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, n_heads: int,
                         n_kv_heads: int, kind: str) -> torch.Tensor:
    """Sum of a per-weight quantity over each attention unit's coupled weights.

    q: [n_heads * hd, d], k / v: [n_kv_heads * hd, d] (rows per head), o: [d, n_heads * hd] (columns
    per head); each holds one number per weight (w^2 for a norm, abs(w * g) for Taylor importance).
    kind (slimgpt.prune.attention_units): "head" (MHA: q, k, v rows and o columns of the head),
    "kv-group" (all query heads of the group plus the group's k, v rows), "query-head" (q rows and o
    columns only: the KV head stays). Returns [n_units] in the driver's unit order.
    """
    hd = o.shape[1] // n_heads
    per_head = q.sum(1).view(n_heads, hd).sum(1) + o.sum(0).view(n_heads, hd).sum(1)  # [n_heads]
    per_kv_head = (k.sum(1) + v.sum(1)).view(n_kv_heads, hd).sum(1)  # [n_kv_heads]
    if kind == "query-head":
        return per_head
    if kind == "head":
        return per_head + per_kv_head
    if kind == "kv-group":
        return per_head.view(n_kv_heads, n_heads // n_kv_heads).sum(1) + per_kv_head
    raise ValueError(f"unknown attention unit kind {kind!r}")


def channel_group_sums(inputs: list[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    """Sum of a per-weight quantity over each FFN channel's gate/up rows and down_proj column.

    inputs: [d_ff, d] each (gate, up; OPT: fc1); output: [d, d_ff] (down_proj; OPT: fc2). Returns [d_ff].
    """
    return sum((m.sum(1) for m in inputs), output.sum(0))


def wanda_sp_scores(weight: torch.Tensor, input_norms: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Structured Wanda (FLAP's code for Wanda-sp): S_j = mean_i abs(W_ij) * norm(X_j)_2 per input column.

    weight: W [d_out, d_in] of o_proj / down_proj; input_norms: norm(X_j)_2 over the calibration tokens
    [d_in]; units: [n_units, g] columns of each unit. A head's score is the sum over its columns.
    """
    column = (weight.abs() * input_norms[None, :]).mean(0)  # [d_in]
    return column[units].sum(1)


def fluctuation(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation metric (WIFV) per input column: var(X_j) * norm(W[:, j])^2, shape [d_in].

    A column whose input barely varies around its mean can be replaced by a constant (the bias), and
    its weight norm says how much that constant would matter.
    """
    return variance * weight.square().sum(0)


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over one module's scores (FLAP: makes attention and FFN scores of all layers comparable)."""
    std = scores.std()
    return (scores - scores.mean()) / std.clamp_min(torch.finfo(scores.dtype).tiny)


def flap_attention_scores(weight: torch.Tensor, variance: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """FLAP's head score: standardise the SQUARED column fluctuation over the layer's o_proj columns, then
    average over each unit's columns (FLAP's code squares the attention metric before standardising)."""
    return standardise(fluctuation(weight, variance).square())[units].mean(1)


def flap_channel_scores(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """FLAP's FFN channel score: the down_proj column fluctuation, standardised over the layer's channels."""
    return standardise(fluctuation(weight, variance))


def flap_bias(weight: torch.Tensor, mean: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation b = W[:, P] mean(X_P): the removed columns' average contribution, shape [d_out].

    Adding b to the output bias keeps the mean output over the calibration tokens exactly unchanged:
    mean_t(W' x_t + b) = W' mean(x) + W_P mean(x_P) = W mean(x).
    """
    return weight[:, columns] @ mean[columns]


def round_scores(unit_scores: torch.Tensor, buckets: list[list[int]] | None) -> torch.Tensor:
    """Scores of the successive removal rounds of one layer, ascending: what a global ranking compares.

    Without buckets a round removes one unit: the sorted unit scores. With buckets (GQA query-heads) a
    round removes the r-th lowest unit of every bucket; its score is their mean.
    """
    if buckets is None:
        return unit_scores.sort().values
    per_bucket = torch.stack([unit_scores[b].sort().values for b in buckets])  # [n_buckets, per_bucket]
    return per_bucket.mean(0)


def global_counts(module_scores: list[torch.Tensor], unit_params: list[int], caps: list[int],
                  goal: float) -> list[int]:
    """FLAP's global ranking: how many items to remove from each module so the removed parameters are
    closest to ``goal``.

    module_scores: each module's item scores in ascending order (items are removed in that order);
    unit_params: parameters one item of the module removes; caps: most items the module may lose (a
    layer keeps at least one attention unit and one channel). All items of all modules are ranked
    together; the lowest go first until the count crosses ``goal``, stopping on whichever side of the
    crossing is closer (at most half an item from the goal).
    """
    counts = [0] * len(module_scores)
    if goal <= 0:
        return counts
    scores = torch.cat([s.to(torch.float64).cpu() for s in module_scores])
    owner = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(module_scores)])
    removed = 0.0
    for item in torch.argsort(scores, stable=True).tolist():
        module = int(owner[item])
        if counts[module] >= caps[module]:
            continue
        params = unit_params[module]
        if removed + params >= goal:
            if removed + params - goal < goal - removed:
                counts[module] += 1
            return counts
        counts[module] += 1
        removed += params
    raise ConfigError(f"cannot remove {goal:,.0f} parameters while keeping one attention unit and one FFN channel "
                      "per layer: lower --ratio")


def llm_pruner_layers(n_layers: int) -> range:
    """Layers LLM-Pruner prunes: the authors use 4..29 of LLaMA-7B's 32 (first 4 and last 2 kept).

    For other depths the same fractions: first = round(4/32 * n), end = round(30/32 * n), always keeping
    at least the first and the last layer (24 layers: 3..21; 28: 4..25; 40: 5..36; 80: 10..74).
    """
    first = max(1, math.floor(n_layers * 4 / 32 + 0.5))
    end = min(n_layers - 1, math.floor(n_layers * 30 / 32 + 0.5))
    return range(first, max(first, end))


# === glue: the methods ===============================================================================

def _unit_kind(adapter: ModelAdapter, layer: nn.Module, policy: str) -> tuple[str, int, int]:
    from slimgpt.prune import attention_units

    sizes = adapter.layer_sizes(layer)
    _, _, kind = attention_units(adapter, sizes, policy)
    return kind, sizes.n_heads, sizes.n_kv_heads


def coupled_scores(adapter: ModelAdapter, layer: nn.Module, policy: str,
                   per_weight: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of ``per_weight(W)`` (one number per weight) over every attention unit's and FFN channel's
    coupled weights; returns ([n_units] in the driver's unit order, [d_ff])."""
    kind, n_heads, n_kv_heads = _unit_kind(adapter, layer, policy)
    q, k, v = (per_weight(m.weight).float() for m in adapter.attn_inputs(layer))
    o = per_weight(adapter.attn_output(layer).weight).float()
    attn = attention_group_sums(q, k, v, o, n_heads, n_kv_heads, kind)
    channels = channel_group_sums([per_weight(m.weight).float() for m in adapter.mlp_inputs(layer)],
                                  per_weight(adapter.mlp_output(layer).weight).float())
    return attn.cpu(), channels.cpu()


def _geometries(model: nn.Module, adapter: ModelAdapter, config: PruneConfig) -> list[LayerGeometry]:
    from slimgpt.prune import layer_geometry

    return [layer_geometry(adapter, layer, config.gqa_policy) for layer in adapter.decoder_layers(model)]


def _with_totals(report: PruneReport) -> str:
    return (f"{report.realised_ratio:.2%} of decoder parameters, {report.realised_total_ratio:.2%} of all "
            "parameters (embeddings and lm_head included)")


class _ScoredMethod:
    """Removes the lowest-scored units of each layer; subclasses say where the scores come from.

    Scores are per layer, in the driver's unit order; the driver decides how many units go (``plan``).
    """

    name = ""
    needs_hessian = False
    needs_data = True

    def __init__(self, config: PruneConfig) -> None:
        self.config = config
        self.attention_scores: dict[int, torch.Tensor] = {}
        self.channel_scores: dict[int, torch.Tensor] = {}

    def plan(self, model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor | None,
             config: PruneConfig) -> SchedulePlan:
        """Uniform: every layer loses the same fraction of its heads and channels, solved for the target."""
        return plan_schedule(_geometries(model, adapter, config), config.ratio, "uniform", round_to=config.round_to)

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
                f"ratio FLAP's code takes for {self.name}), solved to remove {_with_totals(report)}")


class MagnitudeMethod(_ScoredMethod):
    """Magnitude pruning: a unit's score is the Frobenius norm of all the weights it removes (q/k/v rows
    and o_proj columns for a head; gate/up rows and the down_proj column for a channel). No data."""

    name = "magnitude"
    needs_data = False

    def prepare_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter, config: PruneConfig) -> None:
        attn, channels = coupled_scores(adapter, layer, config.gqa_policy, lambda w: w.detach().float().square())
        self.attention_scores[index], self.channel_scores[index] = attn.sqrt(), channels.sqrt()


class WandaSPMethod(_ScoredMethod):
    """Wanda-sp: mean_i abs(W_ij) * norm(X_j) per o_proj / down_proj input column, summed over a head;
    layer by layer on the inputs the pruned predecessors produce, as FLAP's code. One difference: the
    driver collects down_proj's inputs after the layer's own heads are pruned (FLAP's code collects both
    modules' inputs in one pass before pruning either)."""

    name = "wanda-sp"

    @staticmethod
    def _norms(stats: InputStatistics | None) -> torch.Tensor:
        assert stats is not None and stats.tokens, "the driver collects input statistics when units are removed"
        return (stats.diagonal / 2 * stats.tokens).clamp_min(0).sqrt()  # diag(H) = 2 E[x^2]

    def score_attention(self, job: PruneJob) -> torch.Tensor:
        return wanda_sp_scores(job.weight, self._norms(job.stats), job.units.to(job.weight.device))

    def score_ffn(self, job: PruneJob) -> torch.Tensor:
        return wanda_sp_scores(job.weight, self._norms(job.stats), job.units.to(job.weight.device))


class FLAPMethod(_ScoredMethod):
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
    plan_reads_weights = True

    def plan(self, model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor | None,
             config: PruneConfig) -> SchedulePlan:
        from slimgpt.prune import attention_units, dense_input_statistics

        assert calibration is not None
        if config.round_to > 1:
            logger.warning("flap chooses every layer's width by a global ranking; --round-to %d is not applied",
                           config.round_to)
        geometries = _geometries(model, adapter, config)
        layers = adapter.decoder_layers(model)
        stats = dense_input_statistics(model, adapter, calibration, config)
        module_scores: list[torch.Tensor] = []
        unit_params: list[int] = []
        caps: list[int] = []
        added: list[int] = []  # bias parameters this method adds to each layer
        for index, (layer, geometry, (attn_stats, ffn_stats)) in enumerate(zip(layers, geometries, stats,
                                                                                strict=True)):
            units, buckets, _ = attention_units(adapter, adapter.layer_sizes(layer), config.gqa_policy)
            o_proj, down_proj = adapter.attn_output(layer), adapter.mlp_output(layer)
            W_o = o_proj.weight.detach().float().to(attn_stats.variance.device)
            W_down = down_proj.weight.detach().float().to(ffn_stats.variance.device)
            units = units.to(W_o.device)
            self.attention_scores[index] = flap_attention_scores(W_o, attn_stats.variance, units).cpu()
            self.channel_scores[index] = flap_channel_scores(W_down, ffn_stats.variance).cpu()
            module_scores += [round_scores(self.attention_scores[index], buckets),
                              self.channel_scores[index].sort().values]
            unit_params += [geometry.params_per_attn_unit, geometry.params_per_channel]
            caps += [geometry.attn_units - 1, geometry.ffn_channels - 1]
            added.append(sum(m.out_features for m in (o_proj, down_proj) if m.bias is None))
        total = sum(g.layer_params for g in geometries)
        goal = config.ratio * total + (sum(added) if config.ratio > 0 else 0)
        counts = global_counts(module_scores, unit_params, caps, goal)
        plans = []
        for index, geometry in enumerate(geometries):
            units_removed, channels_removed = counts[2 * index], counts[2 * index + 1]
            net = (units_removed * geometry.params_per_attn_unit + channels_removed * geometry.params_per_channel
                   - (added[index] if config.ratio > 0 else 0))
            plans.append(LayerPlan(net / geometry.layer_params, units_removed, channels_removed, net))
        removed = sum(p.params_removed for p in plans)
        ratios = [p.ratio for p in plans]
        return SchedulePlan(layers=plans, target_ratio=config.ratio, realised_ratio=removed / total,
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
                f"({report.schedule['low']:.3f}..{report.schedule['high']:.3f}); here {_with_totals(report)}, "
                "net of the output biases FLAP adds")


def taylor_importance(model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor, layers: list[int],
                      policy: str, batch_size: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """LLM-Pruner's first-order Taylor importance of every coupled group of the given layers.

    I(group) = sum over its weights of abs(w * dL/dw), L = the LM loss (mean over tokens) of ``windows``
    [n, seqlen]; the gradient of the whole batch's mean loss, accumulated over mini-batches of
    ``batch_size``. Only the scored weights get gradients (memory); requires_grad flags are restored.
    Returns {layer: ([n_units] in the driver's unit order, [d_ff])}.
    """
    decoder = adapter.decoder_layers(model)
    scored = [m.weight for i in layers for m in (*adapter.attn_inputs(decoder[i]), adapter.attn_output(decoder[i]),
                                                 *adapter.mlp_inputs(decoder[i]), adapter.mlp_output(decoder[i]))]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    device = model.get_input_embeddings().weight.device  # type: ignore[operator]
    n = windows.shape[0]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for w in scored:
            w.requires_grad_(True)
            w.grad = None
        with torch.enable_grad():
            for start in range(0, n, batch_size):
                batch = windows[start:start + batch_size].to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                (loss * (len(batch) / n)).backward()  # the mean loss over all windows
        return {i: coupled_scores(adapter, decoder[i], policy, _taylor_saliency) for i in layers}
    finally:
        for w in scored:
            w.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)


def _taylor_saliency(weight: torch.Tensor) -> torch.Tensor:
    """abs(w * dL/dw) per weight (LLM-Pruner's "param_first")."""
    assert weight.grad is not None, "the loss did not reach this weight"
    return (weight.detach().float() * weight.grad.float()).abs()


class LLMPrunerMethod(_ScoredMethod):
    """LLM-Pruner (block-wise, Taylor "param_first", no LoRA): a backward pass of the LM loss on the first
    ``taylor_samples`` calibration windows cut to ``taylor_seqlen`` tokens (the authors: 10 x 64), group
    importance = sum of abs(w * dL/dw) over the coupled weights, one uniform ratio on the middle layers
    (``llm_pruner_layers``), solved so the whole model loses the requested fraction of decoder
    parameters. The gradient pass runs the whole model where it is (the CLI loads on the CPU), as the
    authors' code does; the layer loop then needs no calibration passes.
    """

    name = "llm-pruner"
    needs_layer_inputs = False
    plan_reads_weights = True

    def __init__(self, config: PruneConfig) -> None:
        super().__init__(config)
        self.pruned_layers = range(0)
        self.layer_ratio = 0.0

    def plan(self, model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor | None,
             config: PruneConfig) -> SchedulePlan:
        assert calibration is not None
        geometries = _geometries(model, adapter, config)
        n = len(geometries)
        self.pruned_layers = pruned = llm_pruner_layers(n)
        total = sum(g.layer_params for g in geometries)
        goal = config.ratio * total
        most = sum(plan_layer(geometries[i], 1.0, config.round_to).params_removed for i in pruned)
        if goal > most:
            raise ConfigError(
                f"llm-pruner keeps the first and last layers of this {n}-layer model and prunes layers "
                f"{_span(pruned)}: at most {most / total:.1%} of decoder parameters can go: lower --ratio"
            )
        plans = [LayerPlan(0.0, 0, 0, 0)] * n
        if config.ratio > 0:
            sub_total = sum(geometries[i].layer_params for i in pruned)
            sub = plan_schedule([geometries[i] for i in pruned], goal / sub_total, "uniform",
                                round_to=config.round_to)
            for i, layer_plan in zip(pruned, sub.layers, strict=True):
                plans[i] = layer_plan
            self.layer_ratio = sub.high
            windows = calibration[:config.taylor_samples, :config.taylor_seqlen]
            logger.info("llm-pruner: Taylor importance from the LM loss of %d x %d calibration tokens; layers %s "
                        "pruned at ratio %.3f", *windows.shape, _span(pruned), self.layer_ratio)
            scores = taylor_importance(model, adapter, windows, list(pruned), config.gqa_policy, config.batch_size)
            for i, (attn, channels) in scores.items():
                self.attention_scores[i], self.channel_scores[i] = attn, channels
        removed = sum(p.params_removed for p in plans)
        return SchedulePlan(layers=plans, target_ratio=config.ratio, realised_ratio=removed / total,
                            high=self.layer_ratio, low=0.0, schedule=f"uniform on layers {_span(pruned)}",
                            total_params=total, params_removed=removed)

    def ratio_convention(self, report: PruneReport) -> str:
        return (f"LLM-Pruner's --pruning_ratio is the per-layer ratio on the pruned layers {_span(self.pruned_layers)} "
                f"(here {self.layer_ratio:.3f}); its papers quote the fraction of ALL parameters, embeddings "
                f"included: here {report.realised_total_ratio:.2%} ({report.realised_ratio:.2%} of decoder "
                "parameters)")


def _span(layers: range) -> str:
    return f"{layers.start}..{layers.stop - 1}" if len(layers) else "(none)"


BASELINES: dict[str, Any] = {
    "magnitude": MagnitudeMethod,
    "wanda-sp": WandaSPMethod,
    "flap": FLAPMethod,
    "llm-pruner": LLMPrunerMethod,
}
