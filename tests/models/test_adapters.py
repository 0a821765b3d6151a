"""Contract of slimgpt.models.adapters: every family row's adapter, asked by role, on a tiny in-process model.

Parametrised over the rows of slimgpt.models.families.FAMILIES (a new row is picked up here and fails
until conftest.make_model can build it) plus conftest's layout variants (GQA, post-norm OPT).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import conftest
from conftest import make_model, probe
from slimgpt.models.adapters import LayerSizes, ModelAdapter
from slimgpt.models.families import FAMILIES, family_row, get_adapter

VARIANTS = [*FAMILIES, *(name for name in conftest.FAMILIES if name not in FAMILIES), "opt-post-norm"]
RTOL = 1e-5  # float32 rounding, relative to the scale of what is compared


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> bool:
    """Max deviation relative to the largest magnitude of ``expected``."""
    return bool((actual - expected).abs().max() <= rtol * expected.abs().max())


def _stock_sizes(config: Any) -> LayerSizes:
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    return LayerSizes(heads, kv, int(getattr(config, family_row(config.model_type).ffn_size_key)))


def _layer_io(model: nn.Module, adapter: ModelAdapter) -> list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]]:
    """(input hidden states, kwargs, output hidden states) of every decoder layer on the probe tokens."""
    seen: list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")}
        seen.append((hidden, rest, output[0] if isinstance(output, tuple) else output))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in adapter.decoder_layers(model)]
    try:
        with torch.no_grad():
            model(probe(), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(probe(), use_cache=False).logits


def test_every_row_is_covered() -> None:
    assert {make_model(name).config.model_type for name in VARIANTS} == set(FAMILIES)


@pytest.mark.parametrize("variant", VARIANTS)
def test_roles_have_the_layer_sizes(variant: str) -> None:
    model = make_model(variant)
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    hidden, hd = adapter.hidden_size, adapter.head_dim
    for layer in layers:
        sizes = adapter.layer_sizes(layer)
        assert sizes == _stock_sizes(model.config)
        q, k, v = adapter.attn_inputs(layer)
        assert q.weight.shape == (sizes.n_heads * hd, hidden)
        assert k.weight.shape == v.weight.shape == (sizes.n_kv_heads * hd, hidden)
        assert adapter.attn_output(layer).weight.shape == (hidden, sizes.n_heads * hd)
        inputs = adapter.mlp_inputs(layer)
        assert len(inputs) == len(family_row(model.config.model_type).ffn_input_roles)
        assert all(linear.weight.shape == (sizes.ffn_dim, hidden) for linear in inputs)
        assert adapter.mlp_output(layer).weight.shape == (hidden, sizes.ffn_dim)


@pytest.mark.parametrize("variant", VARIANTS)
def test_blocks_reproduce_the_layer_forward(variant: str) -> None:
    model = make_model(variant)
    adapter = get_adapter(model.config)
    for layer, (hidden, kwargs, output) in zip(adapter.decoder_layers(model), _layer_io(model, adapter),
                                               strict=True):
        with torch.no_grad():
            ours = adapter.mlp_block(layer, adapter.attention_block(layer, hidden, kwargs))
        assert _close(ours, output)


@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_and_norm_paths_resolve_to_the_roles(variant: str) -> None:
    model = make_model(variant)
    adapter = get_adapter(model.config)
    row = family_row(model.config.model_type)
    layer = adapter.decoder_layers(model)[0]
    paths = adapter.linear_paths()
    q, k, v = adapter.attn_inputs(layer)
    expected = {"q": [q], "k": [k], "v": [v], "o": [adapter.attn_output(layer)],
                "mlp_in": adapter.mlp_inputs(layer), "mlp_out": [adapter.mlp_output(layer)]}
    assert set(paths) == set(expected)
    for role, path in paths.items():
        assert [layer.get_submodule(p) for p in path.split(",")] == expected[role]
    roles = {"q": "q", "k": "k", "v": "v", "o": "o", "mlp_out": "down"}
    for role, name in roles.items():
        assert paths[role] == row.tensor_names[name]
    assert paths["mlp_in"].split(",") == [row.tensor_names[r] for r in row.ffn_input_roles]
    for path, name in zip(adapter.norm_paths(), ("attn_norm", "ffn_norm"), strict=True):
        norm = layer.get_submodule(path)
        assert path == row.tensor_names[name]
        assert norm.weight.shape == (adapter.hidden_size,)


@pytest.mark.parametrize("variant", VARIANTS)
def test_set_linear_replaces_the_role(variant: str) -> None:
    model = make_model(variant)
    adapter = get_adapter(model.config)
    layer = adapter.decoder_layers(model)[0]
    for role, path in adapter.linear_paths().items():
        for part in path.split(","):
            old = layer.get_submodule(part)
            new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None)
            adapter.set_linear(layer, part, new)
            assert layer.get_submodule(part) is new, role
    q, k, v = adapter.attn_inputs(layer)
    paths = adapter.linear_paths()
    assert (q, k, v) == tuple(layer.get_submodule(paths[r]) for r in ("q", "k", "v"))
    assert adapter.mlp_output(layer) is layer.get_submodule(paths["mlp_out"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_shrinking_to_everything_changes_nothing(variant: str) -> None:
    model = make_model(variant)
    adapter = get_adapter(model.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = _logits(model)
    for layer in adapter.decoder_layers(model):
        sizes = adapter.layer_sizes(layer)
        adapter.shrink_layer(layer, torch.arange(sizes.n_heads), torch.arange(sizes.ffn_dim))
        assert adapter.layer_sizes(layer) == sizes
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(_logits(model), logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_removing_heads_and_channels_equals_zero_masking_them(variant: str) -> None:
    """Removing the query heads of one KV group and some FFN channels computes what zeroing their
    attention-output columns and FFN-output columns computes."""
    shrunk = make_model(variant)
    adapter = get_adapter(shrunk.config)
    masked = copy.deepcopy(shrunk)
    hd = adapter.head_dim
    for small, zeroed in zip(adapter.decoder_layers(shrunk), adapter.decoder_layers(masked), strict=True):
        sizes = adapter.layer_sizes(small)
        group = sizes.n_heads // sizes.n_kv_heads
        removed_heads = torch.arange(group)  # KV group 0 entirely: the other groups stay equal
        removed_channels = torch.arange(0, sizes.ffn_dim, 3)
        keep_heads = torch.arange(group, sizes.n_heads)
        keep_channels = torch.tensor([c for c in range(sizes.ffn_dim) if c % 3])
        with torch.no_grad():
            for head in removed_heads.tolist():
                adapter.attn_output(zeroed).weight[:, head * hd:(head + 1) * hd] = 0
            adapter.mlp_output(zeroed).weight[:, removed_channels] = 0
        adapter.shrink_layer(small, keep_heads, keep_channels)
        assert adapter.layer_sizes(small) == LayerSizes(len(keep_heads), sizes.n_kv_heads - 1, len(keep_channels))
    assert _close(_logits(shrunk), _logits(masked))


@pytest.mark.parametrize("variant", VARIANTS)
def test_resize_layer_gives_the_sizes(variant: str) -> None:
    model = make_model(variant)
    adapter = get_adapter(model.config)
    full = adapter.layer_sizes(adapter.decoder_layers(model)[0])
    group = full.n_heads // full.n_kv_heads
    kv = max(1, full.n_kv_heads // 2)
    target = LayerSizes(kv * group, kv, full.ffn_dim - 8)
    for layer in adapter.decoder_layers(model):
        adapter.resize_layer(layer, target)
        assert adapter.layer_sizes(layer) == target
    logits = _logits(model)  # the stock forward runs at the new widths
    assert logits.shape == (*probe().shape, model.config.vocab_size)
    assert bool(torch.isfinite(logits).all())
