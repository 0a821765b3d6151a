"""OBS removal of column groups with compensation (method spec sections 4-6).

Removing a set P of input columns from W (d_out x d_in) so that W' X stays as close as possible to
W X on the calibration inputs is a least-squares problem with the closed-form OBS answer

    dW = -W[:, P] (Hinv[P, P])^-1 Hinv[P, :]            (exact for a group, not an approximation)

and cost  E(P) = tr(W_P (Hinv_PP)^-1 W_P^T)  in units of the layer-wise squared error.

Two solvers give the same result (tested):
- ``ReferenceSolver`` is the authors' way: every round it re-inverts H with the pruned columns
  decoupled, takes the upper Cholesky factor of the permuted inverse and runs the sequential
  GPTQ/SparseGPT recursion over the removed columns. O(d^3) per round.
- ``FastSolver`` keeps Hinv up to date with a Schur-complement downdate
  Hinv_RR <- Hinv_RR - Hinv_RP Hinv_PP^-1 Hinv_PR, which is exactly the inverse of H_RR, and applies
  the block update above. O(d^2 |P|) per round.
"""

from __future__ import annotations

import torch

from slimgpt.errors import NumericalError


def _cholesky(matrix: torch.Tensor, upper: bool = False) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(matrix, upper=upper)
    if bool((info != 0).any()) or not bool(torch.isfinite(factor).all()):
        raise NumericalError(
            "a block of the inverse Hessian is not positive definite; raise the damping (--percdamp, "
            "e.g. 0.1) or use more calibration data (--nsamples)"
        )
    return factor


def _decouple(matrix: torch.Tensor, columns: torch.Tensor) -> None:
    """Make ``columns`` independent of the rest: zero their rows and columns, unit diagonal."""
    matrix[columns, :] = 0
    matrix[:, columns] = 0
    matrix[columns, columns] = 1


class _Solver:
    """State of one weight being pruned: the (compensated) weight and which columns are gone."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, compensate: bool) -> None:
        dtype = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 if given
        self.weight = weight.to(dtype).clone()
        self.hessian = hessian.to(dtype)
        self.compensate = compensate
        self.pruned = torch.zeros(weight.shape[1], dtype=torch.bool, device=weight.device)

    def inverse(self) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def remove(self, columns: torch.Tensor) -> None:
        raise NotImplementedError  # pragma: no cover - abstract


class ReferenceSolver(_Solver):
    """The straightforward solver: a fresh inverse and a sequential OBS recursion every round."""

    def inverse(self) -> torch.Tensor:
        H = self.hessian.clone()
        _decouple(H, self.pruned.nonzero().flatten())
        return torch.cholesky_inverse(_cholesky(H))

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


class FastSolver(_Solver):
    """Exact downdates of Hinv instead of re-inversion (method spec section 6)."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, compensate: bool) -> None:
        super().__init__(weight, hessian, compensate)
        self._inverse = torch.cholesky_inverse(_cholesky(self.hessian))

    def inverse(self) -> torch.Tensor:
        return self._inverse

    def remove(self, columns: torch.Tensor) -> None:
        Hinv = self._inverse
        block_factor = _cholesky(Hinv[columns][:, columns])  # Hinv_PP = L L^T
        rows = Hinv[columns, :]  # Hinv_P:  [|P|, d]
        # Hinv_PP^-1 Hinv_P: via the Cholesky factor, no explicit inverse.
        solved = torch.cholesky_solve(rows, block_factor)
        if self.compensate:
            self.weight -= self.weight[:, columns] @ solved
        self.weight[:, columns] = 0
        Hinv -= rows.t() @ solved  # Schur complement: the inverse of H over the surviving columns
        Hinv.copy_((Hinv + Hinv.t()) / 2)  # keep it symmetric against rounding drift
        _decouple(Hinv, columns)
        self.pruned[columns] = True


SOLVERS: dict[str, type[_Solver]] = {"fast": FastSolver, "reference": ReferenceSolver}


def make_solver(name: str, weight: torch.Tensor, hessian: torch.Tensor, compensate: bool = True) -> _Solver:
    return SOLVERS[name](weight, hessian, compensate)


def group_scores(weight: torch.Tensor, Hinv: torch.Tensor, units: torch.Tensor, mode: str = "gcd") -> torch.Tensor:
    """Error of removing each unit (a group of columns) on its own, shape [n_units].

    units: [n_units, g] column indices. Modes (method spec section 4):
    - ``gcd``: exact group OBS cost tr(W_P B^-1 W_P^T) with B = Hinv[P, P] = L L^T, from one batched
      Cholesky: ||L^-1 W_P^T||_F^2. Equals the cost of the sequential recursion over the group.
    - ``gcd-diag``: sum_j ||W_j||^2 / L_jj^2, the Cholesky denominators with the unupdated columns
      (the authors' score; L_jj^2 is OBS's Hinv_jj after the group's earlier columns are removed).
    - ``diag``: sum_j ||W_j||^2 / Hinv_jj, each column as if removed alone (the paper's "-GCD" ablation).
    """
    blocks = Hinv[units[:, :, None], units[:, None, :]]  # [U, g, g]
    columns = weight[:, units].permute(1, 2, 0)  # [U, g, d_out]
    if mode == "diag":
        return (columns.square().sum(-1) / blocks.diagonal(dim1=1, dim2=2)).sum(-1)
    L = _cholesky(blocks)
    if mode == "gcd-diag":
        return (columns.square().sum(-1) / L.diagonal(dim1=1, dim2=2).square()).sum(-1)
    if mode == "gcd":
        return torch.linalg.solve_triangular(L, columns, upper=False).square().sum((-2, -1))
    raise ValueError(f"unknown head score {mode!r}; choose gcd, gcd-diag or diag")


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
