"""The baselines' unit scores as pure functions on tensors (formulas in the docstrings).

| method | unit score | per-layer amounts | compensation |
| --- | --- | --- | --- |
| magnitude | Frobenius norm of the unit's coupled weights | uniform | none |
| wanda-sp | mean_i abs(W_ij) * norm(X_j), summed over a head | uniform | none |
| flap | var(X_j) * norm(W[:, j])^2, standardised per layer | global ranking | output bias |
| llm-pruner | sum of abs(w * dL/dw) over the coupled group | uniform, middle layers | none |
"""

from __future__ import annotations

import torch

from slimgpt.errors import ConfigError


def lowest_units(scores: torch.Tensor, rounds: int, buckets: list[list[int]] | None = None) -> list[int]:
    """The ``rounds`` lowest-scored units; with buckets, the ``rounds`` lowest of every bucket.

    Ties go to the lower index (stable sort), so the choice is deterministic.
    """
    if rounds <= 0:
        return []
    scores = scores.detach().to("cpu", torch.float64)
    if buckets is None:
        return torch.argsort(scores, stable=True)[:rounds].tolist()
    removed: list[int] = []
    for bucket in buckets:
        order = torch.argsort(scores[bucket], stable=True)[:rounds]
        removed.extend(bucket[i] for i in order.tolist())
    return removed


def drop_columns(weight: torch.Tensor, units: torch.Tensor, removed: list[int]) -> torch.Tensor:
    """W with the columns of the removed units zeroed (no compensation). units: [n_units, g]."""
    pruned = weight.clone()
    if removed:
        pruned[:, units[removed].flatten().to(weight.device)] = 0
    return pruned


def attention_group_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, n_heads: int,
                         n_kv_heads: int, kind: str) -> torch.Tensor:
    """Sum of a per-weight quantity over each attention unit's coupled weights.

    q: [n_heads * hd, d], k / v: [n_kv_heads * hd, d] (rows per head), o: [d, n_heads * hd] (columns
    per head); each holds one number per weight (w^2 for a norm, abs(w * g) for Taylor importance).
    kind (slimgpt.prune.attention_units): "head" (MHA: q, k, v rows and o columns of the head),
    "kv-group" (all query heads of the group plus the group's k, v rows), "query-head" (q rows and o
    columns only: the KV head stays). Returns [n_units] in the driver's unit order.
    """
    hd = o.shape[1] // n_heads
    per_head = q.sum(1).view(n_heads, hd).sum(1) + o.sum(0).view(n_heads, hd).sum(1)  # [n_heads]
    per_kv_head = (k.sum(1) + v.sum(1)).view(n_kv_heads, hd).sum(1)  # [n_kv_heads]
    if kind == "query-head":
        return per_head
    if kind == "head":
        return per_head + per_kv_head
    if kind == "kv-group":
        return per_head.view(n_kv_heads, n_heads // n_kv_heads).sum(1) + per_kv_head
    raise ValueError(f"unknown attention unit kind {kind!r}")


def channel_group_sums(inputs: list[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    """Sum of a per-weight quantity over each FFN channel's gate/up rows and down_proj column.

    inputs: [d_ff, d] each (gate, up; OPT: fc1); output: [d, d_ff] (down_proj; OPT: fc2). Returns [d_ff].
    """
    return sum((m.sum(1) for m in inputs), output.sum(0))


def wanda_sp_scores(weight: torch.Tensor, input_norms: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Structured Wanda (FLAP's code for Wanda-sp): S_j = mean_i abs(W_ij) * norm(X_j)_2 per input column.

    weight: W [d_out, d_in] of o_proj / down_proj; input_norms: norm(X_j)_2 over the calibration tokens
    [d_in]; units: [n_units, g] columns of each unit. A head's score is the sum over its columns.
    """
    column = (weight.abs() * input_norms[None, :]).mean(0)  # [d_in]
    return column[units].sum(1)


def fluctuation(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation metric (WIFV) per input column: var(X_j) * norm(W[:, j])^2, shape [d_in].

    A column whose input barely varies around its mean can be replaced by a constant (the bias), and
    its weight norm says how much that constant would matter.
    """
    return variance * weight.square().sum(0)


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over one module's scores (FLAP: makes attention and FFN scores of all layers comparable)."""
    std = scores.std()
    return (scores - scores.mean()) / std.clamp_min(torch.finfo(scores.dtype).tiny)


def flap_attention_scores(weight: torch.Tensor, variance: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """FLAP's head score: standardise the SQUARED column fluctuation over the layer's o_proj columns, then
    average over each unit's columns (FLAP's code squares the attention metric before standardising)."""
    return standardise(fluctuation(weight, variance).square())[units].mean(1)


def flap_channel_scores(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """FLAP's FFN channel score: the down_proj column fluctuation, standardised over the layer's channels."""
    return standardise(fluctuation(weight, variance))


def flap_bias(weight: torch.Tensor, mean: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation b = W[:, P] mean(X_P): the removed columns' average contribution, shape [d_out].

    Adding b to the output bias keeps the mean output over the calibration tokens exactly unchanged:
    mean_t(W' x_t + b) = W' mean(x) + W_P mean(x_P) = W mean(x).
    """
    return weight[:, columns] @ mean[columns]


def round_scores(unit_scores: torch.Tensor, buckets: list[list[int]] | None) -> torch.Tensor:
    """Scores of the successive removal rounds of one layer, ascending: what a global ranking compares.

    Without buckets a round removes one unit: the sorted unit scores. With buckets (GQA query-heads) a
    round removes the r-th lowest unit of every bucket; its score is their mean.
    """
    if buckets is None:
        return unit_scores.sort().values
    per_bucket = torch.stack([unit_scores[b].sort().values for b in buckets])  # [n_buckets, per_bucket]
    return per_bucket.mean(0)


def global_counts(module_scores: list[torch.Tensor], unit_params: list[int], caps: list[int],
                  goal: float) -> list[int]:
    """FLAP's global ranking: how many items to remove from each module so the removed parameters are
    closest to ``goal``.

    module_scores: each module's item scores in ascending order (items are removed in that order);
    unit_params: parameters one item of the module removes; caps: most items the module may lose (a
    layer keeps at least one attention unit and one channel). All items of all modules are ranked
    together; the lowest go first until the count crosses ``goal``, stopping on whichever side of the
    crossing is closer (at most half an item from the goal).
    """
    counts = [0] * len(module_scores)
    if goal <= 0:
        return counts
    scores = torch.cat([s.to(torch.float64).cpu() for s in module_scores])
    owner = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(module_scores)])
    removed = 0.0
    for item in torch.argsort(scores, stable=True).tolist():
        module = int(owner[item])
        if counts[module] >= caps[module]:
            continue
        params = unit_params[module]
        if removed + params >= goal:
            if removed + params - goal < goal - removed:
                counts[module] += 1
            return counts
        counts[module] += 1
        removed += params
    raise ConfigError(f"cannot remove {goal:,.0f} parameters while keeping one attention unit and one FFN channel "
                      "per layer: lower --ratio")
