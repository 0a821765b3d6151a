"""Structured pruning rounds on top of the OBS solvers (docs/paper.md sections 4 and 5).

- Heads: Batched Greedy Pruning. Each round scores every surviving head (a group of head_dim columns
  of o_proj) with the grouped-Cholesky cost and removes the cheapest one, compensating the rest.
- FFN channels: Dynamic Group Size. Each round ranks single columns of down_proj by OBS error and
  removes the g cheapest together; g starts large and shrinks, so the last choices are made with the
  most up-to-date inverse Hessian.
"""

from __future__ import annotations

import math

import torch

from slimgpt.solver.base import Solver

GROUP_SCHEDULES = ("halving", "authors", "fixed")


def greedy_remove_units(
    solver: Solver,
    units: torch.Tensor,
    rounds: int,
    buckets: list[list[int]] | None = None,
    score: str = "gcd",
) -> list[int]:
    """Remove units greedily, ``rounds`` rounds; each round removes the cheapest unit of each bucket.

    units: [n_units, g] column indices (a head's columns, or a whole KV group's columns).
    buckets: partitions of unit indices; one bucket with every unit (default) removes one unit per
    round; for GQA's query-heads policy there is one bucket per KV group, so every group loses the
    same number of query heads. Returns the removed unit indices in the order they were removed.
    """
    buckets = buckets if buckets is not None else [list(range(len(units)))]
    alive = torch.ones(len(units), dtype=torch.bool)
    removed: list[int] = []
    solver.expect_removals(rounds * len(buckets) * units.shape[1], units=True)
    for _ in range(rounds):
        scores = solver.unit_scores(units, alive, score)
        chosen = []
        for bucket in buckets:
            bucket_scores = scores[bucket]
            if torch.isinf(bucket_scores).all():
                raise ValueError("a bucket has no unit left to remove")
            chosen.append(bucket[int(bucket_scores.argmin())])
        solver.remove(units[chosen].flatten())
        alive[chosen] = False
        removed.extend(chosen)
    return removed


def group_sizes(total: int, schedule: str = "halving", start: int = 1024, floor: int = 8,
                fraction: float = 0.5) -> list[int]:
    """Sizes of the successive FFN removal groups; they sum to ``total``.

    - ``halving`` (default): each round removes ``fraction`` of what is left to remove, clamped to
      [floor, start]. Large groups first, small ones at the end, in O(log total) rounds.
    - ``authors``: the authors' code: g0 = min(1024, (k - 512) // 2), then g <- (g - 512) // 2,
      never below 64 (both here clamped by ``start``/``floor`` when those are given explicitly).
    - ``fixed``: one group of everything (the paper's "-DGS" ablation: rank once, prune once).
    """
    if total <= 0:
        return []
    if schedule == "fixed":
        return [total]
    sizes: list[int] = []
    remaining = total
    if schedule == "halving":
        while remaining > 0:
            g = min(remaining, max(floor, min(start, math.ceil(remaining * fraction))))
            sizes.append(g)
            remaining -= g
        return sizes
    if schedule == "authors":
        floor = max(floor, 64)
        g = min(start, (total - 512) // 2)
        while remaining > 0:
            g = max(g, floor)
            sizes.append(min(g, remaining))
            remaining -= sizes[-1]
            g = (g - 512) // 2
        return sizes
    raise ValueError(f"unknown group schedule {schedule!r}; choose one of {GROUP_SCHEDULES}")


def remove_channels(solver: Solver, sizes: list[int]) -> list[int]:
    """Remove single columns in groups of the given sizes, cheapest OBS error first each round."""
    removed: list[int] = []
    solver.expect_removals(sum(sizes))
    for size in sizes:
        errors = solver.channel_errors()
        chosen = torch.topk(errors, size, largest=False).indices
        solver.remove(chosen)
        removed.extend(chosen.tolist())
    return removed
