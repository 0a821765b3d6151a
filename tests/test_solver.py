"""The OBS maths: least-squares optimality, exact group scores, fast == reference, group sizes."""

from __future__ import annotations

import math

import pytest
import torch

from slimgpt.errors import NumericalError
from slimgpt.solver.hessian import InputStatistics, damped_inverse, prepare_hessian
from slimgpt.solver.obs import FastSolver, ReferenceSolver, group_cost, group_scores, reconstruction_error
from slimgpt.solver.structured import greedy_remove_units, group_sizes, remove_channels


def _layer(d_out: int = 12, d_in: int = 32, tokens: int = 400, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    mixing = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) / math.sqrt(d_in)
    X = mixing @ torch.randn(d_in, tokens, generator=g, dtype=torch.float64)  # correlated inputs
    H = 2 * X @ X.t() / tokens
    return W, X, H


@pytest.mark.parametrize("solver_cls", [ReferenceSolver, FastSolver])
def test_obs_update_is_the_least_squares_optimum(solver_cls: type) -> None:
    W, X, H = _layer()
    P = torch.tensor([3, 7, 8, 20])
    solver = solver_cls(W, H, compensate=True)  # float64 end to end
    solver.remove(P)
    keep = torch.tensor([j for j in range(W.shape[1]) if j not in P.tolist()])
    # argmin_V ||W X - V X_keep||^2
    optimum = torch.linalg.lstsq(X[keep].t(), (W @ X).t()).solution.t()
    assert torch.allclose(solver.weight[:, keep], optimum, rtol=1e-6, atol=1e-8)
    assert torch.all(solver.weight[:, P] == 0)


def test_compensation_never_worse_than_dropping() -> None:
    for seed in range(5):
        W, _, H = _layer(seed=seed)
        W, H = W.float(), H.float()
        P = torch.randperm(W.shape[1], generator=torch.Generator().manual_seed(seed))[:10]
        solver = FastSolver(W, H, compensate=True)
        solver.remove(P)
        dropped = W.clone()
        dropped[:, P] = 0
        assert reconstruction_error(W, solver.weight, H) <= reconstruction_error(W, dropped, H) + 1e-7


def test_grouped_cholesky_score_equals_sequential_obs_cost() -> None:
    W, _, H = _layer(d_in=24)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    units = torch.arange(24).view(6, 4)  # 6 "heads" of head_dim 4
    scores = group_scores(W, Hinv, units, "gcd")
    for h in range(6):
        solver = ReferenceSolver(W, H, compensate=True)
        solver.remove(units[h])
        delta = solver.weight - W
        cost = torch.einsum("ij,jk,ik->", delta, H, delta)  # = 2 x the layer-wise squared error
        assert scores[h].item() == pytest.approx(cost.item(), rel=1e-8)
        assert scores[h].item() == pytest.approx(group_cost(W, Hinv, units[h]), rel=1e-8)
    # The -GCD ablation scores each column alone, which ignores their correlation.
    diag = group_scores(W, Hinv, units, "diag")
    assert not torch.allclose(diag, scores)


@pytest.mark.parametrize("seed", range(4))
def test_fast_solver_matches_reference_for_heads(seed: int) -> None:
    W, _, H = _layer(d_out=16, d_in=64, seed=seed)
    W, H = W.float(), prepare_hessian(H.float(), W.float().clone(), 0.01)
    units = torch.arange(64).view(8, 8)
    results = []
    for cls in (ReferenceSolver, FastSolver):
        solver = cls(W, H, compensate=True)
        removed = greedy_remove_units(solver, units, rounds=5, score="gcd")
        results.append((removed, solver.weight))
    assert results[0][0] == results[1][0]
    rel = (results[0][1] - results[1][1]).norm() / results[0][1].norm()
    assert rel < 1e-4


@pytest.mark.parametrize("seed", range(4))
def test_fast_solver_matches_reference_for_channels(seed: int) -> None:
    W, _, H = _layer(d_out=16, d_in=96, seed=seed)
    W, H = W.float(), prepare_hessian(H.float(), W.float().clone(), 0.01)
    sizes = group_sizes(60, "halving", start=32, floor=2)
    results = []
    for cls in (ReferenceSolver, FastSolver):
        solver = cls(W, H, compensate=True)
        removed = remove_channels(solver, sizes)
        results.append((sorted(removed), solver.weight))
    assert results[0][0] == results[1][0]
    assert (results[0][1] - results[1][1]).norm() / results[0][1].norm() < 1e-4


def test_query_head_buckets_remove_evenly() -> None:
    W, _, H = _layer(d_out=8, d_in=32)
    solver = FastSolver(W.float(), H.float(), compensate=True)
    units = torch.arange(32).view(8, 4)
    buckets = [[0, 1, 2, 3], [4, 5, 6, 7]]
    removed = greedy_remove_units(solver, units, rounds=2, buckets=buckets)
    assert sum(u < 4 for u in removed) == 2 and sum(u >= 4 for u in removed) == 2


@pytest.mark.parametrize("schedule", ["halving", "authors", "fixed"])
@pytest.mark.parametrize("total", [1, 7, 100, 5504])
def test_group_sizes_sum_to_total(schedule: str, total: int) -> None:
    sizes = group_sizes(total, schedule)
    assert sum(sizes) == total and all(s > 0 for s in sizes)
    if schedule == "fixed":
        assert sizes == [total]
    if schedule == "halving":
        assert sizes == sorted(sizes, reverse=True)


def test_input_statistics_running_mean() -> None:
    x = torch.randn(3, 50, 6)
    stats = InputStatistics(6, "cpu")
    for part in x:
        stats.add(part)
    flat = x.reshape(-1, 6)
    assert torch.allclose(stats.hessian, 2 * flat.t() @ flat / flat.shape[0], atol=1e-5)
    assert torch.allclose(stats.mean, flat.mean(0), atol=1e-6)
    diag = InputStatistics(6, "cpu", full=False)
    diag.add(flat)
    assert torch.allclose(diag.diagonal, stats.diagonal, atol=1e-5)


def test_dead_inputs_are_zeroed_and_decoupled() -> None:
    W, _, H = _layer(d_in=8)
    H = H.float().clone()
    H[2, :] = 0
    H[:, 2] = 0
    W = W.float().clone()
    damped = prepare_hessian(H, W, 0.01)
    assert torch.all(W[:, 2] == 0)
    torch.linalg.cholesky(damped)  # positive definite now


def test_damping_is_raised_then_a_clear_error() -> None:
    indefinite = -torch.eye(4)
    with pytest.raises(NumericalError, match="damping"):
        damped_inverse(indefinite, 0.01, max_tries=2)
    nearly_singular = torch.ones(4, 4)  # rank one: fails without extra damping, passes with it
    inverse = damped_inverse(nearly_singular, 0.0)
    assert torch.isfinite(inverse).all()
