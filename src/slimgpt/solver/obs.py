"""OBS removal of column groups with compensation (docs/paper.md sections 4-6).

Removing a set P of input columns from W (d_out x d_in) so that W' X stays as close as possible to
W X on the calibration inputs is a least-squares problem with the closed-form OBS answer

    dW = -W[:, P] (Hinv[P, P])^-1 Hinv[P, :]            (exact for a group, not an approximation)

and cost  E(P) = tr(W_P (Hinv_PP)^-1 W_P^T)  in units of the layer-wise squared error.

Two solvers give the same result (tested):
- ``ReferenceSolver`` is the authors' way: every round it re-inverts H with the pruned columns
  decoupled (once: the round's scores and its removal share that inverse), takes the upper Cholesky
  factor of the permuted inverse and runs the sequential GPTQ/SparseGPT recursion over the removed
  columns. O(d^3) per round. It is the baseline the fast
  solver is timed against, so it stays the straightforward one.
- ``FastSolver`` (``solver/fast.py``) factors H once (M = L^-1, Hinv = M^T M) and then applies the
  Schur complement Hinv_RR <- Hinv_RR - Hinv_RP Hinv_PP^-1 Hinv_PR (exactly the inverse of H_RR) as a
  stacked low-rank factor, Hinv = M^T M - C^T C, with the block update above. O(d^2 |P|) per round, and
  no d x d matrix is downdated, masked or symmetrised per round (M^T M is formed once when many
  scattered channels are to go).
"""

from __future__ import annotations

import torch

from slimgpt.solver.base import Solver
from slimgpt.solver.fast import FastSolver
from slimgpt.solver.linalg import cholesky as _cholesky
from slimgpt.solver.linalg import group_scores

__all__ = [
    "SOLVERS", "FastSolver", "ReferenceSolver", "Solver", "group_cost", "group_scores", "make_solver",
    "reconstruction_error",
]


def _decouple(matrix: torch.Tensor, columns: torch.Tensor) -> None:
    """Make ``columns`` independent of the rest: zero their rows and columns, unit diagonal."""
    matrix[columns, :] = 0
    matrix[:, columns] = 0
    matrix[columns, columns] = 1


class ReferenceSolver(Solver):
    """The straightforward solver: a fresh inverse and a sequential OBS recursion every round."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, compensate: bool) -> None:
        super().__init__(weight, hessian, compensate)
        self._weight = weight.to(self.dtype).clone()
        self.hessian = hessian.to(self.dtype)
        self._pruned = torch.zeros(weight.shape[1], dtype=torch.bool, device=weight.device)
        self._inverse: torch.Tensor | None = None  # this round's inverse, shared by its scores and removal

    @property
    def weight(self) -> torch.Tensor:
        return self._weight

    @property
    def pruned(self) -> torch.Tensor:
        return self._pruned

    def inverse(self) -> torch.Tensor:
        """A fresh inverse once per round (not to be modified): a round's scores and removal share it."""
        if self._inverse is None:
            H = self.hessian.clone()
            _decouple(H, self.pruned.nonzero().flatten())
            self._inverse = torch.cholesky_inverse(_cholesky(H))
        return self._inverse

    def remove(self, columns: torch.Tensor) -> None:
        if self.compensate:
            Hinv = self.inverse()
            rest = (~torch.isin(torch.arange(len(self.pruned), device=columns.device), columns)).nonzero().flatten()
            order = torch.cat([columns, rest])
            U = _cholesky(Hinv[order][:, order], upper=True)
            p = len(columns)
            W_P = self.weight[:, columns].clone()
            errors = torch.empty_like(W_P)
            for i in range(p):  # the sequential OBS recursion inside the removed group
                errors[:, i] = W_P[:, i] / U[i, i]
                W_P[:, i:] -= errors[:, i:i + 1] * U[i, i:p][None, :]
            # The same recursion's updates of the surviving columns, applied at once (GPTQ's lazy batch).
            self.weight[:, rest] -= errors @ U[:p, p:]
        self.weight[:, columns] = 0
        self.pruned[columns] = True
        self._inverse = None


SOLVERS: dict[str, type[Solver]] = {"fast": FastSolver, "reference": ReferenceSolver}


def make_solver(name: str, weight: torch.Tensor, hessian: torch.Tensor, compensate: bool = True) -> Solver:
    return SOLVERS[name](weight, hessian, compensate)


def group_cost(weight: torch.Tensor, Hinv: torch.Tensor, columns: torch.Tensor) -> float:
    """Exact OBS cost tr(W_P Hinv_PP^-1 W_P^T) of removing ``columns`` together."""
    W_P = weight[:, columns]
    return float(torch.trace(W_P @ torch.linalg.solve(Hinv[columns][:, columns], W_P.t())))


def reconstruction_error(original: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative layer-wise error ||(W - W') X||^2 / ||W X||^2 on the calibration inputs (H = 2XX^T/N)."""
    delta = (pruned - original).to(torch.float32)
    W = original.to(torch.float32)
    num = torch.einsum("ij,jk,ik->", delta, hessian, delta)
    den = torch.einsum("ij,jk,ik->", W, hessian, W)
    return float(num / den.clamp_min(torch.finfo(torch.float32).tiny))
