"""The fast solver's paths for few-round head shapes: padded rows, two-half factor leaves, the rounds' hint."""

from __future__ import annotations

import pytest
import torch

from slimgpt.errors import NumericalError
from slimgpt.solver.hessian import prepare_hessian
from slimgpt.solver.linalg import ROW_PAD, batched_inverse_factor, inverse_cholesky_factor, padded_empty
from slimgpt.solver.obs import FastSolver, ReferenceSolver
from slimgpt.solver.structured import greedy_remove_units, remove_channels


def _spd(n: int, seed: int, batch: tuple[int, ...] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, n, n, generator=g, dtype=torch.float64)
    return A @ A.mT / n + 0.05 * torch.eye(n, dtype=torch.float64)


def _layer(d_out: int, d_in: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(d_in, d_in // 2, generator=g, dtype=torch.float64) * torch.linspace(
        1.0, 0.05, d_in // 2, dtype=torch.float64)
    H = B @ B.t() / (d_in // 2) + torch.diag(torch.rand(d_in, generator=g, dtype=torch.float64) * 0.1)
    return W.to(dtype), prepare_hessian(H.to(dtype), W.to(dtype).clone(), 0.01)


@pytest.mark.parametrize(("cols", "dtype", "padded"), [(256, torch.float32, True), (128, torch.float64, True),
                                                       (200, torch.float32, False), (96, torch.float32, False)])
def test_padded_empty_pads_rows_of_whole_kibibytes(cols: int, dtype: torch.dtype, padded: bool) -> None:
    out = padded_empty(5, cols, dtype, torch.device("cpu"))
    assert out.shape == (5, cols) and out.dtype == dtype
    assert out.stride() == (cols + (ROW_PAD if padded else 0), 1)
    out.copy_(torch.arange(5 * cols, dtype=dtype).view(5, cols))  # every element writable and distinct
    assert torch.equal(out, torch.arange(5 * cols, dtype=dtype).view(5, cols))


@pytest.mark.parametrize("n", [100, 128, 129, 256, 300])
def test_factor_with_two_half_leaves_is_the_inverse_cholesky_factor(n: int) -> None:
    # default block 128: leaves above LEAF_HALF (64) are factored in two halves; n = 129, 300 give uneven leaves
    H = _spd(n, seed=n)
    garbage = H.clone()
    garbage.triu_(1).mul_(-1e6).add_(H.tril())  # only the lower triangle may be read
    M = inverse_cholesky_factor(garbage)
    assert torch.equal(M, M.tril())
    assert torch.equal(M, inverse_cholesky_factor(H))
    assert (M @ torch.linalg.cholesky(H) - torch.eye(n, dtype=H.dtype)).abs().max() < 1e-10
    M32 = inverse_cholesky_factor(H.float()).double()
    truth = torch.linalg.inv(torch.linalg.cholesky(H))
    assert (M32 - truth).norm() / truth.norm() < 1e-4


@pytest.mark.parametrize("g", [64, 97, 100, 128])
def test_batched_inverse_factor_with_uneven_halves(g: int) -> None:
    blocks = _spd(g, seed=g, batch=(4,))
    N = batched_inverse_factor(blocks)
    assert torch.equal(N, N.tril())
    truth = torch.linalg.inv(blocks)
    assert (N.mT @ N - truth).norm() / truth.norm() < 1e-10


@pytest.mark.parametrize("where", ["first half", "second half", "nan"])
def test_batched_inverse_factor_checks_every_leaf(where: str) -> None:
    blocks = _spd(128, seed=1, batch=(3,))
    bad = blocks.clone()
    if where == "first half":
        bad[2, 3, 3] = -1.0  # the first leaf (columns 0-63) of the last block fails
    elif where == "second half":
        bad[0, -1, -1] = -1.0  # only the Schur complement's leaf of the first block fails
    else:
        bad[1, 70, 5] = bad[1, 5, 70] = float("nan")
    with pytest.raises(NumericalError, match="damping"):
        batched_inverse_factor(bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_heads_hint_reserves_the_factors_and_keeps_M(dtype: torch.dtype) -> None:
    # 256 columns (rows of whole KiB: padded), 4 heads of 64, half of them go: the hint reserves C for all
    # of them at once and keeps M (no K for heads); the same heads and weights as the reference
    W, H = _layer(40, 256, seed=7, dtype=dtype)
    units = torch.arange(256).view(4, 64)
    fast, reference = FastSolver(W, H, compensate=True), ReferenceSolver(W, H, compensate=True)
    removed = greedy_remove_units(fast, units, rounds=2)
    assert fast._K is None and fast._M is not None and not fast._use_inverse
    assert fast._C.shape[0] == 2 * 64  # reserved once from the hint, never grown
    assert fast.weight.stride(0) == 256 + ROW_PAD  # 256 elements are whole KiB in either dtype
    assert removed == greedy_remove_units(reference, units, rounds=2)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert (fast.weight - reference.weight).norm() / reference.weight.norm() < tol
    # scattered channels after the heads still take their own path (the hint for heads set nothing for them)
    assert sorted(remove_channels(fast, [20, 12])) == sorted(remove_channels(reference, [20, 12]))
    assert (fast.weight - reference.weight).norm() / reference.weight.norm() < tol


def test_rows_on_the_surviving_columns_only_match_the_masked_inverse() -> None:
    # heads removed out of order (gaps left and right of the next head, one at the last columns): each
    # round's rows come from the surviving runs only; the state is the masked inverse, the weight the optimum
    W, H = _layer(24, 384, seed=11, dtype=torch.float64)
    units = torch.arange(384).view(6, 64)
    solver = FastSolver(W, H, compensate=True)
    earlier = torch.zeros(384, dtype=torch.bool)
    for head in (3, 0, 5, 1):
        solver.remove(units[head])
        newest = solver._C[solver._T - 64:solver._T]  # this round's factor F: zero where heads went before
        assert torch.all(newest[:, earlier] == 0)
        earlier[units[head]] = True
        pruned = solver.pruned
        masked = H.clone()
        masked[pruned, :] = 0
        masked[:, pruned] = 0
        masked[pruned, pruned] = 1
        truth = torch.linalg.inv(masked)
        assert (solver.inverse() - truth).norm() / truth.norm() < 1e-10
        keep = (~pruned).nonzero().flatten()
        optimum = W @ H[:, keep] @ torch.linalg.inv(H[keep][:, keep])  # least squares on the survivors
        assert (solver.weight[:, keep] - optimum).norm() / optimum.norm() < 1e-10
        assert torch.all(solver.weight[:, pruned] == 0)


def test_a_removal_right_after_the_scores_reuses_their_block_inverse() -> None:
    W, H = _layer(16, 192, seed=12, dtype=torch.float64)
    units = torch.arange(192).view(6, 32)
    alive = torch.tensor([True, True, False, True, True, True])
    fast, reference = FastSolver(W, H, compensate=True), ReferenceSolver(W, H, compensate=True)
    fast.unit_scores(units, alive, "gcd")
    assert sorted(fast._scored) == [0, 32, 96, 128, 160]  # the live units' first columns
    for solver in (fast, reference):
        solver.remove(units[4])  # scored: its N is reused
        solver.remove(units[2])  # not scored (not alive then, and the scores are stale): computed afresh
        solver.remove(torch.tensor([1, 5, 40]))  # scattered
    assert fast._scored == {}
    assert (fast.weight - reference.weight).norm() / reference.weight.norm() < 1e-10
