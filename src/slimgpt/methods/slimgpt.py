"""SlimGPT (Ling et al., NeurIPS 2024): grouped-Cholesky Batched Greedy Pruning for the attention heads,
Dynamic Group Size for the FFN channels, OBS compensation of the surviving columns, and the
log-increasing per-layer ratio (the default ``LayerMethod.plan``), or with ``--schedule auto`` per-layer
counts from measured costs (slimgpt.methods.auto_schedule). docs/method.md has the maths."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimgpt.config import PruneConfig
from slimgpt.methods.auto_schedule import STREAM_REFUSAL, plan_auto
from slimgpt.methods.base import Decision, LayerMethod, PruneJob, register
from slimgpt.models.adapters import ModelAdapter
from slimgpt.solver.hessian import prepare_hessian, with_escalating_damping
from slimgpt.solver.obs import make_solver
from slimgpt.solver.schedule import AUTO, SchedulePlan
from slimgpt.solver.structured import greedy_remove_units, group_sizes, remove_channels


@register
class SlimGPTMethod(LayerMethod):
    """SlimGPT: grouped-Cholesky Batched Greedy Pruning for heads, Dynamic Group Size for the FFN."""

    name = "slimgpt"
    summary = ("Structured pruning: whole attention heads and FFN channels removed, surviving weights "
               "OBS-compensated\n(SlimGPT, Ling et al., NeurIPS 2024).")
    help = "SlimGPT: OBS-compensated head and FFN-channel removal (the default)"
    needs_hessian = True

    def __init__(self, config: PruneConfig) -> None:
        super().__init__(config)
        if config.schedule == AUTO:  # the auto plan measures the dense model on the calibration data
            self.plan_needs_data = True
            self.plan_reads_weights = True

    def plan(self, model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor | None) -> SchedulePlan:
        if self.config.schedule != AUTO:
            return super().plan(model, adapter, calibration)
        assert calibration is not None
        return plan_auto(model, adapter, calibration, self.config)

    def cannot_stream(self) -> str:
        return STREAM_REFUSAL if self.config.schedule == AUTO else super().cannot_stream()

    def _solver(self, job: PruneJob, damping: float) -> Any:
        assert job.stats is not None
        weight = job.weight.clone()
        H = prepare_hessian(job.stats.hessian, weight, damping)
        return make_solver(self.config.solver, weight, H, self.config.compensate)

    def prune_attention(self, job: PruneJob) -> Decision:
        if job.rounds == 0:
            return Decision([], job.weight)

        def attempt(damping: float) -> Decision:
            solver = self._solver(job, damping)
            removed = greedy_remove_units(solver, job.units, job.rounds, job.buckets, self.config.head_score)
            return Decision(removed, solver.weight)

        decision, damping = with_escalating_damping(attempt, self.config.percdamp, f"o_proj of layer {job.layer}")
        decision.info["damping"] = damping
        return decision

    def prune_ffn(self, job: PruneJob) -> Decision:
        if job.rounds == 0:
            return Decision([], job.weight)
        c = self.config
        sizes = group_sizes(job.rounds, c.group_schedule, c.group_start, c.group_floor, c.group_fraction)

        def attempt(damping: float) -> Decision:
            solver = self._solver(job, damping)
            return Decision(remove_channels(solver, sizes), solver.weight, info={"groups": float(len(sizes))})

        decision, damping = with_escalating_damping(attempt, c.percdamp, f"down_proj of layer {job.layer}")
        decision.info["damping"] = damping
        return decision

    def card_options(self, config: dict[str, Any]) -> str:
        return (f"head score {config.get('head_score')}, compensation {config.get('compensate')},\n"
                f"  FFN groups {config.get('group_schedule')}, GQA policy {config.get('gqa_policy')},\n"
                f"  damping {config.get('percdamp')}, round-to {config.get('round_to')}")
