"""The auto schedule's maths: cost curves along SlimGPT's greedy path and the global allocation."""

from __future__ import annotations

import pytest
import torch

from slimgpt.errors import ConfigError
from slimgpt.solver.allocation import (
    Layer,
    Option,
    allocate,
    allowed_channel_counts,
    channel_checkpoints,
    channel_cost_curve,
    interpolate,
    unit_cost_curve,
)
from slimgpt.solver.obs import make_solver, reconstruction_error
from slimgpt.solver.structured import greedy_remove_units


def _layer(d_out: int = 12, d_in: int = 16, seed: int = 0) -> Layer:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d_in, 256, generator=g, dtype=torch.float64)
    H = 2 * X @ X.t() / 256
    return Layer(torch.randn(d_out, d_in, generator=g, dtype=torch.float64), H, H)


def test_unit_curve_is_the_greedy_path_error() -> None:
    layer = _layer()
    units = torch.arange(16).view(4, 4)
    curve = unit_cost_curve(layer, units, 3, None, "gcd", probe_round=2)
    assert curve.counts == [0, 1, 2, 3] and curve.costs[0] == 0
    assert all(b >= a for a, b in zip(curve.costs, curve.costs[1:], strict=False))
    for rounds in (1, 3):
        solver = make_solver("fast", layer.weight, layer.hessian)
        greedy_remove_units(solver, units, rounds)
        expected = reconstruction_error(layer.weight, solver.weight, layer.hessian.float())
        assert curve.costs[rounds] == pytest.approx(expected, rel=1e-4)
    assert curve.probe is not None and curve.probe_count == 2


def test_channel_curve_sums_the_steps_costs() -> None:
    layer = _layer()
    counts = [0, 3, 6, 10]
    curve = channel_cost_curve(layer, counts, probe_count=6)
    solver = make_solver("fast", layer.weight, layer.hessian)
    from slimgpt.solver.structured import remove_channels

    remove_channels(solver, [3, 3, 4])
    expected = reconstruction_error(layer.weight, solver.weight, layer.hessian.float())
    assert curve.costs[-1] == pytest.approx(expected, rel=1e-4)
    assert curve.probe_count == 6


def test_allowed_counts_keep_multiples_of_round_to() -> None:
    assert allowed_channel_counts(10, 1) == list(range(10))
    assert allowed_channel_counts(10, 4) == [0, 2, 6]  # keeps 10, 8, 4
    points = channel_checkpoints(list(range(100)), 8)
    assert points[0] == 0 and points[-1] == 99 and len(points) <= 10


def test_interpolate_is_linear_between_points() -> None:
    from slimgpt.solver.allocation import CostCurve

    curve = CostCurve([0, 10, 20], [0.0, 1.0, 5.0])
    assert interpolate(curve, [0, 5, 10, 15, 20]) == pytest.approx([0, 0.5, 1, 3, 5])


def test_flat_curve_loses_more_than_steep() -> None:
    counts = list(range(11))
    flat = Option(counts, [0.01 * c for c in counts], 10)
    steep = Option(counts, [0.01 * c * c for c in counts], 10)
    got = allocate([steep, flat], goal=120)
    assert sum(got) * 10 == 120
    assert got[1] > got[0]


def test_allocate_lands_within_half_a_step_and_respects_caps() -> None:
    heads = Option([0, 1, 2, 3], [0.0, 1.0, 1.5, 9.0], 100)
    ffn = Option(list(range(50)), [0.02 * c for c in range(50)], 7)
    for goal in (0, 33, 150, 301, 450):
        units, channels = allocate([heads, ffn], goal)
        assert abs(units * 100 + channels * 7 - goal) <= 3.5
        assert units <= 3 and channels <= 49
    with pytest.raises(ConfigError, match="auto schedule"):
        allocate([heads, ffn], 10_000)


def test_allocate_takes_hull_steps_over_non_convex_curves() -> None:
    # the second unit is cheap after the first (non-convex): the hull sees them together
    heads = Option([0, 1, 2], [0.0, 1.0, 1.1], 10)
    other = Option([0, 1, 2], [0.0, 0.6, 1.2], 10)
    assert allocate([heads, other], 20) == [2, 0]


def test_allocate_is_deterministic_on_ties() -> None:
    options = [Option(list(range(5)), [0.1 * c for c in range(5)], 3) for _ in range(4)]
    assert allocate(options, 21) == allocate(options, 21)


@pytest.mark.parametrize("compensate", [True, False])
def test_curves_are_the_solver_weights_error_with_buckets_and_without_compensation(compensate: bool) -> None:
    """The running error (products with H[:, P] only) is tr(D H D^T) of the solver's weight after each step,
    for joint rounds of several buckets and for plain dropping as well as with OBS compensation."""
    layer = _layer(seed=3)
    layer = Layer(layer.weight, layer.hessian, layer.raw_hessian, compensate=compensate)
    units, buckets = torch.arange(16).view(8, 2), [[0, 1, 2, 3], [4, 5, 6, 7]]
    curve = unit_cost_curve(layer, units, 3, buckets, "gcd")
    energy = float(torch.einsum("ij,jk,ik->", layer.weight, layer.hessian, layer.weight))
    for rounds in (1, 2, 3):
        solver = make_solver("fast", layer.weight, layer.hessian, compensate)
        greedy_remove_units(solver, units, rounds, buckets)
        delta = solver.weight - layer.weight
        expected = float(torch.einsum("ij,jk,ik->", delta, layer.hessian, delta)) / energy
        assert curve.costs[rounds] == pytest.approx(expected, rel=1e-6)
    channels = channel_cost_curve(layer, [0, 2, 5, 9])
    solver = make_solver("fast", layer.weight, layer.hessian, compensate)
    from slimgpt.solver.structured import remove_channels

    remove_channels(solver, [2, 3, 4])
    delta = solver.weight - layer.weight
    expected = float(torch.einsum("ij,jk,ik->", delta, layer.hessian, delta)) / energy
    assert channels.costs[-1] == pytest.approx(expected, rel=1e-6)
