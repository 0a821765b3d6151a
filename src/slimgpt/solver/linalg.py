"""Dense linear algebra shared by the solvers: a checked Cholesky, a GEMM-based SPD inverse, block scores.

Pure tensor maths (torch only). ``inverse_cholesky_factor`` exists because the fast solver's one
factorisation is, at the head shapes with few greedy rounds, most of its time: LAPACK's float32
``potrf``/``trtri`` (and the elementwise ``tril`` passes torch wraps around them) run several times
below the matrix-multiply rate on CPUs, while a recursive 2 x 2 block recursion spends almost all of
its flops in GEMMs (its leaves in two halves: LAPACK's float32 Cholesky runs at a few GF/s at n <= 128).
``padded_empty`` gives the solvers' big matrices rows that do not span whole KiB (cache-set conflicts).
"""

from __future__ import annotations

import torch

from slimgpt.errors import NumericalError

NOT_PD = ("a block of the inverse Hessian is not positive definite; raise the damping (--percdamp, e.g. 0.1) "
          "or use more calibration data (--nsamples)")

# Below this size the recursion hands over to LAPACK (and a product with a triangular factor is one GEMM).
INVERSE_BLOCK = 128
# The same for the batched inverse of the heads' small diagonal blocks (head_dim x head_dim).
SMALL_BLOCK = 64
# A leaf of the factorisation above this size is done in two halves (``_leaf_factor``).
LEAF_HALF = 64
# Extra elements a row of the solver's big matrices gets when its length is a multiple of 1 KiB (padded_empty).
ROW_PAD = 16


