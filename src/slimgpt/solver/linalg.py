"""Dense linear algebra shared by the solvers: a checked Cholesky, a GEMM-based SPD inverse, block scores.

Pure tensor maths (torch only). ``spd_inverse`` exists because the fast solver's one full inversion is,
at the head shapes with few greedy rounds, most of its time: LAPACK's float32 ``potrf``/``potri`` (and
the elementwise ``tril`` passes torch wraps around them) run several times below the matrix-multiply
rate on CPUs, while a recursive 2 x 2 block elimination spends almost all of its flops in GEMMs.
"""

from __future__ import annotations

import torch

from slimgpt.errors import NumericalError

# Below this size the recursion hands over to LAPACK: GEMMs this small no longer beat it.
INVERSE_BLOCK = 256


def cholesky(matrix: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """Cholesky factor of an SPD matrix (or a batch of them); NumericalError naming the fix if not PD."""
    factor, info = torch.linalg.cholesky_ex(matrix, upper=upper)
    if bool((info != 0).any()) or not bool(torch.isfinite(factor).all()):
        raise NumericalError(
            "a block of the inverse Hessian is not positive definite; raise the damping (--percdamp, "
            "e.g. 0.1) or use more calibration data (--nsamples)"
        )
    return factor


def _split(n: int) -> int:
    """Where to cut an n x n matrix in two: near the middle, on a multiple of 64 (GEMM-friendly)."""
    return max(64, (n // 2 + 32) // 64 * 64)


def spd_inverse(matrix: torch.Tensor, block: int = INVERSE_BLOCK) -> torch.Tensor:
    """Inverse of a symmetric positive-definite matrix by recursive block elimination.

    With H = [[A, B], [B^T, C]] and S = C - B^T A^-1 B (the Schur complement, SPD when H is):

        H^-1 = [[A^-1 + Y X^T, -Y], [-Y^T, S^-1]],   X = A^-1 B,  Y = X S^-1.

    This is the elimination a blocked Cholesky performs, so it is as stable for SPD matrices; it costs
    4/3 n^3 flops against LAPACK's n^3, but all of them in four GEMMs per level. A matrix that is not
    positive definite fails in a diagonal block's Cholesky and raises NumericalError. Only the lower
    triangle of each diagonal block is read by the Cholesky, so rounding asymmetry does not propagate.
    """
    n = matrix.shape[0]
    if n <= block:
        return torch.cholesky_inverse(cholesky(matrix))
    k = _split(n)
    A, B, C = matrix[:k, :k], matrix[:k, k:], matrix[k:, k:]
    out = torch.empty_like(matrix)
    A_inv = spd_inverse(A, block)
    X = A_inv @ B  # [k, n-k]
    S_inv = spd_inverse(torch.addmm(C, B.mT, X, alpha=-1), block)  # [n-k, n-k]
    Y = X @ S_inv  # [k, n-k]
    out[:k, :k] = A_inv.addmm_(Y, X.mT)
    out[:k, k:] = Y.neg_()
    out[k:, :k] = Y.mT
    out[k:, k:] = S_inv
    return out


def block_scores(blocks: torch.Tensor, columns: torch.Tensor, mode: str) -> torch.Tensor:
    """OBS cost of removing each group of columns on its own, from its Hinv block and its weights.

    blocks: [U, g, g] diagonal blocks Hinv[P, P]; columns: [U, g, d_out] the weights W[:, P]^T.
    Modes (method spec section 4):
    - ``gcd``: exact group OBS cost tr(W_P B^-1 W_P^T) with B = L L^T (one batched Cholesky):
      ||L^-1 W_P^T||_F^2. Equals the cost of the sequential recursion over the group.
    - ``gcd-diag``: sum_j ||W_j||^2 / L_jj^2, the Cholesky denominators with the unupdated columns
      (the authors' score; L_jj^2 is OBS's Hinv_jj after the group's earlier columns are removed).
    - ``diag``: sum_j ||W_j||^2 / Hinv_jj, each column as if removed alone (the paper's "-GCD" ablation).
    """
    if mode == "diag":
        return (columns.square().sum(-1) / blocks.diagonal(dim1=1, dim2=2)).sum(-1)
    L = cholesky(blocks)
    if mode == "gcd-diag":
        return (columns.square().sum(-1) / L.diagonal(dim1=1, dim2=2).square()).sum(-1)
    if mode == "gcd":
        return torch.linalg.solve_triangular(L, columns, upper=False).square().sum((-2, -1))
    raise ValueError(f"unknown head score {mode!r}; choose gcd, gcd-diag or diag")


def group_scores(weight: torch.Tensor, Hinv: torch.Tensor, units: torch.Tensor, mode: str = "gcd") -> torch.Tensor:
    """Error of removing each unit (a group of columns) on its own, shape [n_units] (see block_scores).

    units: [n_units, g] column indices into the full weight and inverse Hessian.
    """
    blocks = Hinv[units[:, :, None], units[:, None, :]]  # [U, g, g]
    columns = weight[:, units].permute(1, 2, 0)  # [U, g, d_out]
    return block_scores(blocks, columns, mode)
