"""The structure of a SliceGPT-sliced model: a narrower residual stream with shortcut matrices.

SliceGPT (slimgpt.slicegpt) rotates each block's residual stream into its principal directions and
keeps only the leading ones, so the stream between blocks narrows from the model's ``hidden_size``
D to a width of its own, and each residual connection gets a shortcut matrix that maps one block's
basis into the next one's. The widths are listed in the config's ``slice_dims`` (2L + 1 numbers):

    slice_dims[2l]      width of layer l's input (what its attention reads); slice_dims[0] is the
                        embedding width
    slice_dims[2l + 1]  width between layer l's attention and its FFN
    slice_dims[2l + 2]  width of layer l's output; the last one is the width the final norm and
                        lm_head read (D: slimgpt does not slice the head, as SliceGPT's default)

A sliced layer (``SlicedLayerMixin`` in front of the family's decoder layer class) computes

    h   = attn_shortcut(x) + attention(norm_1(x))
    out = mlp_shortcut(h) + mlp(norm_2(h))

The norms are weight-free RMS norms over the sliced width that divide by the full width D (the
rotation keeps the norm of the kept part; see ``SlicedRMSNorm``). Heads and FFN channels are untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.families import get_adapter


class SlicedRMSNorm(nn.Module):
    """RMS norm of a ``dim``-wide slice of a ``full_dim``-wide stream: x / sqrt(sum(x^2) / full_dim + eps).

    Dividing by the full width (not ``dim``) keeps the norm of the rotated, sliced stream equal to the
    norm of the dense one; the weight stays all ones once SliceGPT has folded the norm's scale into the
    next layers (it is kept so the module has the usual ``weight`` and is fine-tunable).
    """

    def __init__(self, dim: int, full_dim: int, eps: float, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.full_dim = full_dim
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        x = hidden.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.full_dim + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, full_dim={self.full_dim}, eps={self.eps}"


class SlicedLayerMixin:
    """Forward of a sliced decoder layer; put in front of the family's layer class (``sliced_layer``)."""

    slimgpt_adapter: ModelAdapter
    attn_shortcut: nn.Linear
    mlp_shortcut: nn.Linear

    def attention_half(self, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        adapter = self.slimgpt_adapter
        attn_norm, _ = adapter.norm_paths()
        normed = getattr(self, attn_norm)(hidden)
        return self.attn_shortcut(hidden) + adapter.attend(self, normed, kwargs)

    def mlp_half(self, hidden: torch.Tensor) -> torch.Tensor:
        adapter = self.slimgpt_adapter
        _, mlp_norm = adapter.norm_paths()
        return self.mlp_shortcut(hidden) + adapter.feed_forward(self, getattr(self, mlp_norm)(hidden))

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.mlp_half(self.attention_half(hidden_states, **kwargs))


_SLICED_CLASSES: dict[type, type] = {}


def sliced_layer(layer: Any, adapter: ModelAdapter) -> None:
    """Turn ``layer`` (a stock decoder layer) into its sliced class in place; weights are untouched."""
    base = type(layer)
    if isinstance(layer, SlicedLayerMixin):
        return
    if base not in _SLICED_CLASSES:
        _SLICED_CLASSES[base] = type(f"Sliced{base.__name__}", (SlicedLayerMixin, base), {"__module__": __name__})
    layer.__class__ = _SLICED_CLASSES[base]
    layer.slimgpt_adapter = adapter


def layer_widths(dims: list[int], index: int) -> tuple[int, int, int]:
    """(input, middle, output) width of layer ``index`` from a ``slice_dims`` list."""
    return dims[2 * index], dims[2 * index + 1], dims[2 * index + 2]


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of a stock norm module (LLaMA-like: ``variance_epsilon``; LayerNorm: ``eps``)."""
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-5)))


def _empty_linear(in_features: int, out_features: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=like.device, dtype=like.dtype)


def resize_sliced_layer(layer: Any, adapter: ModelAdapter, widths: tuple[int, int, int], full_dim: int) -> None:
    """Give a freshly built layer the sliced structure with ``widths`` (weights are loaded afterwards)."""
    d_in, d_mid, d_out = widths
    paths = adapter.linear_paths()
    like = adapter.attn_output(layer).weight
    for role in ("q", "k", "v"):
        old: Any = layer.get_submodule(paths[role])
        adapter.set_linear(layer, paths[role], _empty_linear(d_in, old.out_features, old.bias is not None, like))
    old = layer.get_submodule(paths["o"])
    adapter.set_linear(layer, paths["o"], _empty_linear(old.in_features, d_mid, old.bias is not None, like))
    for path in paths["mlp_in"].split(","):
        old = layer.get_submodule(path)
        adapter.set_linear(layer, path, _empty_linear(d_mid, old.out_features, old.bias is not None, like))
    old = layer.get_submodule(paths["mlp_out"])
    adapter.set_linear(layer, paths["mlp_out"], _empty_linear(old.in_features, d_out, old.bias is not None, like))
    for path, width in zip(adapter.norm_paths(), (d_in, d_mid), strict=True):
        eps = norm_eps(layer.get_submodule(path))
        setattr(layer, path, SlicedRMSNorm(width, full_dim, eps, device=like.device, dtype=like.dtype))
    layer.attn_shortcut = _empty_linear(d_in, d_mid, False, like)
    layer.mlp_shortcut = _empty_linear(d_mid, d_out, False, like)
    sliced_layer(layer, adapter)


def set_embedding_width(embedding: nn.Embedding, weight: torch.Tensor, width: int) -> None:
    """Replace an embedding table by ``weight`` [rows, width] (an empty tensor: uninitialised, for loading)."""
    like = embedding.weight
    if weight.numel() == 0:
        weight = torch.empty(like.shape[0], width, device=like.device, dtype=like.dtype)
    embedding.weight = nn.Parameter(weight.to(like.dtype), requires_grad=like.requires_grad)
    embedding.embedding_dim = width


def apply_slice_dims(model: Any, dims: list[int]) -> None:
    """Shape a freshly built model to the sliced widths ``dims`` (``config.slice_dims``)."""
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    if len(dims) != 2 * len(layers) + 1:
        raise ValueError(f"slice_dims has {len(dims)} entries; a {len(layers)}-layer model needs {2 * len(layers) + 1}")
    full_dim = adapter.hidden_size
    if dims[-1] != full_dim:
        raise ValueError(f"slice_dims must end with the hidden size {full_dim} (the head is not sliced)")
    decoder = model.get_decoder()
    for path in adapter.embedding_paths():
        set_embedding_width(decoder.get_submodule(path), torch.empty(0), dims[0])
    for index, layer in enumerate(layers):
        resize_sliced_layer(layer, adapter, layer_widths(dims, index), full_dim)