def cholesky(matrix: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """Cholesky factor of an SPD matrix (or a batch of them); NumericalError naming the fix if not PD.

    A NaN or infinity anywhere in the read triangle reaches the factor's diagonal (each pivot depends on
    its whole row), so checking the diagonal is enough.
    """
    factor, info = torch.linalg.cholesky_ex(matrix, upper=upper)
    if bool((info != 0).any()) or not bool(torch.isfinite(factor.diagonal(dim1=-2, dim2=-1)).all()):
        raise NumericalError(NOT_PD)
    return factor


def _split(n: int) -> int:
    """Where to cut an n x n matrix in two: near the middle, on a multiple of 64 (GEMM-friendly)."""
    return max(64, (n // 2 + 32) // 64 * 64)


def _lower_times(T: torch.Tensor, X: torch.Tensor, out: torch.Tensor, block: int) -> None:
    """out = T @ X for a lower-triangular T, skipping T's upper blocks (recursively down to ``block``)."""
    n = T.shape[0]
    if n <= block:
        out.addmm_(T, X, beta=0)  # GEMM straight into the (possibly strided) view
        return
    h = _split(n)
    _lower_times(T[:h, :h], X[:h], out[:h], block)
    _lower_times(T[h:, h:], X[h:], out[h:], block)
    out[h:].addmm_(T[h:, :h], X[:h])


def times_lower(X: torch.Tensor, T: torch.Tensor, out: torch.Tensor, block: int) -> None:
    """out = X @ T for a lower-triangular T, skipping T's upper blocks (recursively down to ``block``)."""
    n = T.shape[0]
    if n <= block:
        out.addmm_(X, T, beta=0)
        return
    h = _split(n)
    times_lower(X[:, :h], T[:h, :h], out[:, :h], block)
    times_lower(X[:, h:], T[h:, h:], out[:, h:], block)
    out[:, :h].addmm_(X[:, h:], T[h:, :h])


def _downdate_lower(C: torch.Tensor, A: torch.Tensor, block: int, alpha: float = -1) -> None:
    """C += alpha A A^T on C's lower blocks only (the upper ones are never read)."""
    n = C.shape[0]
    if n <= block:
        C.addmm_(A, A.mT, alpha=alpha)
        return
    h = _split(n)
    _downdate_lower(C[:h, :h], A[:h], block, alpha)
    _downdate_lower(C[h:, h:], A[h:], block, alpha)
    C[h:, :h].addmm_(A[h:], A[:h].mT, alpha=alpha)


def _gram_lower(M: torch.Tensor, out: torch.Tensor, block: int) -> None:
    """out = M^T M on out's lower blocks, M lower triangular: with M = [[A, 0], [B, C]],

        M^T M = [[A^T A + B^T B, B^T C], [C^T B, C^T C]],

    two recursions, one symmetric product and one with the triangular C (about n^3 / 3 flops in all)."""
    n = M.shape[0]
    if n <= block:
        out.addmm_(M.mT, M, beta=0)
        return
    k = _split(n)
    _gram_lower(M[:k, :k], out[:k, :k], block)
    _downdate_lower(out[:k, :k], M[k:, :k].mT, block, alpha=1)
    times_lower(M[k:, :k].mT, M[k:, k:], out[k:, :k].mT, block)  # (C^T B)^T = B^T C
    _gram_lower(M[k:, k:], out[k:, k:], block)


def gram_of_lower(M: torch.Tensor, block: int = INVERSE_BLOCK) -> torch.Tensor:
    """The lower triangle of M^T M for a lower-triangular M (H^-1 from M = L^-1), in GEMMs that skip the
    zero blocks: about n^3 / 3 flops, against 2 n^3 / 3 for one product that skips only M's zeros.

    The strict upper triangle is zero except inside the recursion's diagonal blocks (there it is the
    product's); ``mirror_lower`` makes the whole symmetric matrix when a caller needs it.
    """
    out = padded_empty(M.shape[0], M.shape[1], M.dtype, M.device).zero_()
    _gram_lower(M, out, block)
    return out


def mirror_lower(matrix: torch.Tensor, block: int = 512) -> None:
    """Copy the lower triangle onto the upper one in place, one block row at a time (no second matrix)."""
    n = matrix.shape[0]
    for a in range(0, n, block):
        b = min(a + block, n)
        diagonal = matrix[a:b, a:b]
        diagonal.copy_(diagonal.tril() + diagonal.tril(-1).mT)
        matrix[a:b, b:] = matrix[b:, a:b].mT


def padded_empty(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised [rows, cols] matrix whose rows are ROW_PAD elements longer than ``cols`` in memory
    when a row would span a multiple of 1 KiB on a CPU (a view of the first ``cols`` columns).

    With a row stride of 4 or 8 KiB (d = 1024, 2048 in float32) the rows of a column slab (a head's
    columns, M[a:, a:a + g]) fall into the same few cache sets and evict each other: the heads' Grams
    W_h^T W_h ran at 140-155 GF/s on such slabs against 190-210 on padded ones (1.57 -> 1.30 ms for 8
    heads at d = 1024, 7.7 -> 6.1 ms for 16 at 2048, 1 thread)."""
    size = torch.empty(0, dtype=dtype).element_size()
    pad = ROW_PAD if torch.device(device).type == "cpu" and (cols * size) % 1024 == 0 else 0
    return torch.empty(rows, cols + pad, dtype=dtype, device=device)[:, :cols]


def _eye_like(A: torch.Tensor, n: int) -> torch.Tensor:
    return torch.eye(n, dtype=A.dtype, device=A.device)


def _leaf_factor(A: torch.Tensor) -> None:
    """A (a leaf, n <= block) <- L^-1 in place, all of it (zeros above the diagonal); reads A's lower triangle.

    Above LEAF_HALF, in two halves (M11, M22 from LAPACK, M21 = -M22 L21 M11 from GEMMs): LAPACK's float32
    Cholesky runs at a few GF/s on CPUs at these sizes, its cost growing as n^3, so two half-size ones and
    three small GEMMs take 0.10 ms against 0.15 ms for one Cholesky + triangular inverse at n = 128.
    """
    n = A.shape[0]
    if n <= LEAF_HALF:
        A.copy_(torch.linalg.solve_triangular(cholesky(A), _eye_like(A, n), upper=False))
        return
    h = n // 2
    M11 = torch.linalg.solve_triangular(cholesky(A[:h, :h]), _eye_like(A, h), upper=False)
    L21 = A[h:, :h] @ M11.mT
    S = torch.addmm(A[h:, h:], L21, L21.mT, alpha=-1)  # L22 L22^T
    M22 = torch.linalg.solve_triangular(cholesky(S), _eye_like(A, n - h), upper=False)
    A[h:, :h] = (M22 @ L21).neg_() @ M11
    A[:h, :h] = M11
    A[:h, h:] = 0
    A[h:, h:] = M22


def _leaf_ranges(n: int, block: int, start: int = 0) -> list[tuple[int, int]]:
    """The diagonal blocks [a, b) where ``_factor_in_place`` hands over to ``_leaf_factor``."""
    if n <= block:
        return [(start, start + n)]
    k = _split(n)
    return _leaf_ranges(k, block, start) + _leaf_ranges(n - k, block, start + k)


def _lower_copy(matrix: torch.Tensor, block: int) -> torch.Tensor:
    """A copy with zeros above the leaves (what ``tril`` gives outside them) in one pass of block rows: about
    half the time of ``tril``, whose elementwise kernel is slower than a copy (2.7 against 1.4 ms at 2048)."""
    out = padded_empty(matrix.shape[0], matrix.shape[1], matrix.dtype, matrix.device)
    for a, b in _leaf_ranges(matrix.shape[0], block):
        out[a:b, :b] = matrix[a:b, :b]  # the leaf's own upper part too: the leaf overwrites all of it
        out[a:b, b:] = 0
    return out


def _factor_in_place(A: torch.Tensor, block: int) -> None:
    """Overwrite the SPD matrix in A's lower triangle by L^-1, in place.

    Only lower blocks are read, and no block above the diagonal is written but inside the leaves (of
    size <= ``block``), which are exactly lower triangular on return: what A held above them stays.
    """
    n = A.shape[0]
    if n <= block:
        _leaf_factor(A)
        return
    k = _split(n)
    M11, B = A[:k, :k], A[k:, :k]
    _factor_in_place(M11, block)
    L21t = torch.empty(k, n - k, dtype=A.dtype, device=A.device)
    _lower_times(M11, B.mT, L21t, block)  # L21^T = M11 B^T, i.e. L21 = B L11^-T
    _downdate_lower(A[k:, k:], L21t.mT, block)  # S = C - L21 L21^T = L22 L22^T
    _factor_in_place(A[k:, k:], block)  # M22 = L22^-1
    T = torch.empty(n - k, k, dtype=A.dtype, device=A.device)
    _lower_times(A[k:, k:], L21t.mT, T, block)  # M22 L21
    times_lower(T, M11, B, block)  # B is spent: it takes M21 = -M22 L21 M11
    B.neg_()


def inverse_cholesky_factor(matrix: torch.Tensor, block: int = INVERSE_BLOCK) -> torch.Tensor:
    """M = L^-1 for the Cholesky factor L of an SPD matrix H (so H^-1 = M^T M), by recursive blocks.

    With H = [[A, B^T], [B, C]], A = L11 L11^T, M11 = L11^-1:

        L21 = B M11^T,   S = C - L21 L21^T = L22 L22^T,   M22 = L22^-1,   M21 = -M22 L21 M11.

    This is the blocked Cholesky and the blocked triangular inverse in one recursion, all in GEMMs,
    where LAPACK's float32 ``potrf`` + ``trtri`` (and the ``tril`` passes torch wraps around them) run
    several times below the matrix-multiply rate on CPUs. The three products with a triangular factor
    and the symmetric downdate skip the zero (or unread) upper blocks recursively, so the whole costs
    about 2/3 n^3 flops plus the diagonal blocks' waste (one plain GEMM per product: 4/3 n^3), in one
    copy of H worked on in place. The Schur complement is formed as C - L21 L21^T, as Cholesky does, so
    the result is as accurate as LAPACK's (tested); forming it as C - B A^-1 B^T with an explicit A^-1
    instead loses a digit at d = 4096. Only the lower triangle of ``matrix`` is read. A matrix that is
    not positive definite fails in a diagonal block's Cholesky and raises NumericalError.
    """
    out = _lower_copy(matrix, block)  # the copy to work on, zero above the leaves (the factor's zeros there)
    _factor_in_place(out, block)  # (it writes no block above the diagonal but the leaves, which it fills)
    return out


def batched_inverse_factor(blocks: torch.Tensor, block: int = SMALL_BLOCK) -> torch.Tensor:
    """L^-1 for each SPD matrix of a batch ([U, g, g]) by the same recursion with plain batched GEMMs.

    For the heads' diagonal blocks (head_dim 64 to 128) this is 2-3x faster than LAPACK's batched
    ``potrf`` + ``potri`` on CPUs; NumericalError if a block is not positive definite. The leaves'
    Choleskys are checked once at the end (a few dozen fewer small ops a call: at these sizes each op's
    overhead is a good part of the time). Only the result's diagonal is checked for NaN or infinity: a bad
    entry of a block reaches every later pivot of its leaf and, through the Schur complements, the later
    leaves, and the diagonal of L^-1 is those pivots' inverses (a whole-result check was a third of the
    call at 8 blocks of 128).
    """
    infos: list[torch.Tensor] = []
    out = _batched_factor(blocks, block, infos)
    if bool(torch.stack(infos).any()) or not bool(out.diagonal(dim1=-2, dim2=-1).isfinite().all()):
        raise NumericalError(NOT_PD)
    return out


def _batched_factor(blocks: torch.Tensor, block: int, infos: list[torch.Tensor]) -> torch.Tensor:
    """``batched_inverse_factor`` without the check; each leaf appends LAPACK's ``info`` ([U]) to ``infos``
    (a failed leaf leaves garbage that the final finiteness check may miss, but never a zero info)."""
    n = blocks.shape[-1]
    if n <= block:
        L, info = torch.linalg.cholesky_ex(blocks)
        infos.append(info)
        return torch.linalg.solve_triangular(L, _eye_like(blocks, n), upper=False)  # (the identity broadcasts)
    k = n // 2
    M11 = _batched_factor(blocks[:, :k, :k], block, infos)
    L21 = blocks[:, k:, :k] @ M11.mT
    M22 = _batched_factor(torch.baddbmm(blocks[:, k:, k:], L21, L21.mT, alpha=-1), block, infos)
    out = blocks.new_empty(blocks.shape)
    out[:, :k, :k] = M11
    out[:, :k, k:] = 0
    out[:, k:, k:] = M22
    out[:, k:, :k] = (M22 @ L21).neg_() @ M11
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
