"""The optimal-transport solver of DOTResize (slimgpt.solver.transport): the Gram-based cost, the Sinkhorn
plan's marginals and limits, agreement with POT where it is installed, and the merge into a consumer."""

from __future__ import annotations

import pytest
import torch

from slimgpt.solver.transport import activation_cost, merge_columns, sinkhorn_log


def _activations(seed: int = 0, tokens: int = 64, n: int = 10) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(tokens, n, generator=generator, dtype=torch.float64)
    return A * torch.linspace(0.2, 2.0, n, dtype=torch.float64)  # uneven neuron scales


def test_the_cost_is_the_squared_distance_between_activations() -> None:
    A = _activations()
    gram = 2 * A.t() @ A / A.shape[0]  # the OBS Hessian's scale: the cost is 2/N times the squared distance
    targets = torch.tensor([1, 4, 7])
    expected = torch.cdist(A.t(), A.t()[targets]).square() * 2 / A.shape[0]
    cost = activation_cost(gram, targets)
    assert cost.shape == (10, 3) and cost.dtype == torch.float64
    assert float((cost - expected).abs().max()) <= 1e-12 * float(expected.max())
    assert float(cost[targets, torch.arange(3)].abs().max()) <= 1e-12 * float(expected.max())  # zero to itself
    assert torch.equal(activation_cost(gram), activation_cost(gram, torch.arange(10)))


@pytest.mark.parametrize("epsilon", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("shape", [(10, 4), (12, 8), (7, 3)])
def test_the_plan_has_the_prescribed_marginals(epsilon: float, shape: tuple[int, int]) -> None:
    n, m = shape
    cost = activation_cost(2 * _activations(n=n).t() @ _activations(n=n) / 64, torch.arange(m))
    result = sinkhorn_log(cost, epsilon=epsilon, tol=1e-10, max_iter=50_000)
    P = result.plan
    assert P.shape == (n, m) and bool((P >= 0).all())
    assert float((P.sum(1) - 1 / n).abs().max()) <= 1e-12 / n  # rows: exact after the last update
    assert float((P.sum(0) - 1 / m).abs().sum()) <= 1e-10 and result.marginal_error <= 1e-10  # columns: within tol
    assert result.iterations < 50_000  # converged, not stopped


def test_prescribed_non_uniform_masses_are_met() -> None:
    cost = activation_cost(2 * _activations().t() @ _activations() / 64, torch.tensor([0, 3, 5, 9]))
    a = torch.linspace(1, 3, 10, dtype=torch.float64)
    b = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    P = sinkhorn_log(cost, a / a.sum(), b, epsilon=0.05).plan
    assert float((P.sum(1) - a / a.sum()).abs().max()) <= 1e-12
    assert float((P.sum(0) - b).abs().sum()) <= 1e-9
    with pytest.raises(ValueError, match="sum to one"):
        sinkhorn_log(cost, a, b)


def test_small_epsilon_gives_the_exact_assignment_and_large_the_independent_plan() -> None:
    n = 6
    generator = torch.Generator().manual_seed(3)
    cost = torch.rand(n, n, generator=generator, dtype=torch.float64) + 1.0
    permutation = torch.randperm(n, generator=generator)
    cost[torch.arange(n), permutation] = 0.0  # one zero-cost permutation: the unique exact OT plan
    sharp = sinkhorn_log(cost, epsilon=1e-3).plan
    expected = torch.zeros(n, n, dtype=torch.float64)
    expected[torch.arange(n), permutation] = 1 / n
    assert float((sharp - expected).abs().max()) <= 1e-6 / n
    flat = sinkhorn_log(cost, epsilon=1e4).plan  # eps >> C: the entropy wins, P -> a b^T
    assert float((flat - 1 / n**2).abs().max()) <= 1e-3 / n**2


def test_the_plan_agrees_with_pot() -> None:
    ot = pytest.importorskip("ot")  # POT, in the dev extra
    A = _activations(seed=4)
    cost = activation_cost(2 * A.t() @ A / 64, torch.tensor([0, 2, 5, 8]))
    result = sinkhorn_log(cost, epsilon=0.05, tol=1e-12)
    n, m = cost.shape
    reference = ot.sinkhorn(torch.full((n,), 1 / n, dtype=torch.float64), torch.full((m,), 1 / m, dtype=torch.float64),
                            cost, result.epsilon, method="sinkhorn_log", numItermax=10000, stopThr=1e-13)
    assert float((result.plan - reference).abs().max()) <= 1e-8 * float(reference.max())


def test_sinkhorn_is_deterministic_and_keeps_a_tiny_epsilon_finite() -> None:
    cost = activation_cost(2 * _activations().t() @ _activations() / 64, torch.arange(4))
    first, second = sinkhorn_log(cost, epsilon=1e-4), sinkhorn_log(cost, epsilon=1e-4)
    assert torch.equal(first.plan, second.plan) and first.iterations == second.iterations
    assert bool(torch.isfinite(first.plan).all())  # exp(-C / eps) would underflow; the log domain does not


def test_merging_duplicated_neurons_is_lossless() -> None:
    """Each target has one exact copy among the removed neurons: the plan sends the copy onto its target
    (uniform marginals: every target takes two neurons' mass) and W Q reproduces W h from the targets."""
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(80, 4, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 4.0],
                                                                                      dtype=torch.float64)
    order = torch.tensor([0, 5, 1, 2, 7, 3, 4, 6])  # the neurons copy base columns 0, 1, 1, 2, 3, 3, 0, 2
    A = torch.cat([base, base], 1)[:, order]
    keep = torch.tensor([True, True, False, True, True, False, False, False])  # one copy of each
    W = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    merged, result = merge_columns(W, A.t() @ A / 80, keep, epsilon=1e-3)
    assert float((merged[:, ~keep]).abs().max()) == 0.0
    assert float((result.plan.sum(1) * 8 - 1).abs().max()) <= 1e-12  # Q = n P has rows summing to one
    target, restored = A @ W.t(), A[:, keep] @ merged[:, keep].t()
    assert float((restored - target).abs().max()) <= 1e-6 * float(target.abs().max())
    dropped = A[:, keep] @ W[:, keep].t()
    assert float((dropped - target).abs().max()) > 0.1 * float(target.abs().max())  # dropping them is not


def test_merge_checks_shapes_and_handles_no_targets() -> None:
    W = torch.randn(3, 5)
    with pytest.raises(ValueError, match="Gram matrix"):
        merge_columns(W, torch.eye(4), torch.ones(5, dtype=torch.bool))
    merged, _ = merge_columns(W, torch.eye(5), torch.zeros(5, dtype=torch.bool))
    assert merged.dtype == W.dtype and float(merged.abs().max()) == 0.0


@pytest.mark.parametrize("epsilon", [0.002, 0.1])
def test_the_kernel_and_the_log_domain_give_the_same_plan(epsilon: float) -> None:
    A = _activations(seed=6, n=12)
    cost = activation_cost(2 * A.t() @ A / 64, torch.tensor([0, 3, 6, 9, 11]))
    kernel = sinkhorn_log(cost, epsilon=epsilon, tol=1e-12, max_iter=50_000, domain="kernel")
    log_domain = sinkhorn_log(cost, epsilon=epsilon, tol=1e-12, max_iter=50_000, domain="log")
    assert epsilon > 0.01 or float(cost.max()) / kernel.epsilon > 745  # exp(-C / eps) underflows: the shift copes
    assert float((kernel.plan - log_domain.plan).abs().max()) <= 1e-9 * float(kernel.plan.max())
