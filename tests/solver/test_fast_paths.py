"""The fast solver's two ways to the rows Hinv[P, :] (from M = L^-1, or from K = M^T M formed once) agree."""

from __future__ import annotations

import pytest
import torch

from slimgpt.solver.hessian import prepare_hessian
from slimgpt.solver.linalg import gram_of_lower, inverse_cholesky_factor, mirror_lower
from slimgpt.solver.obs import FastSolver, ReferenceSolver
from slimgpt.solver.structured import greedy_remove_units, remove_channels


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A @ A.t() / n + 0.05 * torch.eye(n, dtype=torch.float64)


def _layer(d_in: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(24, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(d_in, d_in // 2, generator=g, dtype=torch.float64) * torch.linspace(1.0, 0.05, d_in // 2,
                                                                                           dtype=torch.float64)
    H = B @ B.t() / (d_in // 2) + torch.diag(torch.rand(d_in, generator=g, dtype=torch.float64) * 0.1)
    return W.to(dtype), prepare_hessian(H.to(dtype), W.to(dtype).clone(), 0.01)


@pytest.mark.parametrize("n", [5, 200, 333])
def test_factor_is_lower_triangular_and_gram_of_lower_is_its_product(n: int) -> None:
    M = inverse_cholesky_factor(_spd(n, seed=n), block=64)
    assert torch.equal(M, M.tril())  # the recursion leaves the zeros of tril(H) above the diagonal
    truth = M.mT @ M
    K = gram_of_lower(M, block=64)
    assert (K.tril() - truth.tril()).norm() / truth.norm() < 1e-13
    mirror_lower(K, block=48)  # block rows that do not line up with the recursion's splits
    assert torch.equal(K, K.mT)
    assert (K - truth).norm() / truth.norm() < 1e-13


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_from_the_inverse_equal_rows_from_the_factor(dtype: torch.dtype) -> None:
    W, H = _layer(300, seed=4, dtype=dtype)
    sizes = [100, 60, 30, 10]  # 200 of 300 columns: remove_channels' hint makes the solver form K
    results = []
    for hint in (False, True):
        solver = FastSolver(W, H, compensate=True)
        if hint:
            solver.expect_removals(sum(sizes))
        removed: list[int] = []
        for size in sizes:  # remove_channels' rounds without its hint
            chosen = torch.topk(solver.channel_errors(), size, largest=False).indices
            solver.remove(chosen)
            removed += chosen.tolist()
        assert (solver._K is not None) == hint  # which path ran is the point of the test
        results.append((sorted(removed), solver.weight, solver.inverse()))
    reference = ReferenceSolver(W, H, compensate=True)
    ref_removed = sorted(remove_channels(reference, sizes))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for removed, weight, inverse in results:
        assert removed == ref_removed
        assert (weight - reference.weight).norm() / reference.weight.norm() < tol
        truth = reference.inverse()
        assert (inverse - truth).norm() / truth.norm() < tol


def test_heads_after_channels_take_the_inverse_path() -> None:
    # once K is formed (M dropped), head blocks and rows come from K: same heads and weights as the reference
    W, H = _layer(256, seed=5, dtype=torch.float64)
    units = torch.arange(128, 256).view(8, 16)  # heads in the second half; scattered columns go from the first
    results = []
    for cls in (ReferenceSolver, FastSolver):
        solver = cls(W, H, compensate=True)
        solver.expect_removals(120)
        solver.remove(torch.arange(0, 128, 2))
        solver.remove(torch.tensor([3, 7, 11, 61, 99]))
        if isinstance(solver, FastSolver):
            assert solver._K is not None  # which path ran is the point of the test
        heads = greedy_remove_units(solver, units, rounds=3, score="gcd")
        results.append((heads, solver.weight))
    assert results[0][0] == results[1][0]
    assert (results[0][1] - results[1][1]).norm() / results[0][1].norm() < 1e-10
