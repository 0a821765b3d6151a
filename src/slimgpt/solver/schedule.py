"""Per-layer pruning ratios (docs/paper.md section 7) and the solve that hits a parameter target.

The paper's Incremental Pruning Ratio grows the ratio logarithmically with depth, because an error made
early is amplified by every later layer:

    r_i = r_0 + (r_last - r_0) * ln(i + 1) / ln(n),   i = 0..n-1

The user gives the fraction of decoder-layer parameters to remove; we solve for r_last (with r_0 =
r_last / 4 by default, or a fixed ``first_ratio``) so that the realised count, after rounding to whole
heads and channels, is as close as possible to the target. ln(n), not the authors' hard-coded ln(32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from slimgpt.errors import ConfigError

SCHEDULES = ("log-increase", "linear-increase", "uniform", "log-decrease", "linear-decrease")  # the paper's five
AUTO = "auto"  # SlimGPT's measured allocation (slimgpt.methods.auto_schedule); not a ratio shape
ALL_SCHEDULES = (*SCHEDULES, AUTO)


def _shape(schedule: str, i: int, n: int) -> float:
    """Position of layer i between the low (0) and the high (1) ratio."""
    if n == 1:
        return 1.0
    j = i if schedule.endswith("increase") else n - 1 - i
    if schedule.startswith("log"):
        return math.log(j + 1) / math.log(n)
    return j / (n - 1)


def layer_ratios(n_layers: int, high: float, low: float, schedule: str) -> list[float]:
    """Ratios for each layer. For increasing schedules layer 0 gets ``low`` and the last ``high``."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if schedule == "uniform":
        return [high] * n_layers
    return [low + (high - low) * _shape(schedule, i, n_layers) for i in range(n_layers)]


@dataclass(frozen=True)
class LayerGeometry:
    """What can be removed from one decoder layer, and what each removal saves."""

    attn_units: int  # removable attention units: heads (MHA), KV groups, or query heads per group
    params_per_attn_unit: int
    ffn_channels: int
    params_per_channel: int
    layer_params: int  # all parameters of the layer (norms included)


@dataclass(frozen=True)
class LayerPlan:
    ratio: float
    attn_units_removed: int
    channels_removed: int
    params_removed: int


@dataclass(frozen=True)
class SchedulePlan:
    layers: list[LayerPlan]
    target_ratio: float
    realised_ratio: float
    high: float
    low: float
    schedule: str
    total_params: int
    params_removed: int
    details: dict[str, Any] = field(default_factory=dict)  # how the allocation was chosen (auto)


def plan_layer(geometry: LayerGeometry, ratio: float, round_to: int = 1) -> LayerPlan:
    """Round one layer's ratio to whole units, keeping at least one head and ``round_to`` channels.

    With ``round_to`` N the kept FFN width is a multiple of N (hardware-friendly shapes).
    """
    units = min(geometry.attn_units - 1, round(ratio * geometry.attn_units))
    kept = geometry.ffn_channels - round(ratio * geometry.ffn_channels)
    if round_to > 1:
        kept = round(kept / round_to) * round_to
    kept = min(geometry.ffn_channels, max(kept, min(round_to, geometry.ffn_channels), 1))
    channels = geometry.ffn_channels - kept
    units = max(units, 0)
    params = units * geometry.params_per_attn_unit + channels * geometry.params_per_channel
    return LayerPlan(ratio, units, channels, params)


def _absorb_remainder(plans: list[LayerPlan], geometries: list[LayerGeometry], goal: float,
                      round_to: int) -> list[LayerPlan]:
    """Move FFN channels between layers' plans so the total lands within one channel step of the goal.

    Whole heads are coarse (and the uniform schedule moves every layer at once), so the bisection alone
    can miss the target by several heads; channels are fine-grained. Steps go round-robin over the
    layers, deepest first, so the schedule's shape is kept.
    """
    plans = list(plans)
    step_params = [g.params_per_channel * round_to for g in geometries]
    diff = goal - sum(p.params_removed for p in plans)
    order = list(range(len(plans)))[::-1]
    moved = True
    while moved:
        moved = False
        for i in order:
            g, p, step = geometries[i], plans[i], step_params[i]
            if abs(diff) < step / 2:
                return plans
            direction = 1 if diff > 0 else -1
            channels = p.channels_removed + direction * round_to
            if not 0 <= channels <= g.ffn_channels - max(round_to, 1):
                continue
            plans[i] = LayerPlan(p.ratio, p.attn_units_removed, channels, p.params_removed + direction * step)
            diff -= direction * step
            moved = True
    return plans


def plan_schedule(
    geometries: list[LayerGeometry],
    target: float,
    schedule: str = "log-increase",
    first_ratio: float | None = None,
    first_fraction: float = 0.25,
    round_to: int = 1,
) -> SchedulePlan:
    """Solve the schedule's top ratio so that the removed parameters are closest to ``target``."""
    if not 0.0 <= target < 1.0:
        raise ConfigError(f"pruning ratio {target} is outside [0, 1): pass --ratio between 0 and 0.95")
    if first_ratio is not None and not 0.0 <= first_ratio < 1.0:
        raise ConfigError(f"first-layer ratio {first_ratio} is outside [0, 1)")
    if schedule == AUTO:
        raise ConfigError("the auto schedule is measured on the model and its calibration data: prune with "
                          "--method slimgpt (slimgpt.prune.prune_model)")
    total = sum(g.layer_params for g in geometries)
    goal = target * total
    n = len(geometries)

    def build(high: float) -> list[LayerPlan]:
        low = first_ratio if first_ratio is not None else high * first_fraction
        low = min(low, high)
        ratios = layer_ratios(n, high, low, schedule)
        return [plan_layer(g, r, round_to) for g, r in zip(geometries, ratios, strict=True)]

    def removed(plans: list[LayerPlan]) -> int:
        return sum(p.params_removed for p in plans)

    lo, hi = (first_ratio or 0.0), 1.0
    if removed(build(hi)) < goal:
        best = removed(build(hi)) / total
        raise ConfigError(
            f"cannot remove {target:.1%} of decoder parameters with the {schedule} schedule "
            f"(at most {best:.1%} while keeping one head and one channel per layer): lower --ratio "
            "or --first-ratio, or pick another --schedule"
        )
    if target == 0.0:
        hi = 0.0
    for _ in range(60):  # removed(high) is a non-decreasing step function: bisect its crossing
        mid = (lo + hi) / 2
        if removed(build(mid)) >= goal:
            hi = mid
        else:
            lo = mid
    candidates = [build(lo), build(hi)]
    plans = min(candidates, key=lambda p: abs(removed(p) - goal))
    high = hi if plans is candidates[1] else lo
    plans = _absorb_remainder(plans, geometries, goal, round_to)
    low = first_ratio if first_ratio is not None else high * first_fraction
    return SchedulePlan(
        layers=plans, target_ratio=target, realised_ratio=removed(plans) / total, high=high,
        low=min(low, high), schedule=schedule, total_params=total, params_removed=removed(plans),
    )
