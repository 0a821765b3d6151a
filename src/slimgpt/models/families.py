"""One row per supported ``model_type``: everything family-specific outside the adapters' surgery.

Adding a family is one ``Family`` row here (plus an adapter class where the family is not LLaMA-like);
the slim model classes, the exporters and the contract tests read these rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from slimgpt.errors import UnsupportedModelError
from slimgpt.models.adapters import LlamaLikeAdapter, ModelAdapter, OPTAdapter

# Names of one decoder layer's tensors, relative to its prefix, by role.
LLAMA_NAMES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
OPT_NAMES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
    "up": "fc1", "down": "fc2", "attn_norm": "self_attn_layer_norm", "ffn_norm": "final_layer_norm",
}


@dataclass(frozen=True)
class StockBiases:
    """Which bias groups a stock config of the family builds: q/k/v, attention output, FFN inputs, FFN output.

    fixed: the stock class always builds exactly these groups (Qwen2: q/k/v only; Mistral: none); None
    where config keys switch them. switches: the config key that switches each group (LLaMA:
    ``attention_bias`` twice, ``mlp_bias`` twice; OPT: ``enable_bias`` for all four), and
    switch_default its value when the config omits it. fallback: the family whose config is the same
    network with switchable biases when no sliding window is in effect; a model whose biases a fixed
    layout cannot hold is exported as that family (slimgpt.export.padded).
    """

    fixed: tuple[bool, bool, bool, bool] | None = None
    switches: tuple[str, str, str, str] = ("", "", "", "")
    switch_default: bool = False
    fallback: str | None = None


@dataclass(frozen=True)
class Family:
    """What slimgpt needs to know about one Hugging Face model family.

    label: the family's name in messages. tensor_names: a decoder layer's tensors by role, relative to
    ``layer_prefix.format(index)``. ffn_size_key: the config key of the FFN width. head_dim_key: the
    config has a ``head_dim`` field. kv_heads_key: the config has ``num_key_value_heads`` (GQA).
    llama_like: pre-norm RMSNorm, rotary, gated SiLU FFN (llama.cpp's deci architecture can hold it,
    so the GGUF export accepts it). ffn_input_roles: the tensor roles that read the FFN's input (gate
    and up, or fc1). window_by_default: a sliding window applies when the config has no
    ``use_sliding_window`` key (Mistral). biases: what the stock config can hold (StockBiases).
    """

    model_type: str
    label: str
    adapter: type[ModelAdapter]
    config_class: Any
    model_class: Any
    stock_architecture: str
    tensor_names: dict[str, str]
    layer_prefix: str
    ffn_size_key: str
    head_dim_key: bool
    llama_like: bool
    ffn_input_roles: tuple[str, ...]
    kv_heads_key: bool = True
    window_by_default: bool = False
    biases: StockBiases = StockBiases()

    @property
    def slim_model_type(self) -> str:
        return f"slimgpt_{self.model_type}"

    @property
    def slim_class_names(self) -> tuple[str, str]:
        """The names of the per-layer-width config and model classes (slimgpt.models.slim, remote code)."""
        return f"Slim{self.config_class.__name__}", f"Slim{self.model_class.__name__}"


def _llama_like(model_type: str, label: str, config_class: Any, model_class: Any, **facts: Any) -> Family:
    return Family(model_type, label, LlamaLikeAdapter, config_class, model_class, model_class.__name__,
                  LLAMA_NAMES, "model.layers.{}.", "intermediate_size", True, True, ("gate", "up"), **facts)


FAMILIES: dict[str, Family] = {
    "llama": _llama_like("llama", "LLaMA", LlamaConfig, LlamaForCausalLM, biases=StockBiases(
        switches=("attention_bias", "attention_bias", "mlp_bias", "mlp_bias"))),
    "mistral": _llama_like("mistral", "Mistral", MistralConfig, MistralForCausalLM, window_by_default=True,
                           biases=StockBiases(fixed=(False, False, False, False), fallback="llama")),
    "qwen2": _llama_like("qwen2", "Qwen2", Qwen2Config, Qwen2ForCausalLM,
                         biases=StockBiases(fixed=(True, False, False, False), fallback="llama")),
    "opt": Family("opt", "OPT", OPTAdapter, OPTConfig, OPTForCausalLM, "OPTForCausalLM", OPT_NAMES,
                  "model.decoder.layers.{}.", "ffn_dim", False, False, ("up",), kv_heads_key=False,
                  biases=StockBiases(switches=("enable_bias",) * 4, switch_default=True)),
}


def base_model_type(model_type: str) -> str:
    """The family of a model type: ``slimgpt_<type>``, ``slimgpt_modegpt_<type>`` and ``slimgpt_disp_<type>`` map
    to ``<type>``."""
    return model_type.removeprefix("slimgpt_").removeprefix("modegpt_").removeprefix("disp_")


def family_row(model_type: str) -> Family:
    """The row of ``model_type`` (a pruned ``slimgpt_<type>`` maps to its base family)."""
    family = base_model_type(model_type or "")
    if family not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {family!r} is not supported: slimgpt prunes {', '.join(sorted(FAMILIES))}; "
            "adding a family is one Family row in slimgpt/models/families.py"
        )
    return FAMILIES[family]


def get_adapter(config: Any) -> ModelAdapter:
    """The adapter for ``config.model_type`` (a pruned ``slimgpt_<type>`` maps to its base family)."""
    return family_row(getattr(config, "model_type", "") or "").adapter(config)


def stock_llama_like_adapter(model: Any, method: str, needs: str) -> ModelAdapter:
    """The adapter of a stock (not yet pruned) LLaMA-like model, for a method that needs one (``needs``: what
    it relies on, for the message); anything else is refused with one line."""
    config: Any = model.config
    family = family_row(config.model_type)
    if not family.llama_like:
        raise UnsupportedModelError(f"--method {method} needs a LLaMA-like model ({needs}); {family.label} is not: "
                                    "use another method for it")
    if config.model_type != family.model_type:
        raise UnsupportedModelError(f"--method {method} prunes a stock {family.label} model; this one "
                                    f"({config.model_type}) was already pruned by slimgpt")
    return get_adapter(config)
