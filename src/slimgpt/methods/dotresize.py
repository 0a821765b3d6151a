"""DOTResize (Verma, Murray, Duh, arXiv 2507.04517): FFN neurons merged onto the kept ones by an entropic
optimal-transport plan instead of being dropped (slimgpt.solver.transport). docs/method.md says what is
faithful to the paper and what we chose where it is silent."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimgpt.methods.base import Decision, LayerMethod, PruneJob, register
from slimgpt.methods.scoring import with_totals
from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.geometry import model_geometry
from slimgpt.report import PruneReport
from slimgpt.solver.prunenet import uniform_ffn_plan
from slimgpt.solver.schedule import SchedulePlan
from slimgpt.solver.scores import lowest_units
from slimgpt.solver.transport import merge_columns

EPSILON = 0.05  # Sinkhorn's eps as a multiple of the mean transport cost (docs/results/dotresize.md)
MAX_ITER = 2000
TOL = 1e-6  # L1 error of the plan's target marginals (which sum to one): far below any effect on the merge


@register
class DOTResizeMethod(LayerMethod):
    """DOTResize on the FFN: per layer, keep the m channels of largest activation norm (the targets), compute
    the entropic OT plan P (n x m, uniform marginals 1/n and 1/m, cost the squared L2 distance between the
    channels' activations from down_proj's input Gram), and fold Q = n P into down_proj: W'[:, M] = W Q, so
    every removed channel's output column is added to the targets it is transported to. gate/up (OPT: fc1)
    keep the target rows unchanged: the SwiGLU / ReLU cannot absorb a linear map, so the producer side is
    a plain selection and only the consumer is re-projected.

    Size: no heads are removed; every layer keeps the same FFN width, solved so the decoder loses
    ``--ratio`` of its parameters (slimgpt.solver.prunenet.uniform_ffn_plan, the same accounting as the
    other methods' schedules), so the output has a stock config.
    """

    name = "dotresize"
    summary = ("DOTResize (Verma et al., arXiv 2507.04517): FFN channels of the lowest activation norm merged "
               "onto the kept ones\nby an entropic optimal-transport plan (Sinkhorn, L2 activation cost from "
               "the calibration Gram) folded into down_proj;\nno heads removed, one uniform FFN width.")
    help = "DOTResize: FFN channels merged by a Sinkhorn transport plan, uniform FFN width, no heads removed"
    needs_hessian = True
    stock_config = True
    epsilon = EPSILON

    def plan(self, model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor | None) -> SchedulePlan:
        """One FFN width for every layer, all heads kept, solved for the decoder-parameter target."""
        c = self.config
        return uniform_ffn_plan(model_geometry(model, adapter, c.gqa_policy), c.ratio, c.round_to)

    def target_scores(self, job: PruneJob) -> torch.Tensor:
        """Per channel: its activation norm over the calibration tokens (sqrt of diag(H); the paper's v1
        criterion). The targets are the highest."""
        assert job.stats is not None and job.stats.tokens, "the driver collects input statistics"
        return job.stats.diagonal.clamp_min(0).sqrt()

    def restore(self, job: PruneJob, keep: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """down_proj with the removed channels merged onto the kept ones by the transport plan."""
        assert job.stats is not None
        weight, result = merge_columns(job.weight, job.stats.hessian, keep, self.epsilon, MAX_ITER, TOL)
        return weight, {"sinkhorn_iterations": float(result.iterations),
                        "sinkhorn_marginal_error": result.marginal_error}

    def prune_attention(self, job: PruneJob) -> Decision:
        return Decision([], job.weight)

    def prune_ffn(self, job: PruneJob) -> Decision:
        if job.rounds == 0:
            return Decision([], job.weight)  # no merging: the plan of n onto n neurons is not the identity
        removed = lowest_units(self.target_scores(job), job.rounds)
        keep = torch.ones(job.weight.shape[1], dtype=torch.bool, device=job.weight.device)
        keep[torch.tensor(removed, dtype=torch.long, device=keep.device)] = False
        weight, info = self.restore(job, keep)
        return Decision(removed, weight, info=info)

    def ratio_convention(self, report: PruneReport) -> str:
        row = report.layers[0] if report.layers else None
        width = f"{row.ffn_kept} of {row.ffn_total}" if row else "unchanged"
        return (f"fraction of decoder-layer parameters removed (slimgpt's --ratio; the paper quotes the fraction of "
                f"neurons merged away): every layer's FFN width reduced by {report.schedule['high']:.3f} to "
                f"{width}, no heads removed, {with_totals(report)}")

    def card_options(self, config: dict[str, Any]) -> str:
        return (f"targets by activation norm, Sinkhorn eps {self.epsilon} x mean cost (log domain, up to "
                f"{MAX_ITER} iterations), round-to {config.get('round_to')}, no heads removed")
