"""How big a layer is and what its removable units are: parameter counts and attention units.

Methods and drivers ask these instead of reading module shapes themselves, so every method counts
parameters the same way (that is what makes equal-size comparisons fair).
"""

from __future__ import annotations

import torch
from torch import nn

from slimgpt.models.adapters import LayerSizes, ModelAdapter, head_columns
from slimgpt.solver.schedule import LayerGeometry


def linear_params(linear: nn.Linear) -> int:
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


def layer_params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


def decoder_params(model: nn.Module, adapter: ModelAdapter) -> int:
    return sum(layer_params(layer) for layer in adapter.decoder_layers(model))


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def attention_units(
    adapter: ModelAdapter, sizes: LayerSizes, policy: str
) -> tuple[torch.Tensor, list[list[int]] | None, str]:
    """The removable attention units of a layer as groups of o_proj columns.

    MHA: one unit per head. GQA kv-group: one unit per KV group (all its query heads). GQA query-heads:
    one unit per query head, bucketed by KV group so every group loses the same number.
    Returns (units [n_units, g], buckets, kind).
    """
    hd = adapter.head_dim
    group = sizes.n_heads // sizes.n_kv_heads
    heads = torch.arange(sizes.n_heads)
    if group == 1:
        return head_columns(heads, hd).view(sizes.n_heads, hd), None, "head"
    if policy == "kv-group":
        return head_columns(heads, hd).view(sizes.n_kv_heads, group * hd), None, "kv-group"
    buckets = [list(range(g * group, (g + 1) * group)) for g in range(sizes.n_kv_heads)]
    return head_columns(heads, hd).view(sizes.n_heads, hd), buckets, "query-head"


def units_to_heads(removed_units: list[int], unit_kind: str, sizes: LayerSizes) -> set[int]:
    """The query heads that removing ``removed_units`` (of ``attention_units``' kind) removes."""
    group = sizes.n_heads // sizes.n_kv_heads
    if unit_kind == "kv-group":
        return {u * group + j for u in removed_units for j in range(group)}
    return set(removed_units)


def layer_geometry(adapter: ModelAdapter, layer: nn.Module, policy: str) -> LayerGeometry:
    """How many units a layer has and how many parameters each one removes."""
    sizes = adapter.layer_sizes(layer)
    hd, d = adapter.head_dim, adapter.hidden_size
    q, k, v = adapter.attn_inputs(layer)
    q_per_head = hd * (d + (q.bias is not None))
    kv_per_head = hd * (2 * d + (k.bias is not None) + (v.bias is not None))
    o_per_head = hd * d
    group = sizes.n_heads // sizes.n_kv_heads
    if group == 1:
        units, per_unit = sizes.n_heads, q_per_head + kv_per_head + o_per_head
    elif policy == "kv-group":
        units, per_unit = sizes.n_kv_heads, group * (q_per_head + o_per_head) + kv_per_head
    else:  # one query head from every group per unit
        units, per_unit = group, sizes.n_kv_heads * (q_per_head + o_per_head)
    per_channel = sum(m.in_features + (m.bias is not None) for m in adapter.mlp_inputs(layer))
    per_channel += adapter.mlp_output(layer).out_features
    return LayerGeometry(units, per_unit, sizes.ffn_dim, per_channel, layer_params(layer))


def model_geometry(model: nn.Module, adapter: ModelAdapter, policy: str) -> list[LayerGeometry]:
    return [layer_geometry(adapter, layer, policy) for layer in adapter.decoder_layers(model)]
