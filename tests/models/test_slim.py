"""slimgpt.models.slim: per-layer-width models describe, save and reload exactly; load_model's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import FAMILIES, make_model, probe
from slimgpt.errors import SlimGPTError, UnsupportedModelError
from slimgpt.models.adapters import LayerSizes
from slimgpt.models.families import get_adapter
from slimgpt.models.slim import adopt_slim_config, load_model, slim_config_from


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_sizes_save_and_reload(family: str, tmp_path: Path) -> None:
    model = make_model(family)
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    full = adapter.layer_sizes(layers[0])
    group = full.n_heads // full.n_kv_heads
    keep = torch.arange(full.n_heads - group)  # one KV group (or head) fewer in layer 1
    adapter.shrink_layer(layers[1], keep, torch.arange(full.ffn_dim // 2))
    sizes = [adapter.layer_sizes(layer) for layer in layers]
    adopt_slim_config(model, slim_config_from(model.config, sizes))
    assert model.config.model_type == f"slimgpt_{family.removesuffix('-gqa')}"
    assert model.config.layer_sizes() == sizes
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).layer_sizes() == sizes
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = probe()
    expected, got = model(ids).logits, reloaded(ids).logits
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert sizes[1] == LayerSizes(full.n_heads - group, full.n_kv_heads - 1, full.ffn_dim // 2)


def test_load_model_errors(tmp_path: Path) -> None:
    with pytest.raises(SlimGPTError, match="cannot load model"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UnsupportedModelError, match="is not supported"):
        load_model(str(tmp_path))


def test_a_built_in_model_loads() -> None:
    model, tokenizer = load_model("tiny-mha", dtype="float32")
    assert model.config.num_hidden_layers > 0 and tokenizer is not None
    assert next(model.parameters()).dtype == torch.float32
