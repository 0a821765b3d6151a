"""Ratio schedules: the paper's formula, monotone shapes, and hitting the parameter target."""

from __future__ import annotations

import math

import pytest

from slimgpt.errors import ConfigError
from slimgpt.solver.schedule import SCHEDULES, LayerGeometry, layer_ratios, plan_schedule


def test_log_increase_is_the_paper_formula() -> None:
    ratios = layer_ratios(32, 0.25, 0.0625, "log-increase")
    for i, r in enumerate(ratios):
        assert r == pytest.approx(0.0625 + (0.25 - 0.0625) * math.log(i + 1) / math.log(32))
    assert sum(ratios) / 32 == pytest.approx(0.2004, abs=2e-3)  # the authors' 20% recipe, mean 0.2004


def test_shapes() -> None:
    inc = layer_ratios(10, 0.5, 0.1, "linear-increase")
    dec = layer_ratios(10, 0.5, 0.1, "log-decrease")
    assert inc == sorted(inc) and dec == sorted(dec, reverse=True)
    assert layer_ratios(10, 0.3, 0.1, "uniform") == [0.3] * 10


LLAMA7B = LayerGeometry(attn_units=32, params_per_attn_unit=4 * 128 * 4096, ffn_channels=11008,
                        params_per_channel=3 * 4096, layer_params=4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("target", [0.0, 0.2, 0.25, 0.33, 0.5])
@pytest.mark.parametrize("n_layers", [6, 32])
def test_plan_hits_target_within_one_unit(schedule: str, target: float, n_layers: int) -> None:
    plan = plan_schedule([LLAMA7B] * n_layers, target, schedule)
    goal = target * plan.total_params
    assert abs(plan.params_removed - goal) <= LLAMA7B.params_per_attn_unit
    assert abs(plan.params_removed - goal) <= LLAMA7B.params_per_channel  # finer: one channel
    assert all(0 <= p.attn_units_removed < 32 for p in plan.layers)


def test_uniform_50_percent_matches_paper_count() -> None:
    plan = plan_schedule([LLAMA7B] * 32, 0.5, "uniform")
    kept = plan.total_params - plan.params_removed
    embeddings = 2 * 32000 * 4096 + 4096
    assert (kept + embeddings) / 1e9 == pytest.approx(3.50, abs=0.02)  # paper: 3.50B at uniform 50%


def test_round_to_keeps_multiples() -> None:
    plan = plan_schedule([LLAMA7B] * 8, 0.3, "log-increase", round_to=128)
    assert all((11008 - p.channels_removed) % 128 == 0 for p in plan.layers)


def test_out_of_range() -> None:
    with pytest.raises(ConfigError, match="outside"):
        plan_schedule([LLAMA7B], 1.0)
    with pytest.raises(ConfigError, match="cannot remove"):
        plan_schedule([LLAMA7B] * 4, 0.99)
