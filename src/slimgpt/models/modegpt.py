"""Models pruned by MoDeGPT (slimgpt.methods.modegpt): per-layer q/k head dims, v head dims and a RoPE index.

MoDeGPT keeps every head but shrinks them: a layer's query and key heads keep ``qk_dims[l]`` of their
``head_dim`` features (whole RoPE pairs, chosen per KV head), its value heads ``v_dims[l]`` (the rank of
the V/O decomposition), its FFN ``layer_intermediate_sizes[l]`` channels. ``rope_index[l][g]`` lists the
RoPE pair indices kept by KV head g (and its query heads), in the order of the rows of q_proj / k_proj:
the head's features are [P, P + head_dim / 2], so rotate_half on the kept features pairs them as the dense
head did and each takes its own frequency. No stock transformers class holds this, so a pruned model is
saved with ``model_type = "slimgpt_modegpt_<family>"``; importing slimgpt registers those types with
``AutoConfig`` / ``AutoModelForCausalLM``. The model classes are the stock ones with ``ModeGPTAttention``
in every layer and per-layer FFN widths; the rest of the forward (masks, rotary tables, cache) is stock.
LLaMA-like families only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half

from slimgpt.models.adapters import slice_linear
from slimgpt.models.families import FAMILIES, Family, family_row, get_adapter
from slimgpt.models.slim import adopt_config, base_config_values


class ModeGPTConfigMixin:
    """Per-layer widths of a MoDeGPT model; one entry per decoder layer (None: the stock width)."""

    layer_intermediate_sizes: list[int] | None
    qk_dims: list[int] | None
    v_dims: list[int] | None
    rope_index: list[list[list[int]]] | None

    def modegpt_layer(self, index: int) -> tuple[int, int, int, list[list[int]]]:
        """(q/k head dim, v head dim, FFN width, kept RoPE pairs per KV head) of layer ``index``."""
        cfg: Any = self
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        qk = int(cfg.qk_dims[index]) if cfg.qk_dims else head_dim
        v = int(cfg.v_dims[index]) if cfg.v_dims else head_dim
        ffn = int(cfg.layer_intermediate_sizes[index]) if cfg.layer_intermediate_sizes else int(cfg.intermediate_size)
        pairs = cfg.rope_index[index] if cfg.rope_index else [list(range(head_dim // 2))] * n_kv
        return qk, v, ffn, [list(map(int, p)) for p in pairs]


def rope_rows(pairs: list[list[int]], head_dim: int) -> torch.Tensor:
    """Per KV head, the dense head features its kept features come from: [P, P + head_dim / 2]."""
    index = torch.tensor(pairs, dtype=torch.long, device="cpu").view(len(pairs), -1)
    return torch.cat([index, index + head_dim // 2], dim=1)


class ModeGPTAttention(nn.Module):
    """Attention whose q/k heads have ``qk_dim`` features at RoPE frequencies ``rope_index`` and whose v heads
    have ``v_dim`` features. Same scaling (1 / sqrt(head_dim)), masks and cache as the stock attention."""

    def __init__(self, config: Any, layer_idx: int, qk_dim: int, v_dim: int, pairs: list[list[int]],
                 biases: tuple[bool, bool, bool, bool], sliding_window: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self.num_heads = int(config.num_attention_heads)
        self.num_key_value_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.qk_dim, self.v_dim = qk_dim, v_dim
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = float(getattr(config, "attention_dropout", 0.0))
        self.is_causal = True
        self.sliding_window = sliding_window
        d = int(config.hidden_size)
        q_bias, k_bias, v_bias, o_bias = biases
        self.q_proj = nn.Linear(d, self.num_heads * qk_dim, bias=q_bias)
        self.k_proj = nn.Linear(d, self.num_key_value_heads * qk_dim, bias=k_bias)
        self.v_proj = nn.Linear(d, self.num_key_value_heads * v_dim, bias=v_bias)
        self.o_proj = nn.Linear(self.num_heads * v_dim, d, bias=o_bias)
        self.rope_pairs = [list(map(int, p)) for p in pairs]
        if len(pairs) != self.num_key_value_heads or any(2 * len(p) != qk_dim for p in pairs):
            raise ValueError(f"layer {layer_idx}: rope_index must keep {qk_dim // 2} pairs for each of "
                             f"{self.num_key_value_heads} KV heads")
        # Built on first use on the device of the rotary tables: a plain list survives loading on the meta
        # device, where a buffer would not (it is config, not weights).
        self._rows: dict[torch.device, torch.Tensor] = {}

    def rope_rows(self, device: torch.device) -> torch.Tensor:
        """The dense head features of each KV head's kept features [n_kv, qk_dim], on ``device``."""
        if device not in self._rows:
            self._rows[device] = rope_rows(self.rope_pairs, self.head_dim).to(device)
        return self._rows[device]

    def _rotate(self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """RoPE on [B, heads, S, qk] with each head's frequencies ``rows`` [heads, qk] of cos/sin [B, S, head_dim]."""
        cos_h = cos[:, :, rows].permute(0, 2, 1, 3)  # [B, heads, S, qk]
        sin_h = sin[:, :, rows].permute(0, 2, 1, 3)
        return states * cos_h + rotate_half(states) * sin_h

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache: Any = None, past_key_values: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = cache if cache is not None else past_key_values
        shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*shape, self.num_heads, self.qk_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(*shape, self.num_key_value_heads, self.qk_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(*shape, self.num_key_value_heads, self.v_dim).transpose(1, 2)
        cos, sin = position_embeddings
        rows = self.rope_rows(cos.device)
        query = self._rotate(query, cos, sin, rows.repeat_interleave(self.num_key_value_groups, dim=0))
        key = self._rotate(key, cos, sin, rows)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention: Callable[..., Any] = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(out.reshape(*shape, -1).contiguous()), weights


def _biases(attn: Any) -> tuple[bool, bool, bool, bool]:
    return tuple(getattr(attn, name).bias is not None for name in ("q_proj", "k_proj", "v_proj", "o_proj"))  # type: ignore[return-value]


def _sliding_window(attn: Any, config: Any) -> int | None:
    """What the stock attention passes as ``sliding_window`` (Qwen2: per layer; Mistral: the config's)."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(config, "sliding_window", None) if family_row(config.model_type).window_by_default else None


def shape_layer(layer: Any, config: Any, index: int, dims: tuple[int, int, int, list[list[int]]]) -> None:
    """Give a stock decoder layer MoDeGPT's attention and FFN width ``dims`` (weights set afterwards).

    A layer already at the stock widths with every RoPE pair kept in order stays as it is.
    """
    qk, v, ffn, pairs = dims
    adapter = get_adapter(config)
    attn = adapter.attention(layer)
    if not isinstance(attn, ModeGPTAttention):
        like = attn.q_proj.weight
        new = ModeGPTAttention(config, index, qk, v, pairs, _biases(attn), _sliding_window(attn, config))
        layer.self_attn = new.to(device=like.device, dtype=like.dtype)
    if adapter.mlp_output(layer).in_features != ffn:
        keep = torch.arange(ffn)
        paths = adapter.linear_paths()
        for path in paths["mlp_in"].split(","):
            adapter.set_linear(layer, path, slice_linear(layer.get_submodule(path), out_index=keep))
        adapter.set_linear(layer, paths["mlp_out"], slice_linear(layer.get_submodule(paths["mlp_out"]), in_index=keep))


def replace_attention(layer: Any, config: Any, index: int, pairs: list[list[int]],
                      weights: dict[str, torch.Tensor]) -> ModeGPTAttention:
    """Swap a layer's attention for a ``ModeGPTAttention`` holding ``weights`` (the q/k/v/o_proj state dict).

    Its q/k and v head dims follow from the weights' shapes; ``pairs``: the kept RoPE pairs per KV head,
    in the order of the q/k rows.
    """
    attn = layer.self_attn
    like = attn.q_proj.weight
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    qk, v = weights["q_proj.weight"].shape[0] // n_heads, weights["v_proj.weight"].shape[0] // n_kv
    new = ModeGPTAttention(config, index, qk, v, pairs, _biases(attn), _sliding_window(attn, config))
    new.load_state_dict({name: w.to(like.dtype) for name, w in weights.items()})
    layer.self_attn = new.to(device=like.device, dtype=like.dtype)
    return new


def _make_family(family: Family) -> tuple[Any, Any]:
    """The ``slimgpt_modegpt_<family>`` config and model classes."""
    base_config, base_model = family.config_class, family.model_class
    namespace: dict[str, Any] = {
        "model_type": f"slimgpt_modegpt_{family.model_type}",
        "__annotations__": {"layer_intermediate_sizes": list[int] | None, "qk_dims": list[int] | None,
                            "v_dims": list[int] | None, "rope_index": list[list[list[int]]] | None},
        "layer_intermediate_sizes": None, "qk_dims": None, "v_dims": None, "rope_index": None,
        "__module__": __name__,
    }
    config_cls: Any = strict(type(f"ModeGPT{base_config.__name__}", (ModeGPTConfigMixin, base_config), namespace))

    def __init__(self: Any, config: Any) -> None:
        base_model.__init__(self, config)
        for index, layer in enumerate(get_adapter(config).decoder_layers(self)):
            shape_layer(layer, config, index, config.modegpt_layer(index))
        self.post_init()

    model_cls = type(f"ModeGPT{base_model.__name__}", (base_model,),
                     {"config_class": config_cls, "__init__": __init__, "__module__": __name__})
    return config_cls, model_cls


MODEGPT_CLASSES: dict[str, tuple[Any, Any]] = {
    name: _make_family(row) for name, row in FAMILIES.items() if row.llama_like}

for _config_cls, _model_cls in MODEGPT_CLASSES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)


def modegpt_config_from(config: PretrainedConfig, qk_dims: list[int], v_dims: list[int], ffn_dims: list[int],
                        rope_index: list[list[list[int]]]) -> PretrainedConfig:
    """The ``slimgpt_modegpt_<family>`` config of ``config``'s model with these per-layer widths."""
    family = family_row(config.model_type)
    config_cls, _ = MODEGPT_CLASSES[family.model_type]
    values = base_config_values(config)
    values.update(layer_intermediate_sizes=list(ffn_dims), qk_dims=list(qk_dims), v_dims=list(v_dims),
                  rope_index=[[list(p) for p in layer] for layer in rope_index],
                  head_dim=get_adapter(config).head_dim)
    modegpt = config_cls(**values)
    modegpt._attn_implementation = getattr(config, "_attn_implementation", None)
    return modegpt


def adopt_modegpt_config(model: Any, config: PretrainedConfig) -> None:
    """Give ``model`` (and every submodule sharing its config) the MoDeGPT config and model class."""
    adopt_config(model, config, MODEGPT_CLASSES[family_row(config.model_type).model_type][1])
