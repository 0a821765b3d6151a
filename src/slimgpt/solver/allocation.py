"""The ``auto`` schedule's maths: OBS cost curves of successive removals and the global allocation.

A cost curve lists, for one layer's attention (o_proj) or FFN (down_proj), the OBS cost of removing the
first k units along one greedy path: the same grouped-Cholesky rounds (heads) or cheapest-column rounds
(channels) that SlimGPT's solver runs, on the dense layer's Hessian. The cost after a round is the
layer-wise squared error tr(D H D^T) of the solver's weight (D = W - W_dense), grown round by round from
products with H[:, P] only (with compensation this is the sum of the rounds' exact OBS group costs
tr(W_P Hinv_PP^-1 W_P^T)). Curves are normalised by the dense output energy tr(W H W^T), so they read as
relative output error.

``allocate`` then chooses one count per curve: the lower convex hull of each curve (parameters removed
against weighted cost), all hulls' segments taken cheapest cost per parameter first, each curve's segments
in order, until the parameter goal is reached; the last step lands within half a channel step of it.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

import torch

from slimgpt.errors import ConfigError
from slimgpt.solver.obs import make_solver
from slimgpt.solver.structured import remove_channels


@dataclass(frozen=True)
class CostCurve:
    """Relative output error after removing ``counts[j]`` units of one module; ``counts[0] == 0``.

    probe: the compensated weight minus the dense one after ``probe_count`` units (None: not kept).
    """

    counts: list[int]
    costs: list[float]
    probe: torch.Tensor | None = None
    probe_count: int = 0


def _energy(weight: torch.Tensor, hessian: torch.Tensor) -> float:
    return max(float(torch.einsum("ij,jk,ik->", weight, hessian, weight)), torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class Layer:
    """One weight to measure: W (d_out x d_in), its damped Hessian for the solver, the raw one for energy."""

    weight: torch.Tensor
    hessian: torch.Tensor
    raw_hessian: torch.Tensor
    solver: str = "fast"
    compensate: bool = True


class _ErrorTracker:
    """The layer-wise squared error tr(D H D^T), D = W - W_dense, kept up to date round by round.

    A round changes W by dW, zero on the columns already gone, and removes the columns P. With OBS
    compensation the compensated weight is optimal on the survivors both before and after the round
    ((D H)[:, survivors] = 0), so the error grows by tr(dW H dW^T) = sum((dW H[:, P]) * dW[:, P]);
    without compensation dW is -W on P only and the error grows by tr((dW + 2 D) H dW^T), again a product
    with H[:, P] only. A round costs O(d_out d |P|), like the solver's own update, and no inverse is formed.
    """

    def __init__(self, layer: Layer) -> None:
        self.dense, self.hessian, self.compensate = layer.weight, layer.hessian, layer.compensate
        self.delta = torch.zeros_like(layer.weight)
        self.error = 0.0

    def step(self, weight: torch.Tensor, columns: torch.Tensor) -> float:
        """Account for the round that brought the solver's weight to ``weight`` by removing ``columns``."""
        delta = weight - self.dense
        change = delta - self.delta
        lhs = change if self.compensate else change + 2 * self.delta
        self.error += float(((lhs @ self.hessian[:, columns].to(lhs.dtype)) * change[:, columns]).sum())
        self.delta = delta
        return self.error


def unit_cost_curve(layer: Layer, units: torch.Tensor, rounds: int, buckets: list[list[int]] | None,
                    score: str, probe_round: int = 0) -> CostCurve:
    """Cost after each of ``rounds`` greedy head rounds (each removes the cheapest unit of each bucket).

    The rounds choose exactly as slimgpt.solver.structured.greedy_remove_units does (the solver's own
    unit scores, same ties); each round's cost is the growth of the layer-wise error (``_ErrorTracker``).
    probe_round: keep the weight change after that many rounds (0: none).
    """
    energy = _energy(layer.weight, layer.raw_hessian)
    buckets = buckets if buckets is not None else [list(range(len(units)))]
    solver = make_solver(layer.solver, layer.weight, layer.hessian, layer.compensate)
    tracker = _ErrorTracker(layer)
    alive = torch.ones(len(units), dtype=torch.bool)
    costs, probe = [0.0], None
    for r in range(rounds):
        scores = solver.unit_scores(units, alive, score)
        chosen = [bucket[int(scores[bucket].argmin())] for bucket in buckets]
        columns = units[chosen].flatten().to(layer.weight.device)
        solver.remove(columns)
        alive[chosen] = False
        costs.append(tracker.step(solver.weight, columns) / energy)
        if r + 1 == probe_round:
            probe = solver.weight - layer.weight
    return CostCurve(list(range(rounds + 1)), costs, probe, probe_round if probe is not None else 0)


def channel_cost_curve(layer: Layer, counts: list[int], probe_count: int = 0) -> CostCurve:
    """Cost at each of the ascending channel ``counts`` (first 0), removing the cheapest columns in between.

    Each step removes ``counts[j] - counts[j-1]`` columns in one group (slimgpt.solver.structured.
    remove_channels); probe_count: keep the weight change at that count (one of ``counts``; 0: none).
    """
    energy = _energy(layer.weight, layer.raw_hessian)
    solver = make_solver(layer.solver, layer.weight, layer.hessian, layer.compensate)
    tracker = _ErrorTracker(layer)
    costs, probe = [0.0], None
    for previous, count in itertools.pairwise(counts):
        columns = torch.tensor(remove_channels(solver, [count - previous]), dtype=torch.long,
                               device=layer.weight.device)
        costs.append(tracker.step(solver.weight, columns) / energy)
        if count == probe_count:
            probe = solver.weight - layer.weight
    return CostCurve(list(counts), costs, probe, probe_count if probe is not None else 0)


