"""Dense linear algebra shared by the solvers: a checked Cholesky, a GEMM-based SPD inverse, block scores.

Pure tensor maths (torch only). ``inverse_cholesky_factor`` exists because the fast solver's one
factorisation is, at the head shapes with few greedy rounds, most of its time: LAPACK's float32
``potrf``/``trtri`` (and the elementwise ``tril`` passes torch wraps around them) run several times
below the matrix-multiply rate on CPUs, while a recursive 2 x 2 block recursion spends almost all of
its flops in GEMMs.
"""

from __future__ import annotations

import torch

from slimgpt.errors import NumericalError

# Below this size the recursion hands over to LAPACK: GEMMs this small no longer beat it.
INVERSE_BLOCK = 128


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


def inverse_cholesky_factor(matrix: torch.Tensor, block: int = INVERSE_BLOCK) -> torch.Tensor:
    """M = L^-1 for the Cholesky factor L of an SPD matrix H (so H^-1 = M^T M), by recursive blocks.

    With H = [[A, B^T], [B, C]], A = L11 L11^T, M11 = L11^-1:

        L21 = B M11^T,   S = C - L21 L21^T = L22 L22^T,   M22 = L22^-1,   M21 = -M22 L21 M11.

    This is the blocked Cholesky and the blocked triangular inverse in one recursion: 4/3 n^3 flops, all
    in four GEMMs per level, where LAPACK's float32 ``potrf`` + ``trtri`` (and the ``tril`` passes torch
    wraps around them) run several times below the matrix-multiply rate on CPUs. The Schur complement is
    formed as C - L21 L21^T, as Cholesky does, so the result is as accurate as LAPACK's (tested); forming
    it as C - B A^-1 B^T with an explicit A^-1 instead loses a digit at d = 4096. A matrix that is not
    positive definite fails in a diagonal block's Cholesky and raises NumericalError.
    """
    n = matrix.shape[0]
    if n <= block:
        factor = cholesky(matrix)
        return torch.linalg.solve_triangular(factor, torch.eye(n, dtype=matrix.dtype, device=matrix.device),
                                             upper=False)
    k = _split(n)
    out = torch.zeros_like(matrix)
    M11 = out[:k, :k]
    M11.copy_(inverse_cholesky_factor(matrix[:k, :k], block))
    # L21 = B L11^-T needs L11 only through M11; L22 is needed only through M22 below.
    L21 = matrix[k:, :k] @ M11.mT  # [n-k, k]
    M22 = out[k:, k:]
    M22.copy_(inverse_cholesky_factor(torch.addmm(matrix[k:, k:], L21, L21.mT, alpha=-1), block))
    out[k:, :k] = (M22 @ L21).neg_() @ M11
    return out


def spd_inverse(matrix: torch.Tensor, block: int = INVERSE_BLOCK) -> torch.Tensor:
    """H^-1 = M^T M from ``inverse_cholesky_factor`` (for tests and callers that want it explicitly)."""
    M = inverse_cholesky_factor(matrix, block)
    return M.mT @ M


def block_scores(blocks: torch.Tensor, columns: torch.Tensor, mode: str) -> torch.Tensor:
    """OBS cost of removing each group of columns on its own, from its Hinv block and its weights.

    blocks: [U, g, g] diagonal blocks Hinv[P, P]; columns: [U, g, d_out] the weights W[:, P]^T.
    Modes (docs/paper.md section 4):
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
