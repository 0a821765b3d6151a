"""The passes over the calibration windows that a head/channel layer takes (pre-norm: three).

a. the attention half up to o_proj: statistics of o_proj's inputs, which are also kept on the store;
b. the attention half's new output, h + o_proj(kept inputs) (removing heads leaves the kept heads'
   outputs unchanged, so no q/k/v or softmax runs again), then the FFN half up to down_proj for the
   statistics of down_proj's inputs, which are also kept on the store where they fit the memory budget;
c. propagation: (b)'s output + the pruned down_proj on the kept channels' inputs (removing channels
   leaves the kept channels' activations unchanged, so no gate/up runs again) gives the next layer's
   inputs; where down_proj's inputs were not kept, the pruned FFN half runs on (b)'s output.
So each linear of a pre-norm layer runs once over the calibration tokens. Post-norm layers (OPT-350m),
where a LayerNorm follows the residual add, run the attention half in (b) and (c) again.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
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
    heads leaves the kept heads' outputs unchanged); it is written to ``acts.hidden``, and down_proj's
    inputs are kept where they fit, so that propagation runs only down_proj (else the FFN half).
    """
    o_proj, down_proj = adapter.attn_output(layer), adapter.mlp_output(layer)
    acts.ffn_ready = False
    for part, h, kw in acts.batches():
        if rebuild_attention:
            assert acts.inner is not None
            mid = h + o_proj(acts.inner[part].to(acts.device))  # [B, S, d]
            acts.hidden[part] = mid.to(acts.hidden.device)
        else:
            mid = adapter.attention_block(layer, h, kw)
        if stats is None and not rebuild_attention:
            continue
        x = input_of(down_proj, partial(adapter.mlp_block, layer, mid))  # [B, S, ffn]
        if stats is not None:
            stats.add(x)
        if rebuild_attention:
            acts.keep_ffn_inner(part, x)
    if stats is not None:
        reduce_statistics(stats)  # the sums over every rank's windows (a no-op in one process)


def propagate(layer: nn.Module, adapter: ModelAdapter, acts: Activations, attention: bool,
              keep_channels: torch.Tensor | None = None) -> None:
    """Overwrite ``acts.hidden`` with the pruned layer's outputs.

    ``attention=False``: it already holds the attention half's outputs. Where ``ffn_pass`` kept down_proj's
    inputs, the output is h + down_proj(those inputs), a shrunk down_proj's weight spread back to the full
    width with zero columns at the removed channels (``keep_channels``: the kept ones), which is cheaper
    than gathering the kept channels' inputs along their last dimension; else the FFN half runs.
    """
    down_proj = adapter.mlp_output(layer)
    reuse = acts.ffn_ready and not attention and acts.ffn_inner is not None
    acts.ffn_ready = False
    weight = down_proj.weight
    if reuse and acts.ffn_inner is not None and down_proj.in_features != acts.ffn_inner.shape[-1]:
        assert keep_channels is not None and len(keep_channels) == down_proj.in_features
        weight = weight.new_zeros(weight.shape[0], acts.ffn_inner.shape[-1])
        weight[:, keep_channels.to(weight.device)] = down_proj.weight
    for part, h, kw in acts.batches():
        if reuse and acts.ffn_inner is not None:
            x = acts.ffn_inner[part].to(acts.device)
            acts.hidden[part] = (h + F.linear(x, weight, down_proj.bias)).to(acts.hidden.device)
            continue
        mid = adapter.attention_block(layer, h, kw) if attention else h
        acts.hidden[part] = adapter.mlp_block(layer, mid).to(acts.hidden.device)
