"""Structured Wanda (Wanda-sp, as in FLAP's code; baseline): |W| * ||X|| scores, uniform ratio."""

from __future__ import annotations

import torch

from slimgpt.methods.base import PruneJob, register
from slimgpt.methods.scoring import ScoredMethod
from slimgpt.solver.hessian import InputStatistics
from slimgpt.solver.scores import wanda_sp_scores


@register
class WandaSPMethod(ScoredMethod):
    """Wanda-sp: mean_i abs(W_ij) * norm(X_j) per o_proj / down_proj input column, summed over a head;
    layer by layer on the inputs the pruned predecessors produce, as FLAP's code. One difference: the
    driver collects down_proj's inputs after the layer's own heads are pruned (FLAP's code collects both
    modules' inputs in one pass before pruning either)."""

    name = "wanda-sp"
    summary = ("Structured Wanda (Wanda-sp, as in FLAP's code; baseline): heads and FFN channels ranked by "
               "|W| * ||X||,\nuniform per-layer ratio, no compensation.")
    help = "baseline: |W| * ||X|| scores, uniform ratio"

    @staticmethod
    def _norms(stats: InputStatistics | None) -> torch.Tensor:
        assert stats is not None and stats.tokens, "the driver collects input statistics when units are removed"
        return (stats.diagonal / 2 * stats.tokens).clamp_min(0).sqrt()  # diag(H) = 2 E[x^2]

    def score_attention(self, job: PruneJob) -> torch.Tensor:
        return wanda_sp_scores(job.weight, self._norms(job.stats), job.units.to(job.weight.device))

    def score_ffn(self, job: PruneJob) -> torch.Tensor:
        return wanda_sp_scores(job.weight, self._norms(job.stats), job.units.to(job.weight.device))