def allowed_channel_counts(ffn_channels: int, round_to: int) -> list[int]:
    """Channel removal counts that keep a positive multiple of ``round_to`` channels, and 0."""
    step = max(round_to, 1)
    return sorted({0, *(ffn_channels - k for k in range(step, ffn_channels + 1, step))} - {ffn_channels})


def channel_checkpoints(allowed: list[int], steps: int) -> list[int]:
    """About ``steps`` of the ``allowed`` counts, evenly spaced, the first (0) and the last included."""
    stride = max(1, math.ceil((len(allowed) - 1) / max(steps, 1)))
    points = allowed[::stride]
    if points[-1] != allowed[-1]:
        points.append(allowed[-1])
    return points


def interpolate(curve: CostCurve, counts: list[int]) -> list[float]:
    """The curve's cost at each of ``counts`` (linear between its points, flat beyond the last)."""
    xs, ys = curve.counts, curve.costs
    out = []
    for c in counts:
        j = bisect.bisect_right(xs, c) - 1
        if j >= len(xs) - 1:
            out.append(ys[-1])
        else:
            t = (c - xs[j]) / (xs[j + 1] - xs[j])
            out.append(ys[j] + t * (ys[j + 1] - ys[j]))
    return out


@dataclass(frozen=True)
class Option:
    """One module's choices: removal counts (ascending, first 0), their weighted costs, params per count."""

    counts: list[int]
    costs: list[float]
    params_per_count: int


def _hull(option: Option) -> list[int]:
    """Indices of the lower convex hull of (params removed, cost), left to right, collinear points kept."""
    hull: list[int] = []
    for j, count in enumerate(option.counts):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            xa, xb, ya, yb = option.counts[a], option.counts[b], option.costs[a], option.costs[b]
            above, chord = (yb - ya) * (count - xa), (option.costs[j] - ya) * (xb - xa)
            if above - chord > 1e-9 * (abs(above) + abs(chord)):  # b lies above the chord a-j (not by rounding)
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _segments(options: list[Option]) -> tuple[list[list[tuple[int, float]]], list[tuple[float, int, int]]]:
    """Each module's hull steps (params, cost), and every step as (cost per parameter, module, step)."""
    steps, order = [], []
    for m, option in enumerate(options):
        hull = _hull(option)
        module_steps, slope = [], -math.inf
        for s, (a, b) in enumerate(itertools.pairwise(hull)):
            params = (option.counts[b] - option.counts[a]) * option.params_per_count
            cost = option.costs[b] - option.costs[a]
            slope = max(slope, cost / params)  # non-decreasing against rounding, so steps go in order
            module_steps.append((params, cost))
            order.append((slope, m, s))
        steps.append(module_steps)
    order.sort()
    return steps, order


def _land(steps: list[list[tuple[int, float]]], taken: list[int], remaining: float) -> None:
    """Close the gap to the goal: one more step where it brings the total closer (the cheapest such, or
    the cheapest of all when nothing smaller is left), then undo the dearest taken steps while that helps."""
    ahead = [(steps[m][taken[m]][1], m) for m in range(len(steps)) if taken[m] < len(steps[m])]
    closer = [(cost, m) for cost, m in ahead if abs(remaining - steps[m][taken[m]][0]) < remaining]
    if closer or (remaining > 0 and ahead):
        m = min(closer or ahead)[1]
        remaining -= steps[m][taken[m]][0]
        taken[m] += 1
    while remaining < 0:
        back = [(-steps[m][taken[m] - 1][1] / steps[m][taken[m] - 1][0], m) for m in range(len(steps))
                if taken[m] and abs(remaining + steps[m][taken[m] - 1][0]) < -remaining]
        if not back:
            return
        m = min(back)[1]
        taken[m] -= 1
        remaining += steps[m][taken[m]][0]


def allocate(options: list[Option], goal: float) -> list[int]:
    """Parameters removed per option (as counts): the least total cost that reaches ``goal``.

    Greedy over the hulls' steps by cost per parameter, each module's steps in order; a step that would
    overshoot closes its module. ``_land`` then closes the gap, so the result is within half a channel
    step of the goal wherever an FFN has channels to give, like slimgpt.solver.schedule.
    """
    capacity = sum(o.counts[-1] * o.params_per_count for o in options)
    if capacity < goal:
        raise ConfigError(f"cannot remove {goal:.0f} parameters with the auto schedule (at most {capacity} while "
                          "keeping one attention unit and one channel per layer): lower --ratio")
    steps, order = _segments(options)
    taken = [0] * len(options)
    closed = [False] * len(options)
    remaining = goal
    for _slope, m, s in order:
        if closed[m] or s != taken[m]:
            continue
        params = steps[m][s][0]
        if params <= remaining:
            taken[m] += 1
            remaining -= params
        else:
            closed[m] = True
    _land(steps, taken, remaining)
    counts = []
    for option, n in zip(options, taken, strict=True):
        counts.append(option.counts[_hull(option)[n]])
    return counts
