"""Discrete optimal transport for neuron merging (DOTResize; docs/method.md, DOTResize).

A layer's n neurons (here the inputs of a consumer matrix: the FFN channels that down_proj reads) are the
source measure, m chosen target neurons the target measure, both uniform. The ground cost is the squared
L2 distance between two neurons' activation vectors over the calibration tokens, which the inputs' second
moment G = E[x x^T] (or any multiple of it, such as the OBS Hessian H = 2 E[x x^T]) gives without storing
the activations:

    C_ij = ||a_i - a_j||^2 ∝ G_ii + G_jj - 2 G_ij                                    (``activation_cost``)

The entropic plan

    P* = argmin_{P >= 0, P 1 = a, P^T 1 = b} <P, C> + eps sum_ij P_ij (log P_ij - 1)

is computed by Sinkhorn's iterations (``sinkhorn_log``: in the kernel domain where exp(-C / eps) is safely
representable, else in the log domain, where the dual potentials never pass through it, so a small eps
cannot underflow). ``merge_columns`` folds the plan into the
consumer: Q = diag(a)^-1 P (each source's row sums to one: where its mass goes), and the consumer's
target columns become W Q, i.e. source i's column is added to the targets in the proportions of its row of
the plan. This is exact when each source's activation equals its targets' (duplicated neurons) and
otherwise assumes a_i ≈ sum_j Q_ij a_j.

Why not POT (the ``pot`` package, whose ``ot.sinkhorn(..., method="sinkhorn_log")`` solves the same
problem and accepts torch tensors): the solver is twenty lines of torch, and a dependency with compiled
extensions for it would be out of proportion; tests/solver/test_transport.py checks these plans against
POT's where it is installed (the ``dev`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimgpt.errors import NumericalError
from slimgpt.solver.restore import column_indices

CHECK_EVERY = 10  # rounds between two checks of the marginals (a check costs as much as a round)


def activation_cost(gram: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """C_ij = G_ii + G_jj - 2 G_ij (clamped at 0 against round-off), in float64.

    gram: G [n, n], symmetric PSD, the second moment of the n neurons' activations (any positive multiple:
    the cost scales with it); targets: the target neurons' indices [m] (None: all n). Returns [n, m].
    """
    G = gram.to(torch.float64)
    diagonal = G.diagonal()
    columns = torch.arange(G.shape[0], device=G.device) if targets is None else targets.to(G.device)
    cost = diagonal[:, None] + diagonal[columns][None, :] - 2 * G[:, columns]
    return cost.clamp_min(0.0)


@dataclass(frozen=True)
class SinkhornResult:
    plan: torch.Tensor  # P [n, m], float64; rows sum to a exactly (to round-off), columns to b within tol
    iterations: int
    marginal_error: float  # sum_j |P^T 1 - b|_j at the end (L1; rows are exact after the last update)
    epsilon: float  # the absolute regularisation used


def sinkhorn_log(cost: torch.Tensor, source: torch.Tensor | None = None, target: torch.Tensor | None = None,
                 epsilon: float = 0.05, relative: bool = True, max_iter: int = 2000,
                 tol: float = 1e-9, domain: str = "auto") -> SinkhornResult:
    """The entropic OT plan between ``source`` (a, [n]) and ``target`` (b, [m]) for ``cost`` C [n, m].

    a and b default to uniform (1/n, 1/m) and must each sum to one. ``epsilon`` is eps itself or, with
    ``relative`` (the default), a multiple of mean(C), so one value fits costs of any scale. Sinkhorn's
    alternating updates of the dual potentials f, g (P_ij = exp((f_i + g_j - C_ij) / eps)),

        g_j = eps log b_j - eps logsumexp_i((f_i - C_ij) / eps)
        f_i = eps log a_i - eps logsumexp_j((g_j - C_ij) / eps),

    stop when the column marginals' L1 error falls below ``tol`` (checked every ``CHECK_EVERY`` rounds; the
    rows are exact after each f update) or after ``max_iter`` rounds. ``domain`` "auto" (the default) runs
    the same iteration in the kernel domain first (u = a / K v, v = b / K^T u: two matrix-vector products a
    round instead of two exponentials of C), with K_ij = exp(-(C_ij - min_k C_ik) / eps): the row shift is
    absorbed by u and leaves a 1 in every row, and in every column whose target is also a source (as in
    neuron merging, C_jj = 0), so no row or column of K underflows whatever eps; if a scaling still leaves
    the float range it falls back to the log-domain form above, which never forms K. "kernel" / "log" force
    one. Deterministic: float64, fixed order, no randomness.
    """
    C = cost.to(torch.float64)
    n, m = C.shape
    a = torch.full((n,), 1.0 / n, dtype=C.dtype, device=C.device) if source is None else source.to(C)
    b = torch.full((m,), 1.0 / m, dtype=C.dtype, device=C.device) if target is None else target.to(C)
    for name, mass in (("source", a), ("target", b)):
        if mass.shape != (C.shape[0] if name == "source" else C.shape[1],):
            raise ValueError(f"the {name} masses have shape {tuple(mass.shape)}, the cost {tuple(C.shape)}")
        if bool((mass <= 0).any()) or abs(float(mass.sum()) - 1.0) > 1e-9:
            raise ValueError(f"the {name} masses must be positive and sum to one")
    scale = float(C.mean()) if relative else 1.0
    eps = epsilon * (scale if scale > 0 else 1.0)
    if not eps > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    if domain not in ("auto", "kernel", "log"):
        raise ValueError(f"unknown Sinkhorn domain {domain!r}: auto, kernel or log")
    result = None if domain == "log" else _sinkhorn_kernel(C, a, b, eps, max_iter, tol)
    if result is None and domain == "kernel":
        raise NumericalError("the kernel-domain Sinkhorn scalings overflowed: use the log domain or a larger eps")
    if result is None:
        result = _sinkhorn_log_domain(C, a, b, eps, max_iter, tol)
    if not bool(torch.isfinite(result.plan).all()):
        raise NumericalError("the Sinkhorn plan is not finite: raise the transport epsilon")
    return result


def _column_error(plan: torch.Tensor, b: torch.Tensor) -> float:
    return float((plan.sum(0) - b).abs().sum())


def _sinkhorn_kernel(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int,
                     tol: float) -> SinkhornResult | None:
    """Sinkhorn-Knopp on the row-shifted kernel; None if a scaling leaves the float range."""
    K = torch.exp(-(C - C.min(dim=1, keepdim=True).values) / eps)
    v = torch.ones_like(b)
    u = a / (K @ v)
    error, iterations = float("inf"), 0
    for iterations in range(1, max_iter + 1):
        v = b / (K.t() @ u)
        u = a / (K @ v)
        if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(v).all())):
            return None
        if iterations % CHECK_EVERY and iterations != max_iter:
            continue
        error = _column_error(u[:, None] * K * v[None, :], b)
        if error < tol:
            break
    plan = u[:, None] * K * v[None, :]
    return SinkhornResult(plan, iterations, error, eps)


def _sinkhorn_log_domain(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, max_iter: int,
                         tol: float) -> SinkhornResult:
    """Sinkhorn on the dual potentials: no exp(-C / eps) is formed, so a small eps cannot underflow."""
    log_a, log_b = a.log(), b.log()
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    error, iterations = float("inf"), 0
    for iterations in range(1, max_iter + 1):
        g = eps * (log_b - torch.logsumexp((f[:, None] - C) / eps, dim=0))
        f = eps * (log_a - torch.logsumexp((g[None, :] - C) / eps, dim=1))
        if iterations % CHECK_EVERY and iterations != max_iter:
            continue
        error = _column_error(((f[:, None] + g[None, :] - C) / eps).exp(), b)
        if error < tol:
            break
    plan = ((f[:, None] + g[None, :] - C) / eps).exp()
    return SinkhornResult(plan, iterations, error, eps)


def merge_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, epsilon: float = 0.05,
                  max_iter: int = 2000, tol: float = 1e-9) -> tuple[torch.Tensor, SinkhornResult]:
    """W' with W'[:, M] = W Q, Q = n P* (rows sum to one), and the other columns zero.

    weight: the consumer W [d_out, n]; gram: the second moment of its n inputs [n, n]; keep: the target
    columns M ([m] long, or an [n] boolean mask). P* is ``sinkhorn_log`` of ``activation_cost`` between all
    n inputs (uniform 1/n) and the m targets (uniform 1/m), with ``epsilon`` relative to mean(C). Returns
    W' in W's dtype on W's device, and the Sinkhorn result (the plan, its iterations and marginal error).
    """
    n = weight.shape[1]
    if gram.shape != (n, n):
        raise ValueError(f"the Gram matrix has shape {tuple(gram.shape)}, W has {n} input columns")
    targets = column_indices(keep, weight.device)
    merged = torch.zeros(weight.shape, dtype=torch.float64, device=weight.device)
    if targets.numel() == 0:
        return merged.to(weight.dtype), SinkhornResult(torch.zeros(n, 0, dtype=torch.float64), 0, 0.0, 0.0)
    result = sinkhorn_log(activation_cost(gram.to(weight.device), targets), epsilon=epsilon, max_iter=max_iter,
                          tol=tol)
    Q = result.plan * n  # rows of P sum to 1/n: each source's distribution over the targets
    merged[:, targets] = weight.to(torch.float64) @ Q
    return merged.to(weight.dtype), result
