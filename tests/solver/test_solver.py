"""The OBS maths: least-squares optimality, exact group scores, fast == reference, group sizes."""

from __future__ import annotations

import math

import pytest
import torch

from slimgpt.errors import NumericalError
from slimgpt.solver.base import Solver
from slimgpt.solver.hessian import InputStatistics, damped_inverse, prepare_hessian
from slimgpt.solver.linalg import batched_inverse_factor, inverse_cholesky_factor, spd_inverse, times_lower
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


@pytest.mark.parametrize("width", [257, 300])
def test_wide_inputs_accumulate_a_triangle_and_read_the_whole_hessian(width: int) -> None:
    """From TRIANGLE_FROM inputs on only the lower triangle is accumulated; the Hessian read is still the
    symmetric mean of 2 x x^T, also when it is read between batches and when the width does not split evenly."""
    from slimgpt.solver.hessian import TRIANGLE_FROM

    assert width >= TRIANGLE_FROM
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, width, generator=g, dtype=torch.float64).float()
    stats = InputStatistics(width, "cpu")
    assert stats.lower_only
    for i, part in enumerate(x):
        stats.add(part)
        seen = x[:i + 1].reshape(-1, width).double()
        expected = 2 * seen.t() @ seen / seen.shape[0]
        H = stats.hessian
        assert torch.equal(H, H.t())
        assert float((H.double() - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    narrow = InputStatistics(TRIANGLE_FROM - 1, "cpu")
    assert not narrow.lower_only


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


# --- The fast solver's own paths: GEMM inverse, compacted state, score fast paths, thread counts ---


def _spd(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (A @ A.t() / n + 0.05 * torch.eye(n, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("n", [64, 200, 333, 700])
def test_block_inverse_equals_the_inverse(n: int) -> None:
    H = _spd(n, seed=n)
    inverse = spd_inverse(H, block=64)  # several recursion levels, uneven splits
    truth = torch.linalg.inv(H)
    M = inverse_cholesky_factor(H, block=64)
    assert torch.equal(M, M.tril())  # the inverse of the Cholesky factor: lower triangular
    assert (M @ torch.linalg.cholesky(H) - torch.eye(n, dtype=H.dtype)).abs().max() < 1e-10
    assert (inverse - truth).norm() / truth.norm() < 1e-10
    single = spd_inverse(H.float(), block=64).double()
    lapack = torch.cholesky_inverse(torch.linalg.cholesky(H.float())).double()
    # float32: no further from the truth than LAPACK's own float32 inverse, up to a small factor
    assert (single - truth).norm() <= 4 * (lapack - truth).norm() + 1e-6 * truth.norm()


def test_block_inverse_rejects_an_indefinite_matrix() -> None:
    H = _spd(300, seed=1)
    H[250, 250] = -1.0  # a negative pivot in the second block
    with pytest.raises(NumericalError, match="damping"):
        spd_inverse(H, block=64)


def _pruned_pair(seed: int, d_in: int = 48) -> tuple[FastSolver, torch.Tensor, torch.Tensor, torch.Tensor]:
    W, X, H = _layer(d_out=10, d_in=d_in, seed=seed)
    solver = FastSolver(W, H, compensate=True)
    order = torch.randperm(d_in, generator=torch.Generator().manual_seed(seed))
    for part in (order[:5], order[5:7], order[7:16]):  # holes in front and survivors at the tail
        solver.remove(part)
    return solver, W, X, H


@pytest.mark.parametrize("seed", range(3))
def test_factored_state_equals_the_masked_one(seed: int) -> None:
    solver, W, X, H = _pruned_pair(seed)
    pruned = solver.pruned
    keep = (~pruned).nonzero().flatten()
    assert int(pruned.sum()) == 16
    masked = H.clone()  # H with the removed columns decoupled, inverted from scratch
    masked[pruned, :] = 0
    masked[:, pruned] = 0
    masked[pruned, pruned] = 1
    truth = torch.linalg.inv(masked)
    assert (solver.inverse() - truth).norm() / truth.norm() < 1e-10
    optimum = torch.linalg.lstsq(X[keep].t(), (W @ X).t()).solution.t()
    assert (solver.weight[:, keep] - optimum).norm() / optimum.norm() < 1e-10
    assert torch.all(solver.weight[:, pruned] == 0)
    # The fast solver's scores equal the straightforward ones computed from the full-size views.
    errors, reference = solver.channel_errors(), Solver.channel_errors(solver)
    assert torch.equal(torch.isinf(errors), pruned)
    assert torch.allclose(errors[keep], reference[keep], rtol=1e-10, atol=0)


@pytest.mark.parametrize("mode", ["gcd", "gcd-diag", "diag"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_fast_unit_scores_equal_the_full_ones(mode: str, contiguous: bool) -> None:
    W, _, H = _layer(d_out=10, d_in=48, seed=3)
    columns = torch.arange(48) if contiguous else torch.randperm(48, generator=torch.Generator().manual_seed(0))
    units = columns.view(12, 4)  # 12 units of 4 columns: contiguous heads, or scattered columns
    solver = FastSolver(W, H, compensate=True)
    alive = torch.ones(12, dtype=torch.bool)
    for unit in (2, 11, 0):
        solver.remove(units[unit])
        alive[unit] = False
    scores, reference = solver.unit_scores(units, alive, mode), Solver.unit_scores(solver, units, alive, mode)
    assert torch.equal(torch.isinf(scores), ~alive)
    assert torch.allclose(scores[alive], reference[alive].to(scores.dtype), rtol=1e-10, atol=0)


def test_removed_units_cannot_go_again() -> None:
    W, _, H = _layer(d_out=10, d_in=48, seed=4)
    units = torch.arange(48).view(8, 6)
    solver = FastSolver(W, H, compensate=True)
    removed = greedy_remove_units(solver, units, rounds=2, buckets=[[0, 1, 2, 3], [4, 5, 6, 7]])
    with pytest.raises(ValueError, match="already removed"):
        solver.remove(units[removed[0]])
    scores = solver.unit_scores(units, torch.ones(8, dtype=torch.bool), "gcd")  # a stale alive mask
    assert torch.equal(torch.isinf(scores), torch.isin(torch.arange(8), torch.tensor(removed)))


@pytest.mark.parametrize("compensate", [True, False])
def test_fast_matches_reference_with_buckets_and_without_compensation(compensate: bool) -> None:
    W, _, H = _layer(d_out=16, d_in=64, seed=5)
    W, H = W.float(), prepare_hessian(H.float(), W.float().clone(), 0.01)
    units = torch.arange(64).view(16, 4)
    buckets = [list(range(8)), list(range(8, 16))]  # GQA's query-head policy: two units a round
    results = []
    for cls in (ReferenceSolver, FastSolver):
        solver = cls(W, H, compensate=compensate)
        removed = greedy_remove_units(solver, units, rounds=3, buckets=buckets)
        results.append((removed, solver.weight))
    assert results[0][0] == results[1][0]
    assert (results[0][1] - results[1][1]).norm() / results[0][1].norm() < 1e-4


def test_removing_every_column_leaves_a_zero_weight() -> None:
    W, _, H = _layer(d_in=16)
    solver = FastSolver(W, H, compensate=True)
    solver.remove(torch.arange(8, 16))
    solver.remove(torch.arange(8))
    assert torch.all(solver.weight == 0) and torch.all(solver.pruned)


def _large_layer() -> tuple[torch.Tensor, torch.Tensor]:
    """Wide enough (d_in 640) that the fast solver's inverse takes the recursive GEMM path."""
    W, _, H = _layer(d_out=64, d_in=640, tokens=2000, seed=6)
    W, H = W.float(), H.float()
    return W, prepare_hessian(H, W.clone(), 0.01)


@pytest.mark.parametrize("threads", [1, 2])
def test_large_layer_same_sets_at_any_thread_count(threads: int) -> None:
    W, H = _large_layer()
    units = torch.arange(640).view(10, 64)
    sizes = group_sizes(320, "authors", start=128, floor=16)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        heads, channels = [], []
        for cls in (ReferenceSolver, FastSolver):
            solver = cls(W, H, compensate=True)
            heads.append((greedy_remove_units(solver, units, rounds=5), solver.weight))
            solver = cls(W, H, compensate=True)
            channels.append((sorted(remove_channels(solver, sizes)), solver.weight))
    finally:
        torch.set_num_threads(previous)
    for (ref_set, ref_w), (fast_set, fast_w) in (heads, channels):
        assert ref_set == fast_set
        assert (ref_w - fast_w).norm() / ref_w.norm() < 1e-4
    # The same sets as a run at the other thread count (pinned: the reference's sets at 1 thread).
    assert heads[0][0] == _pinned_large_layer_heads()


def _pinned_large_layer_heads() -> list[int]:
    W, H = _large_layer()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return greedy_remove_units(ReferenceSolver(W, H, compensate=True), torch.arange(640).view(10, 64), rounds=5)
    finally:
        torch.set_num_threads(previous)


# --- The paths added for few-round head shapes and large FFN groups (the same sets and weights) ---


def test_factor_reads_only_the_lower_triangle() -> None:
    H = _spd(333, seed=7)
    garbage = H.clone()
    garbage.triu_(1).mul_(-1e6).add_(H.tril())  # the strict upper triangle is garbage, the lower one H's
    assert torch.equal(inverse_cholesky_factor(garbage, block=64), inverse_cholesky_factor(H, block=64))


@pytest.mark.parametrize("n", [64, 200])
def test_triangular_products_equal_plain_ones(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    T = torch.randn(n, n, generator=g, dtype=torch.float64).tril()
    X = torch.randn(7, n, generator=g, dtype=torch.float64)
    out = torch.full((7, n), math.nan, dtype=torch.float64)  # never read: the products write with beta=0
    times_lower(X, T, out, block=64)
    assert torch.allclose(out, X @ T, rtol=1e-12, atol=1e-12 * float((X @ T).abs().max()))


@pytest.mark.parametrize("g", [8, 128])
def test_batched_inverse_factor_equals_the_inverse(g: int) -> None:
    blocks = torch.stack([_spd(g, seed=s) for s in range(3)])
    N = batched_inverse_factor(blocks)
    assert torch.equal(N, N.tril())
    truth = torch.linalg.inv(blocks)
    assert (N.mT @ N - truth).norm() / truth.norm() < 1e-10
    bad = blocks.clone()
    bad[1, -1, -1] = -1.0
    with pytest.raises(NumericalError, match="damping"):
        batched_inverse_factor(bad)
    # Only the result's diagonal is checked: a NaN or infinity below the diagonal must still reach it,
    # in the first leaf, between the leaves and in the last one.
    for row, col, value in [(1, 0, math.nan), (g - 1, 0, math.inf), (g - 1, g - 2, math.nan), (g // 2, 1, -math.inf)]:
        bad = blocks.clone()
        bad[2, row, col] = value
        with pytest.raises(NumericalError, match="damping"):
            batched_inverse_factor(bad)


def _wide_layer(d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 layer with a correlated, decaying-spectrum Hessian (as in benchmarks/solver_speed.py)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(48, d_in, generator=g)
    B = torch.randn(d_in, d_in // 2, generator=g) * torch.linspace(1.0, 0.05, d_in // 2)
    H = B @ B.t() / (d_in // 2) + torch.diag(torch.rand(d_in, generator=g) * 0.1)
    return W, prepare_hessian(H, W.clone(), 0.01)


@pytest.mark.parametrize(("d_in", "rounds"), [(512, 2), (640, 3)])
def test_head_dim_128_few_rounds_matches_reference(d_in: int, rounds: int) -> None:
    # head_dim 128: the heads' blocks take the batched GEMM inverse, the rows the triangular recursion
    W, H = _wide_layer(d_in, seed=d_in)
    units = torch.arange(d_in).view(d_in // 128, 128)
    results = []
    for cls in (ReferenceSolver, FastSolver):
        solver = cls(W, H, compensate=True)
        results.append((greedy_remove_units(solver, units, rounds=rounds, score="gcd"), solver.weight))
    assert results[0][0] == results[1][0]
    assert (results[0][1] - results[1][1]).norm() / results[0][1].norm() < 1e-4


def test_large_channel_groups_match_reference() -> None:
    # a group over 2 x 128 columns takes L_P^-1 from the recursive factor, smaller ones the batched one
    W, H = _wide_layer(640, seed=8)
    results = []
    for cls in (ReferenceSolver, FastSolver):
        solver = cls(W, H, compensate=True)
        results.append((sorted(remove_channels(solver, [300, 100, 20])), solver.weight))
    assert results[0][0] == results[1][0]
    assert (results[0][1] - results[1][1]).norm() / results[0][1].norm() < 1e-4


def test_reference_inverts_once_a_round() -> None:
    W, _, H = _layer(d_in=24, seed=9)
    solver = ReferenceSolver(W, H, compensate=True)
    first = solver.inverse()
    assert solver.inverse() is first  # the round's scores and its removal share one inverse
    solver.remove(torch.tensor([1, 5, 6]))
    masked = H.clone()
    for j in (1, 5, 6):
        masked[j, :] = 0
        masked[:, j] = 0
        masked[j, j] = 1
    assert solver.inverse() is not first
    assert torch.allclose(solver.inverse(), torch.linalg.inv(masked), rtol=1e-8, atol=1e-10)
