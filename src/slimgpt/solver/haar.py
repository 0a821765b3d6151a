"""Orthogonal matrices as quantised sphere angles with their Haar density, for bits-back coding.

Any orthogonal d×d matrix R factors as R = H(u_1) diag(1, H(u_2) diag(1, ... diag(1, s))), where u_k is
a unit vector of R^(d-k+1) (the first column of what is left at stage k), H(u) is the Householder
reflection that maps e_1 to u, and s = ±1 is the 1×1 remainder. Under the Haar measure on O(d) the u_k
are independent and uniform on their spheres and s is a fair sign (the usual construction of a Haar
matrix, column by column). A unit vector u of R^m has m - 1 hyperspherical angles:

    phi_j in [0, pi] for j = 0 .. m-3, with density proportional to sin(phi_j)^(m-2-j)
    phi_(m-2) in [0, 2 pi), uniform

so R has d(d-1)/2 angles and one sign, and their Haar density is a product of one-dimensional ones.
An angle is quantised to ``bits`` bits per pi: index g covers [g delta, (g + 1) delta), delta = pi / 2^bits,
and decodes to the bin centre. ``exponents(d)`` says which density each symbol has (p >= 0: sin^p;
UNIFORM_ANGLE: uniform on [0, 2 pi); SIGN: a fair bit). Everything here is float64 torch.
"""

from __future__ import annotations

import math

import torch

UNIFORM_ANGLE = -1  # the last angle of each sphere: uniform on [0, 2 pi)
SIGN = -2  # the 1x1 remainder: a fair sign


def exponents(d: int) -> torch.Tensor:
    """The density of each of the d(d-1)/2 + 1 symbols of a d×d rotation, in coding order."""
    parts = []
    for m in range(d, 1, -1):
        parts.append(torch.arange(m - 2, 0, -1, dtype=torch.int64))
        parts.append(torch.tensor([UNIFORM_ANGLE]))
    parts.append(torch.tensor([SIGN]))
    return torch.cat(parts)


def alphabet_size(exponent: int, bits: int) -> int:
    """How many values a symbol with this density takes."""
    if exponent == SIGN:
        return 2
    return 2 ** (bits + 1) if exponent == UNIFORM_ANGLE else 2**bits


def log_density(exponent: int, centres: torch.Tensor) -> torch.Tensor:
    """Unnormalised log Haar density of angle bins at ``centres`` (radians)."""
    if exponent <= 0:
        return torch.zeros_like(centres)
    return exponent * torch.log(torch.sin(centres).clamp_min(1e-300))


