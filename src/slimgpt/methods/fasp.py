"""FASP (Hu et al., arXiv 2501.09412): Wanda-style column scores on o_proj / down_proj, the coupled rows of
the preceding layer removed with them, and a least-squares restoration of the surviving columns
(slimgpt.solver.restore). docs/method.md says what is faithful and what we chose."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimgpt.methods.base import Decision, LayerMethod, PruneJob, register
from slimgpt.methods.scoring import with_totals
from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.geometry import model_geometry
from slimgpt.report import PruneReport
from slimgpt.solver.hessian import prepare_hessian
from slimgpt.solver.restore import restore_least_squares
from slimgpt.solver.schedule import SchedulePlan, plan_schedule
from slimgpt.solver.scores import lowest_units


def fasp_scores(weight: torch.Tensor, hessian_diagonal: torch.Tensor, tokens: int,
                units: torch.Tensor) -> torch.Tensor:
    """S_j = sum_i abs(W_ij) * norm(X_j)_2 per input column j, summed over each unit's columns.

    weight: W [d_out, d_in]; hessian_diagonal: diag(H) = 2 E[x_j^2] over ``tokens`` calibration tokens,
    so norm(X_j)_2 = sqrt(H_jj * tokens / 2); units: [n_units, g] column indices. Returns [n_units].
    """
    norms = (hessian_diagonal / 2 * tokens).clamp_min(0).sqrt()
    return (weight.abs().sum(0) * norms)[units].sum(1)


@register
class FASPMethod(LayerMethod):
    """FASP: per layer, the lowest-scored units of o_proj and down_proj go, then the survivors are restored.

    Score: S_j = sum_i abs(W_ij) * norm(X_j) on o_proj's / down_proj's input columns (``fasp_scores``), a
    unit's score the sum over its columns. Removal: the lowest units of every layer, the same fraction in
    every layer (``plan``), with the coupled rows of the preceding layer (gate/up rows for an FFN channel).
    Restoration: W'[:, M] = W Hd[:, M] Hd[M, M]^-1 (slimgpt.solver.restore.restore_least_squares), one solve
    per weight, no greedy loop, with SlimGPT's damped Hd = H + lam I, lam = percdamp * mean(diag(H))
    (slimgpt.solver.hessian.prepare_hessian). That is W'_M = W_M + W_P H[P, M] (H[M, M] + lam I)^-1: the
    damping pulls the survivors towards their dense values. The ridge form W H[:, M] (H[M, M] + lam I)^-1
    (damping H[M, M] only) pulls them towards zero and, on OPT's sparse ReLU channels, gave a larger
    layer error than no restoration at all. With the same removed set the restored weights equal
    SlimGPT's compensated ones (tests/methods/test_fasp.py): FASP and SlimGPT differ in the selector and
    the per-layer ratios only.

    Per-head policy: whole heads. The paper removes single o_proj columns and the matching v rows, keeping
    q and k. The saved format stores per-layer head counts with one head_dim for q, k and v, so it cannot
    keep a head's q/k while its v/o columns are gone, nor give heads different v widths. We therefore
    score and remove the driver's attention units (``PruneJob.units`` / ``buckets``, as wanda-sp): a head
    (MHA), a KV group with its query heads (GQA ``kv-group``) or a query head (``query-heads``), and each
    unit takes its q, k, v rows and o columns. The FFN is pruned per channel, as the paper does.
    """

    name = "fasp"
    summary = ("FASP (Hu et al., arXiv 2501.09412): heads and FFN channels ranked by sum_i |W_ij| * ||X_j|| on "
               "o_proj / down_proj,\nuniform per-layer ratio, surviving columns restored by damped least squares "
               "(one solve per weight).")
    help = "FASP: |W| * ||X|| column scores, uniform ratio, least-squares restoration"
    needs_hessian = True

    def plan(self, model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor | None) -> SchedulePlan:
        """Uniform: every layer loses the same fraction of its heads and channels, solved for the target."""
        c = self.config
        return plan_schedule(model_geometry(model, adapter, c.gqa_policy), c.ratio, "uniform", round_to=c.round_to)

    def _decide(self, job: PruneJob, buckets: list[list[int]] | None) -> Decision:
        if job.rounds == 0:
            return Decision([], job.weight)
        stats = job.stats
        assert stats is not None and stats.tokens, "the driver collects input statistics when units are removed"
        units = job.units.to(job.weight.device)
        removed = lowest_units(fasp_scores(job.weight, stats.diagonal, stats.tokens, units), job.rounds, buckets)
        keep = torch.ones(job.weight.shape[1], dtype=torch.bool, device=job.weight.device)
        keep[units[removed].flatten()] = False
        weight = job.weight.clone()
        H = prepare_hessian(stats.hessian, weight, self.config.percdamp)  # SlimGPT's damping of the whole diagonal
        return Decision(removed, restore_least_squares(weight, H, keep, damp=0.0))

    def prune_attention(self, job: PruneJob) -> Decision:
        return self._decide(job, job.buckets)

    def prune_ffn(self, job: PruneJob) -> Decision:
        return self._decide(job, None)

    def ratio_convention(self, report: PruneReport) -> str:
        return (f"uniform per-layer fraction r = {report.schedule['high']:.3f} of heads and FFN channels (FASP's "
                f"per-layer pruning ratio), solved to remove {with_totals(report)}")

    def card_options(self, config: dict[str, Any]) -> str:
        return (f"whole heads (GQA policy {config.get('gqa_policy')}), damping {config.get('percdamp')} x "
                f"mean(diag(H)), round-to {config.get('round_to')}")
