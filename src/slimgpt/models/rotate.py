"""SliceGPT's surgery on a layer: fold its norms, rotate its readers and writers, and its sliced size.

Every norm's scale (and, for LayerNorm, its shift) moves into the linear maps that read its output;
LayerNorm's centring moves into everything that writes to the stream. Every norm is then a plain RMS
norm, which commutes with an orthogonal rotation of the stream: the network's function is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimgpt.errors import ConfigError
from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.sliced import SlicedRMSNorm, layer_widths, norm_eps


def sliced_layer_params(adapter: ModelAdapter, layer: Any, widths: tuple[int, int, int]) -> int:
    """Parameters of ``layer`` once sliced to (input, middle, output) widths, shortcuts and norms included."""
    d_in, d_mid, d_out = widths

    def bias(linear: nn.Linear, width: int) -> int:
        return width if linear.bias is not None else 0

    readers = [*adapter.attn_inputs(layer)]
    total = sum(d_in * q.out_features + bias(q, q.out_features) for q in readers)
    o_proj = adapter.attn_output(layer)
    total += o_proj.in_features * d_mid + bias(o_proj, d_mid)
    total += sum(d_mid * m.out_features + bias(m, m.out_features) for m in adapter.mlp_inputs(layer))
    down = adapter.mlp_output(layer)
    total += down.in_features * d_out + bias(down, d_out)
    return total + d_in * d_mid + d_mid * d_out + d_in + d_mid


def slice_dims_for(n_layers: int, width: int, full: int) -> list[int]:
    """Uniform slicing: every stream ``width`` wide except the last layer's output (the head reads ``full``)."""
    return [width] * (2 * n_layers) + [full]


def plan_width(adapter: ModelAdapter, layers: list[nn.Module], ratio: float, round_to: int = 1) -> int:
    """The slicing width (a multiple of ``round_to``) whose decoder parameter count is closest to the target."""
    full = adapter.hidden_size
    before = sum(sum(p.numel() for p in layer.parameters()) for layer in layers)
    target = before * (1 - ratio)

    def params(width: int) -> int:
        dims = slice_dims_for(len(layers), width, full)
        return sum(sliced_layer_params(adapter, layer, layer_widths(dims, i)) for i, layer in enumerate(layers))

    candidates = list(range(round_to, full + 1, round_to)) or [full]
    low, high = 0, len(candidates) - 1  # params() grows with the width: bisect for the last one <= target
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if params(candidates[mid]) <= target else (low, mid - 1)
    near = candidates[low:low + 2]
    return min(near, key=lambda w: (abs(params(w) - target), -w))


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """A Linear holding ``weight`` / ``bias`` (computed in float64) in ``like``'s dtype and device."""
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    dtype, device = like.weight.dtype, like.weight.device
    new.weight = nn.Parameter(weight.to(device, dtype), requires_grad=like.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.to(device, dtype), requires_grad=like.weight.requires_grad)
    return new


def _set(layer: Any, adapter: ModelAdapter, path: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    adapter.set_linear(layer, path, new_linear(weight, bias, layer.get_submodule(path)))


def _weights(linear: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    assert isinstance(linear, nn.Linear)
    bias = linear.bias.detach().double() if linear.bias is not None else None
    return linear.weight.detach().double(), bias


def rotate_readers(layer: Any, adapter: ModelAdapter, paths: list[str], basis: torch.Tensor) -> None:
    """Linear maps reading the stream now read it in ``basis`` coordinates: W <- W Q."""
    for path in paths:
        weight, bias = _weights(layer.get_submodule(path))
        _set(layer, adapter, path, weight @ basis, bias)


def rotate_writer(layer: Any, adapter: ModelAdapter, path: str, basis: torch.Tensor) -> None:
    """A linear map writing to the stream now writes ``basis`` coordinates: W <- Q^T W, b <- Q^T b."""
    weight, bias = _weights(layer.get_submodule(path))
    _set(layer, adapter, path, basis.T @ weight, basis.T @ bias if bias is not None else None)


def _center_writer(layer: Any, adapter: ModelAdapter, path: str) -> None:
    weight, bias = _weights(layer.get_submodule(path))
    _set(layer, adapter, path, weight - weight.mean(0, keepdim=True), bias - bias.mean() if bias is not None else None)


def fold_layer_norms(layer: Any, adapter: ModelAdapter) -> None:
    """Move each norm's scale / shift into its readers and make it a weight-free RMS norm (same function).

    For LayerNorm families the layer's writers are centred too, so the stream stays zero-mean and
    LayerNorm equals the RMS norm.
    """
    paths = adapter.linear_paths()
    full = adapter.hidden_size
    readers = ([paths["q"], paths["k"], paths["v"]], paths["mlp_in"].split(","))
    for norm_path, reader_paths in zip(adapter.norm_paths(), readers, strict=True):
        norm = layer.get_submodule(norm_path)
        scale = norm.weight.detach().double() if getattr(norm, "weight", None) is not None else None
        shift = norm.bias.detach().double() if getattr(norm, "bias", None) is not None else None
        for path in reader_paths:
            weight, bias = _weights(layer.get_submodule(path))
            if shift is not None:
                if bias is None:
                    raise ConfigError(f"cannot fold the norm shift into {path}: it has no bias")
                bias = bias + weight @ shift
            _set(layer, adapter, path, weight * scale[None, :] if scale is not None else weight, bias)
        like = layer.get_submodule(reader_paths[0]).weight
        setattr(layer, norm_path, SlicedRMSNorm(full, full, norm_eps(norm), device=like.device, dtype=like.dtype))
    if adapter.norm_subtracts_mean:
        for path in (paths["o"], paths["mlp_out"]):
            _center_writer(layer, adapter, path)


def shortcut(weight: torch.Tensor, like: nn.Linear) -> nn.Linear:
    """A bias-free map between two blocks' bases, in ``like``'s dtype and device."""
    return new_linear(weight, None, like)
