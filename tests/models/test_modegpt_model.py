"""The MoDeGPT model format (slimgpt.models.modegpt): per-layer q/k and v head dims, RoPE index, reload."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import slimgpt  # noqa: F401  (registers the slimgpt_modegpt_* model types)
from conftest import calibration, make_model, probe
from slimgpt.models.families import get_adapter
from slimgpt.models.modegpt import (
    ModeGPTAttention,
    adopt_modegpt_config,
    modegpt_config_from,
    replace_attention,
    rope_rows,
    shape_layer,
)

LLAMA_LIKE = ["llama", "llama-gqa", "mistral", "qwen2"]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return float((a - b).abs().max().detach()) <= rel * float(b.abs().max().detach())


def _convert(model: torch.nn.Module, pairs_of: object, qk_keep: int = 0, v_keep: int = 0,
             ffn_keep: int = 0) -> None:
    """Put every layer in the MoDeGPT format: pairs_of(layer, kv_head) the kept RoPE pairs; q/k rows follow.

    qk_keep / v_keep / ffn_keep: features dropped from the end (0 keeps the function exactly).
    """
    adapter = get_adapter(model.config)
    config = model.config
    hd, n_kv = adapter.head_dim, config.num_key_value_heads
    group = config.num_attention_heads // n_kv
    qk_dims, v_dims, ffn_dims, index = [], [], [], []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        pairs = [pairs_of(i, g)[: hd // 2 - qk_keep // 2] for g in range(n_kv)]  # type: ignore[operator]
        rows = rope_rows(pairs, hd)
        kv_rows = (rows + torch.arange(n_kv)[:, None] * hd).flatten()
        q_rows = (rows.repeat_interleave(group, 0) + torch.arange(config.num_attention_heads)[:, None] * hd).flatten()
        attn = layer.self_attn
        v_rows = (torch.arange(hd - v_keep)[None, :] + torch.arange(n_kv)[:, None] * hd).flatten()
        o_cols = (torch.arange(hd - v_keep)[None, :] + torch.arange(config.num_attention_heads)[:, None] * hd).flatten()
        weights = {"q_proj.weight": attn.q_proj.weight[q_rows], "k_proj.weight": attn.k_proj.weight[kv_rows],
                   "v_proj.weight": attn.v_proj.weight[v_rows], "o_proj.weight": attn.o_proj.weight[:, o_cols]}
        for name, rows_ in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", v_rows)):
            if getattr(attn, name).bias is not None:
                weights[f"{name}.bias"] = getattr(attn, name).bias[rows_]
        if attn.o_proj.bias is not None:
            weights["o_proj.bias"] = attn.o_proj.bias
        replace_attention(layer, config, i, pairs, {k: w.detach() for k, w in weights.items()})
        ffn = adapter.mlp_output(layer).in_features - ffn_keep
        shape_layer(layer, config, i, (rows.shape[1], hd - v_keep, ffn, pairs))
        qk_dims.append(rows.shape[1])
        v_dims.append(hd - v_keep)
        ffn_dims.append(ffn)
        index.append(pairs)
    adopt_modegpt_config(model, modegpt_config_from(config, qk_dims, v_dims, ffn_dims, index))


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_every_pair_kept_in_order_keeps_the_logits(family: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = make_model(family)
    dense = copy.deepcopy(model)
    hd = get_adapter(model.config).head_dim
    _convert(model, lambda i, g: list(range(hd // 2)))
    x = probe()
    assert isinstance(model.model.layers[0].self_attn, ModeGPTAttention)
    assert _close(model(x).logits, dense(x).logits)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__.startswith("ModeGPT")
    assert torch.equal(reloaded(x).logits, model(x).logits)


@pytest.mark.parametrize("family", ["llama", "llama-gqa", "qwen2"])
def test_a_permuted_rope_index_keeps_the_logits(family: str) -> None:
    """Every pair kept in another order per KV head, the q/k rows permuted alike: the same function."""
    model = make_model(family)
    dense = copy.deepcopy(model)
    hd = get_adapter(model.config).head_dim
    _convert(model, lambda i, g: torch.randperm(hd // 2, generator=torch.Generator().manual_seed(10 * i + g)).tolist())
    assert model.config.rope_index[0][0] != list(range(hd // 2))
    x = probe()
    assert _close(model(x).logits, dense(x).logits)


@pytest.mark.parametrize("family", LLAMA_LIKE)
def test_smaller_dims_save_reload_and_generate(family: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = make_model(family)
    hd = get_adapter(model.config).head_dim
    _convert(model, lambda i, g: list(range(hd // 2))[::-1] if g % 2 else list(range(hd // 2)), qk_keep=4,
             v_keep=3, ffn_keep=10)
    layer = model.model.layers[1]
    assert (layer.self_attn.qk_dim, layer.self_attn.v_dim, layer.mlp.down_proj.in_features) == (hd - 4, hd - 3, 86)
    x = probe()
    logits = model(x).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.qk_dims == [hd - 4] * 3 and reloaded.config.rope_index == model.config.rope_index
    assert torch.equal(reloaded(x).logits, logits)
    prompt = calibration(1, 8)
    cached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