def _householder(u: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """H(u) @ block, H(u) the reflection with H e_1 = u (the identity when u is e_1)."""
    w = -u.clone()
    w[0] += 1.0
    norm2 = float(w @ w)
    if norm2 < 1e-30:
        return block
    return block - (2.0 / norm2) * torch.outer(w, w @ block)


def unit_from_angles(angles: torch.Tensor) -> torch.Tensor:
    """The unit vector of R^(m) with hyperspherical ``angles`` (m - 1 of them)."""
    sines = torch.cat([torch.ones(1, dtype=angles.dtype), torch.cumprod(torch.sin(angles), 0)])
    cosines = torch.cat([torch.cos(angles), torch.ones(1, dtype=angles.dtype)])
    return sines * cosines


def angles_of(u: torch.Tensor) -> torch.Tensor:
    """Hyperspherical angles of a (nearly) unit vector u of R^m, m >= 2: inverse of ``unit_from_angles``."""
    tails = torch.sqrt(torch.flip(torch.cumsum(torch.flip(u[1:] ** 2, [0]), 0), [0]))
    angles = torch.atan2(tails[:-1], u[:-2]) if u.numel() > 2 else u.new_zeros(0)
    last = torch.remainder(torch.atan2(u[-1], u[-2]), 2 * math.pi)
    return torch.cat([angles, last.reshape(1)])


def angle_values(indices: torch.Tensor, bits: int) -> torch.Tensor:
    return (indices.to(torch.float64) + 0.5) * (math.pi / 2**bits)


def angle_indices(angles: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantised bins of ``angles`` (the last one on [0, 2 pi), the others on [0, pi])."""
    g = torch.floor(angles / (math.pi / 2**bits)).to(torch.int64)
    top = torch.full_like(g, 2**bits - 1)
    top[-1] = 2 ** (bits + 1) - 1
    return torch.minimum(g.clamp_min(0), top)


def rotation_from_symbols(symbols: torch.Tensor, d: int, bits: int) -> torch.Tensor:
    """The d×d orthogonal matrix that ``symbols`` (layout of ``exponents(d)``) quantise."""
    q = torch.tensor([[1.0 if int(symbols[-1]) == 0 else -1.0]], dtype=torch.float64)
    ends = _stage_ends(d)
    for m in range(2, d + 1):  # innermost stage (m = 2) first
        start, end = ends[d - m], ends[d - m + 1]
        u = unit_from_angles(angle_values(symbols[start:end], bits))
        block = torch.eye(m, dtype=torch.float64)
        block[1:, 1:] = q
        q = _householder(u, block)
    return q


def _stage_ends(d: int) -> list[int]:
    """Offsets of each stage's angles in the symbol layout (stage k has d - k - 1 angles)."""
    ends = [0]
    for m in range(d, 1, -1):
        ends.append(ends[-1] + m - 1)
    return ends


def recover_symbols(approx: torch.Tensor, bits: int, truth: torch.Tensor | None = None,
                    corrections: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The symbols of a rotation from an approximation of it, and the corrections they needed.

    Stage by stage, the angles of the first column of ``approx`` are quantised (the raw symbols); the
    true symbols are ``truth`` (the encoder, which knows them) or raw + ``corrections`` (the decoder);
    the exact column they quantise is then reflected out, so both sides compute the same raw symbols.
    Returns (true symbols, true - raw).
    """
    d = approx.shape[0]
    if (truth is None) == (corrections is None):
        raise ValueError("pass exactly one of truth and corrections")
    known = truth if truth is not None else corrections
    assert known is not None and known.numel() == d * (d - 1) // 2 + 1
    ends = _stage_ends(d)
    raw = torch.empty(ends[-1] + 1, dtype=torch.int64)
    true = known.clone() if truth is not None else torch.empty_like(raw)
    q = approx.to(torch.float64)
    for k in range(d - 1):
        start, end = ends[k], ends[k + 1]
        raw[start:end] = angle_indices(angles_of(q[:, 0]), bits)
        if truth is None:
            true[start:end] = raw[start:end] + known[start:end]
            true[end - 1] %= 2 ** (bits + 1)  # the uniform angle wraps around
        u = unit_from_angles(angle_values(true[start:end], bits))
        q = _householder(u, q)[1:, 1:]
    raw[-1] = 0 if float(q[0, 0]) >= 0 else 1
    if truth is None:
        true[-1] = raw[-1] + known[-1]
    delta = true - raw
    last = torch.tensor(ends[1:], dtype=torch.int64) - 1  # each stage's uniform angle: the shorter way round
    half = 2**bits
    delta[last] = torch.remainder(delta[last] + half, 2 * half) - half
    return true, delta


def canonical_basis(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal Q of x = Q T with T upper triangular and a non-negative diagonal (x: d×d or d×n)."""
    q, t = torch.linalg.qr(x.to(torch.float64))
    signs = torch.where(torch.diagonal(t) < 0, -1.0, 1.0).to(torch.float64)
    return q * signs[None, :]


def pivot_columns(writer_form: torch.Tensor, candidates: int = 8) -> torch.Tensor:
    """d well-conditioned columns of a d×n matrix, in greedy pivoted-QR order (largest residual first).

    Among the ``candidates`` × d columns of largest norm, each step takes the column with the largest
    norm orthogonal to those taken (Businger-Golub). The choice is invariant under a left orthogonal
    factor, so the columns fix a frame that moves with the basis; their QR is far better conditioned
    than that of the first d columns.
    """
    d, n = writer_form.shape
    x = writer_form.to(torch.float64)
    pool = torch.argsort(-(x**2).sum(0), stable=True)[: candidates * d] if n > candidates * d else torch.arange(n)
    rest = x[:, pool].clone()
    norms = (rest**2).sum(0)
    chosen = []
    for _ in range(min(d, pool.numel())):
        j = int(torch.argmax(norms))
        chosen.append(j)
        v = rest[:, j] / torch.linalg.vector_norm(rest[:, j])
        rest -= torch.outer(v, v @ rest)
        norms = (rest**2).sum(0)
        norms[chosen] = -1.0
    return pool[torch.tensor(chosen, dtype=torch.int64)]
