"""MoDeGPT's closed-form module solutions and its per-layer budget (slimgpt.methods.modegpt).

Row-vector convention of the paper, x W; PyTorch stores W^T, so the functions here take and return
PyTorch layouts (rows = outputs) and say so.

- FFN (Nystrom): keep the intermediate channels of largest ridge leverage diag(C (C + lambda I)^-1),
  C the Gram of down_proj's inputs; down_proj is then re-fit by least squares (slimgpt.solver.restore).
- Query/key (CR decomposition): per KV head, score each RoPE pair (i, i + d/2) by
  ||C_q^1/2 e_i||^2 ||C_k^1/2 e_i||^2 + (the same at i + d/2) and keep the best pairs, rows only.
  ||C^1/2 e_i||^2 = C_ii, so only the diagonals of the head's q / k output Grams are needed.
- Value/output (SVD): per KV group, the rank-k approximation of C^1/2 W_V [W_O^h ...] (C the Gram of
  v_proj's input), which is exact at full rank.
- Budget: phi_l = L * mean_phi * softmax(-BI / eps)_l, capped, the excess redistributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def ridge_leverage(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge-leverage scores diag(C (C + lambda I)^-1) = 1 - lambda diag((C + lambda I)^-1).

    lambda = ``ridge`` * mean(diag C), so the scores do not depend on C's scale.
    """
    C = gram.to(torch.float64)
    lam = ridge * float(C.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    inverse = torch.linalg.inv(C + lam * torch.eye(C.shape[0], dtype=torch.float64, device=C.device))
    return 1 - lam * inverse.diagonal()


def keep_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest scores, ascending (ties: the lower index)."""
    order = torch.argsort(-scores.to(torch.float64), stable=True)
    return order[:count].sort().values


def rope_pair_scores(q_diag: torch.Tensor, k_diag: torch.Tensor) -> torch.Tensor:
    """Scores of the d/2 RoPE pairs of one KV head; q_diag / k_diag: diag of the q / k output Grams [d].

    q_diag sums the diagonals of every query head sharing the KV head (they share the selection).
    """
    half = q_diag.shape[-1] // 2
    qk = q_diag.to(torch.float64) * k_diag.to(torch.float64)
    return qk[:half] + qk[half:]


def pair_rows(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The q/k feature indices of ``pairs`` inside one head, in the layout rotate_half expects: [P, P + d/2]."""
    return torch.cat([pairs, pairs + head_dim // 2])


def low_rank_vo(v_weight: torch.Tensor, o_weights: list[torch.Tensor], gram: torch.Tensor, rank: int,
                ridge: float = 1e-4) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The rank-``rank`` value/output pair of one KV group that best keeps C^1/2 W_V W_O.

    v_weight: the group's v_proj rows [d, n] (PyTorch layout; a bias may be a last column of n, with
    a constant-one input in ``gram``); o_weights: each query head's o_proj columns [d_out, d]; gram: C
    [n, n]. Returns v rows [rank, n] and each head's o columns [d_out, rank].

    With R^T R = W_V^T C W_V + lambda I (lambda = ``ridge`` * mean diagonal) and R B = U S V^T for
    B = [W_O^h ...], W_V' = W_V R^-1 U_k, W_O' = S_k V_k^T: the optimum of ||C^1/2 (W_V B - W_V' W_O')||
    over rank k (C^1/2 W_V R^-1 has orthonormal columns when lambda = 0), without C^-1/2; at full rank
    W_V' W_O' = W_V B exactly, whatever lambda.
    """
    Wv = v_weight.to(torch.float64)  # [d, n]
    C = gram.to(Wv.device, torch.float64)
    G = Wv @ C @ Wv.T
    G = (G + G.T) / 2
    lam = ridge * float(G.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    L = torch.linalg.cholesky(G + lam * torch.eye(G.shape[0], dtype=torch.float64, device=G.device))
    B = torch.cat([o.to(Wv.device, torch.float64).T for o in o_weights], dim=1)  # [d, heads * d_out]
    U, S, Vh = torch.linalg.svd(L.T @ B, full_matrices=False)
    left = torch.linalg.solve_triangular(L.T, U[:, :rank], upper=True)  # R^-1 U_k [d, rank]
    v_new = left.T @ Wv  # [rank, n]
    right = S[:rank, None] * Vh[:rank]  # [rank, heads * d_out]
    d_out = o_weights[0].shape[0]
    o_new = [right[:, h * d_out:(h + 1) * d_out].T.contiguous() for h in range(len(o_weights))]
    return v_new.to(v_weight.dtype), [o.to(o_weights[0].dtype) for o in o_new]


def allocate_sparsity(importance: list[float], mean_sparsity: float, smoothing: float,
                      cap: float = 0.8) -> list[float]:
    """Per-layer sparsity phi_l = L * mean_sparsity * softmax(-BI / smoothing)_l, capped at ``cap``.

    The excess of capped layers goes to the others in proportion to their share, until none exceeds the
    cap (so the mean stays ``mean_sparsity`` while that is below ``cap``).
    """
    bi = torch.tensor(importance, dtype=torch.float64)
    n = len(importance)
    phi = n * mean_sparsity * torch.softmax(-bi / smoothing, dim=0)
    for _ in range(n):
        over = phi > cap
        if not bool(over.any()):
            break
        excess = float((phi[over] - cap).sum())
        phi[over] = cap
        free = phi < cap
        if not bool(free.any()) or float(phi[free].sum()) <= 0:
            break
        phi[free] += excess * phi[free] / phi[free].sum()
    return [float(p) for p in phi.clamp(0.0, cap)]


@dataclass(frozen=True)
class LayerCost:
    """A layer's parameter count as a function of its q/k head dim, v head dim and FFN width."""

    fixed: int  # norms, output biases: what no width changes
    per_qk: int  # one q/k head dim in every query and KV head (weights and biases)
    per_v: int  # one v head dim: a v_proj row per KV head, an o_proj column per query head
    per_channel: int  # one FFN channel
    head_dim: int
    ffn_dim: int

    def params(self, dims: LayerDims) -> int:
        return self.fixed + self.per_qk * dims.qk + self.per_v * dims.v + self.per_channel * dims.ffn


@dataclass(frozen=True)
class LayerDims:
    """A pruned layer's q/k head dim (even: whole RoPE pairs), v head dim (the V/O rank) and FFN width."""

    qk: int
    v: int
    ffn: int


def dims_for(cost: LayerCost, sparsity: float) -> LayerDims:
    """Keep 1 - ``sparsity`` of the q/k dim (in pairs), of the V/O rank and of the FFN width."""
    keep = 1.0 - sparsity
    hd = cost.head_dim
    return LayerDims(qk=min(hd, max(2, 2 * int(keep * hd / 2 + 0.5))), v=min(hd, max(1, int(keep * hd + 0.5))),
                     ffn=min(cost.ffn_dim, max(1, int(keep * cost.ffn_dim + 0.5))))


def plan_budget(costs: list[LayerCost], importance: list[float], target_params: int, smoothing: float,
                cap: float = 0.8) -> tuple[float, list[float], list[LayerDims]]:
    """The mean sparsity, per-layer sparsities and dims whose parameter count is closest to the target.

    Bisection on the mean sparsity of ``allocate_sparsity`` finds the largest model not above the
    target; FFN channels are then given back one at a time (to the least sparse layers first) while that
    brings the count closer, so the count is within half an FFN channel of ``target_params``.
    Returns (mean sparsity, sparsities, dims); None of it changes when the target is the dense size.
    """
    def total(dims: list[LayerDims]) -> int:
        return sum(c.params(d) for c, d in zip(costs, dims, strict=True))

    full = [LayerDims(c.head_dim, c.head_dim, c.ffn_dim) for c in costs]
    if target_params >= total(full):
        return 0.0, [0.0] * len(costs), full
    lo, hi = 0.0, cap
    if total([dims_for(c, p) for c, p in zip(costs, allocate_sparsity(importance, hi, smoothing, cap),
                                               strict=True)]) > target_params:
        raise ValueError(f"the target is below what a sparsity cap of {cap} per layer allows")
    for _ in range(60):
        mid = (lo + hi) / 2
        phi = allocate_sparsity(importance, mid, smoothing, cap)
        if total([dims_for(c, p) for c, p in zip(costs, phi, strict=True)]) > target_params:
            lo = mid
        else:
            hi = mid
    phi = allocate_sparsity(importance, hi, smoothing, cap)
    dims = [dims_for(c, p) for c, p in zip(costs, phi, strict=True)]
    order = sorted(range(len(costs)), key=lambda i: (phi[i], i))
    base = [d.ffn for d in dims]
    while True:
        gap = target_params - total(dims)
        grow = [i for i in order if dims[i].ffn < costs[i].ffn_dim and costs[i].per_channel < 2 * gap]
        if not grow:
            break
        i = min(grow, key=lambda j: (dims[j].ffn - base[j], order.index(j)))  # round-robin, least sparse first
        dims[i] = LayerDims(dims[i].qk, dims[i].v, dims[i].ffn + 1)
    return hi, phi, dims
