"""Models pruned by slimgpt, loadable with plain transformers (``trust_remote_code=True``).

Written by ``slimgpt export --format remote-code``; imports only torch and transformers. Each class is
the stock model of its family; only ``__init__`` differs: after the stock layers are built, every
decoder layer's projections are rebuilt at that layer's width (heads, key/value heads, FFN channels,
from the config) and its attention module is told its head counts. The stock forward then runs
unchanged, which is why the logits equal those of the model slimgpt itself loads.

Not covered: a layer with no attention heads or no FFN channels (the stock attention cannot reshape
zero heads); slimgpt never produces one, and its GGUF and padded exports handle them.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, OPTForCausalLM, Qwen2ForCausalLM

from .configuration_slimgpt import SlimLlamaConfig, SlimMistralConfig, SlimOPTConfig, SlimQwen2Config

# Attribute paths of one decoder layer's projections: query, key, value, attention output, FFN output;
# and the FFN inputs (fed by the layer's hidden state).
LLAMA_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "ffn_out": "mlp.down_proj"}
LLAMA_FFN_IN = ("mlp.gate_proj", "mlp.up_proj")
OPT_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
             "ffn_out": "fc2"}
OPT_FFN_IN = ("fc1",)


def layer_widths(config: Any) -> list[tuple[int, int, int]]:
    """(query heads, key/value heads, FFN channels) of each decoder layer."""
    n = config.num_hidden_layers
    heads = getattr(config, "layer_num_attention_heads", None) or [config.num_attention_heads] * n
    kv_default = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_heads = getattr(config, "layer_num_key_value_heads", None) or [kv_default] * n
    ffn_default = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
    ffn = getattr(config, "layer_intermediate_sizes", None) or [ffn_default] * n
    if not len(heads) == len(kv_heads) == len(ffn) == n:
        raise ValueError(f"per-layer widths must list {n} layers: got {len(heads)}, {len(kv_heads)}, {len(ffn)}")
    return [(int(h), int(k), int(f)) for h, k, f in zip(heads, kv_heads, ffn, strict=True)]


def _rebuilt(layer: nn.Module, path: str, in_features: int, out_features: int, bias: bool) -> None:
    """Replace the Linear at ``path`` by one of the given shape (weights are loaded afterwards)."""
    parent_path, _, name = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    old = getattr(parent, name)
    new = nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)
    setattr(parent, name, new)


def apply_layer_widths(model: Any) -> None:
    """Shape every decoder layer of a freshly built stock model to the config's per-layer widths."""
    config = model.config
    is_opt = config.model_type.endswith("opt")
    paths, ffn_in = (OPT_PATHS, OPT_FFN_IN) if is_opt else (LLAMA_PATHS, LLAMA_FFN_IN)
    output_bias = bool(getattr(config, "layer_output_bias", False))
    for index, (layer, (heads, kv_heads, ffn)) in enumerate(
            zip(model.get_decoder().layers, layer_widths(config), strict=True)):
        if heads < 1 or kv_heads < 1 or ffn < 1 or heads % kv_heads:
            raise ValueError(f"layer {index}: {heads} heads, {kv_heads} key/value heads and {ffn} FFN channels "
                             "cannot be built by the stock attention and FFN")
        attn = layer.self_attn
        head_dim = attn.head_dim
        hidden = config.hidden_size
        q = layer.get_submodule(paths["q"])
        k = layer.get_submodule(paths["k"])
        v = layer.get_submodule(paths["v"])
        o = layer.get_submodule(paths["o"])
        out = layer.get_submodule(paths["ffn_out"])
        _rebuilt(layer, paths["q"], hidden, heads * head_dim, q.bias is not None)
        _rebuilt(layer, paths["k"], hidden, kv_heads * head_dim, k.bias is not None)
        _rebuilt(layer, paths["v"], hidden, kv_heads * head_dim, v.bias is not None)
        _rebuilt(layer, paths["o"], heads * head_dim, hidden, o.bias is not None or output_bias)
        for path in ffn_in:
            _rebuilt(layer, path, hidden, ffn, layer.get_submodule(path).bias is not None)
        _rebuilt(layer, paths["ffn_out"], ffn, hidden, out.bias is not None or output_bias)
        # The attention forward reshapes with these (grouped-query repeat factor; OPT's head count).
        attn.num_key_value_groups = heads // kv_heads
        for name, value in (("num_heads", heads), ("num_key_value_heads", kv_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)


class SlimLlamaForCausalLM(LlamaForCausalLM):
    config_class = SlimLlamaConfig

    def __init__(self, config: SlimLlamaConfig) -> None:
        super().__init__(config)
        apply_layer_widths(self)
        self.post_init()


class SlimMistralForCausalLM(MistralForCausalLM):
    config_class = SlimMistralConfig

    def __init__(self, config: SlimMistralConfig) -> None:
        super().__init__(config)
        apply_layer_widths(self)
        self.post_init()


class SlimQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = SlimQwen2Config

    def __init__(self, config: SlimQwen2Config) -> None:
        super().__init__(config)
        apply_layer_widths(self)
        self.post_init()


class SlimOPTForCausalLM(OPTForCausalLM):
    config_class = SlimOPTConfig

    def __init__(self, config: SlimOPTConfig) -> None:
        super().__init__(config)
        apply_layer_widths(self)
        self.post_init()
