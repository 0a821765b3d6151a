"""The passes over the calibration windows that a head/channel layer takes (pre-norm: three).

a. the attention half up to o_proj: statistics of o_proj's inputs, which are also kept on the store;
b. the attention half's new output, h + o_proj(kept inputs) (removing heads leaves the kept heads'
   outputs unchanged, so no q/k/v or softmax runs again), then the FFN half up to down_proj for the
   statistics of down_proj's inputs;
c. propagation: the pruned FFN half on (b)'s output gives the next layer's inputs.
Post-norm layers (OPT-350m), where a LayerNorm follows the residual add, run the attention half in (b)
and (c) again.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from slimgpt.layerwise.capture import Activations, input_of
from slimgpt.layerwise.distributed import reduce_statistics
from slimgpt.models.adapters import ModelAdapter
from slimgpt.solver.hessian import InputStatistics


def attention_pass(layer: nn.Module, adapter: ModelAdapter, acts: Activations, stats: InputStatistics | None,
                   keep: bool) -> None:
    """Run the dense attention half up to o_proj: o_proj's input statistics, and (``keep``) its inputs."""
    o_proj = adapter.attn_output(layer)
    for part, h, kw in acts.batches():
        x = input_of(o_proj, partial(adapter.attention_block, layer, h, kw))
        if stats is not None:
            stats.add(x)
        if keep:
            acts.keep_inner(part, x)
    if stats is not None:
        reduce_statistics(stats)  # the sums over every rank's windows (a no-op in one process)


def ffn_pass(layer: nn.Module, adapter: ModelAdapter, acts: Activations, stats: InputStatistics | None,
             rebuild_attention: bool) -> None:
    """Run the layer up to down_proj with the pruned o_proj in place: down_proj's input statistics.

    rebuild_attention: the attention half's output is h + o_proj(kept inputs) (pre-norm layers; removing
    heads leaves the kept heads' outputs unchanged); it is written to ``acts.hidden`` so that propagation
    runs only the FFN half.
    """
    o_proj, down_proj = adapter.attn_output(layer), adapter.mlp_output(layer)
    for part, h, kw in acts.batches():
        if rebuild_attention:
            assert acts.inner is not None
            mid = h + o_proj(acts.inner[part].to(acts.device))  # [B, S, d]
            acts.hidden[part] = mid.to(acts.hidden.device)
        else:
            mid = adapter.attention_block(layer, h, kw)
        if stats is not None:
            stats.add(input_of(down_proj, partial(adapter.mlp_block, layer, mid)))
    if stats is not None:
        reduce_statistics(stats)  # the sums over every rank's windows (a no-op in one process)


def propagate(layer: nn.Module, adapter: ModelAdapter, acts: Activations, attention: bool) -> None:
    """Overwrite ``acts.hidden`` with the pruned layer's outputs; ``attention=False``: it already holds the
    attention half's outputs, only the FFN half runs."""
    for part, h, kw in acts.batches():
        mid = adapter.attention_block(layer, h, kw) if attention else h
        acts.hidden[part] = adapter.mlp_block(layer, mid).to(acts.hidden.device)
