"""The interface the structured pruning rounds drive, shared by the reference and the fast solver."""

from __future__ import annotations

import math

import torch

from slimgpt.solver.linalg import group_scores


class Solver:
    """State of one weight being pruned: the (compensated) weight and which columns are gone.

    ``weight`` is the full d_out x d_in weight with removed columns zero; ``pruned`` marks them;
    ``inverse()`` is the inverse Hessian over the surviving columns, the removed ones decoupled (zero
    rows and columns, unit diagonal). The scores below are what the greedy rounds need each round; the
    defaults compute them from those full-size views (the straightforward way); the fast solver, which
    never forms the inverse, overrides them so that no full-size matrix is built per round.
    """

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, compensate: bool) -> None:
        self.dtype = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 if given
        self.compensate = compensate

    @property
    def weight(self) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    @property
    def pruned(self) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def inverse(self) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def remove(self, columns: torch.Tensor) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def expect_removals(self, columns: int, units: bool = False) -> None:
        """A hint: about ``columns`` more columns are to go, as whole units of consecutive columns (heads)
        if ``units``, else as scattered channels (a solver may pick its strategy and buffers by it)."""

    def channel_errors(self) -> torch.Tensor:
        """OBS error ||W_j||^2 / Hinv_jj of removing each column alone, shape [d_in]; +inf if removed."""
        errors = self.weight.square().sum(0) / self.inverse().diagonal()
        errors[self.pruned] = math.inf
        return errors

    def unit_scores(self, units: torch.Tensor, alive: torch.Tensor, mode: str) -> torch.Tensor:
        """Cost of removing each unit (units: [n_units, g] columns) on its own; +inf where not alive."""
        scores = group_scores(self.weight, self.inverse(), units, mode).cpu()
        scores[~alive] = math.inf
        return scores
