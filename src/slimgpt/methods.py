"""Pruning methods as layer-local decisions: which attention units / FFN channels go, and new weights.

The driver (slimgpt.prune) runs every method the same way: it collects input statistics of o_proj and
down_proj on the calibration data, asks the method for a decision, writes the decision's weights and
shrinks the layer. A method sees only tensors, never Hugging Face modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from slimgpt.config import PruneConfig
from slimgpt.solver.hessian import InputStatistics, prepare_hessian
from slimgpt.solver.obs import _Solver, make_solver
from slimgpt.solver.structured import greedy_remove_units, group_sizes, remove_channels


@dataclass
class PruneJob:
    """One weight to prune. ``weight`` is W (d_out x d_in, float32); units are groups of its columns.

    rounds: for attention, greedy rounds (each removes one unit per bucket); for the FFN, the number of
    channels (single columns) to remove.
    """

    weight: torch.Tensor
    stats: InputStatistics | None
    units: torch.Tensor  # [n_units, g] column indices
    rounds: int
    buckets: list[list[int]] | None = None
    layer: int = 0  # index of the decoder layer, for methods that planned per-layer scores beforehand


@dataclass
class Decision:
    removed_units: list[int]
    weight: torch.Tensor  # full-shape new weight; removed columns are zero
    bias_delta: torch.Tensor | None = None  # added to the output bias (FLAP-style compensation)
    info: dict[str, float] = field(default_factory=dict)


class LayerMethod(Protocol):
    """What the driver asks of a method. Optional hooks, looked up with ``getattr``:

    - ``plan(model, adapter, calibration, config) -> SchedulePlan``: per-layer removal counts decided
      before the layer loop (global rankings, gradients, uniform ratios); replaces ``plan_schedule``.
      It sees the dense model and may precompute per-layer unit scores for ``prune_*`` (keyed by
      ``PruneJob.layer``).
    - ``needs_layer_inputs: bool`` (default ``needs_data``): False when the calibration data is only
      used by ``plan``, so the driver skips the layer-by-layer statistics passes.
    - ``ratio_convention(report) -> str``: how the method's own papers quote a pruning ratio.
    """

    name: str
    needs_hessian: bool  # full X X^T (else only per-feature statistics)
    needs_data: bool

    def prune_attention(self, job: PruneJob) -> Decision: ...

    def prune_ffn(self, job: PruneJob) -> Decision: ...


class SlimGPTMethod:
    """SlimGPT: grouped-Cholesky Batched Greedy Pruning for heads, Dynamic Group Size for the FFN."""

    name = "slimgpt"
    needs_hessian = True
    needs_data = True

    def __init__(self, config: PruneConfig) -> None:
        self.config = config

    def _solver(self, job: PruneJob) -> _Solver:
        assert job.stats is not None
        weight = job.weight.clone()
        H = prepare_hessian(job.stats.hessian, weight, self.config.percdamp)
        return make_solver(self.config.solver, weight, H, self.config.compensate)

    def prune_attention(self, job: PruneJob) -> Decision:
        if job.rounds == 0:
            return Decision([], job.weight)
        solver = self._solver(job)
        removed = greedy_remove_units(solver, job.units, job.rounds, job.buckets, self.config.head_score)
        return Decision(removed, solver.weight)

    def prune_ffn(self, job: PruneJob) -> Decision:
        if job.rounds == 0:
            return Decision([], job.weight)
        solver = self._solver(job)
        sizes = group_sizes(job.rounds, self.config.group_schedule, self.config.group_start,
                            self.config.group_floor, self.config.group_fraction)
        removed = remove_channels(solver, sizes)
        return Decision(removed, solver.weight, info={"groups": float(len(sizes))})


def get_method(config: PruneConfig) -> LayerMethod:
    from slimgpt.baselines import BASELINES  # late: baselines builds on this module

    methods: dict[str, type] = {"slimgpt": SlimGPTMethod, **BASELINES}
    method: LayerMethod = methods[config.method](config)
    return method
