"""LLM-Pruner (Ma et al., NeurIPS 2023; baseline): Taylor importance of coupled groups, middle layers."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError
from slimgpt.methods.base import register
from slimgpt.methods.scoring import ScoredMethod, coupled_scores
from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.geometry import model_geometry
from slimgpt.report import PruneReport
from slimgpt.solver.schedule import LayerPlan, SchedulePlan, plan_layer, plan_schedule

logger = logging.getLogger(__name__)


def llm_pruner_layers(n_layers: int) -> range:
    """Layers LLM-Pruner prunes: the authors use 4..29 of LLaMA-7B's 32 (first 4 and last 2 kept).

    For other depths the same fractions: first = round(4/32 * n), end = round(30/32 * n), always keeping
    at least the first and the last layer (24 layers: 3..21; 28: 4..25; 40: 5..36; 80: 10..74).
    """
    first = max(1, math.floor(n_layers * 4 / 32 + 0.5))
    end = min(n_layers - 1, math.floor(n_layers * 30 / 32 + 0.5))
    return range(first, max(first, end))


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


@register
class LLMPrunerMethod(ScoredMethod):
    """LLM-Pruner (block-wise, Taylor "param_first", no LoRA): a backward pass of the LM loss on the first
    ``taylor_samples`` calibration windows cut to ``taylor_seqlen`` tokens (the authors: 10 x 64), group
    importance = sum of abs(w * dL/dw) over the coupled weights, one uniform ratio on the middle layers
    (``llm_pruner_layers``), solved so the whole model loses the requested fraction of decoder
    parameters. The gradient pass runs the whole model where it is (the CLI loads on the CPU), as the
    authors' code does; the layer loop then needs no calibration passes.
    """

    name = "llm-pruner"
    summary = ("LLM-Pruner (Ma et al., NeurIPS 2023; baseline): coupled groups ranked by first-order Taylor "
               "importance |w * dL/dw|,\nuniform ratio on the middle layers, first and last layers kept, "
               "no compensation (no LoRA tuning).")
    help = "baseline: first-order Taylor importance, middle layers, no compensation"
    plan_needs_data = True
    needs_layer_inputs = False
    plan_reads_weights = True

    def __init__(self, config: PruneConfig) -> None:
        super().__init__(config)
        self.pruned_layers = range(0)
        self.layer_ratio = 0.0

    def plan(self, model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor | None) -> SchedulePlan:
        assert calibration is not None
        config = self.config
        geometries = model_geometry(model, adapter, config.gqa_policy)
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

    def card_options(self, config: dict[str, Any]) -> str:
        return (f"{super().card_options(config)}, gradient pass on at most {config.get('taylor_samples')} windows x "
                f"{config.get('taylor_seqlen')} tokens")


def _span(layers: range) -> str:
    return f"{layers.start}..{layers.stop - 1}" if len(layers) else "(none)"
