"""Models whose decoder layers each have their own head count, KV-head count and FFN width.

A stock transformers config cannot describe per-layer widths, so a pruned model is saved with
``model_type = "slimgpt_<family>"``: the family's config plus three per-layer lists. Importing slimgpt
registers these types with ``AutoConfig`` / ``AutoModelForCausalLM``, so ``from_pretrained`` works on a
pruned directory. The model classes are the stock ones; only ``__init__`` differs: it builds every
layer at its own size, then the stock forward runs unchanged (no copied forward code).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from slimgpt._util.dtypes import parse_dtype
from slimgpt.errors import SlimGPTError
from slimgpt.models.adapters import LayerSizes
from slimgpt.models.families import FAMILIES, Family, family_row, get_adapter
from slimgpt.models.gguf import load_gguf
from slimgpt.models.sliced import apply_slice_dims
from slimgpt.models.smollm2 import NAME as SMOLLM2
from slimgpt.models.smollm2 import smollm2_folder

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("tiny-mha", "tiny-gqa")


class SlimConfigMixin:
    """Per-layer widths. Each list has one entry per decoder layer; None means the stock width.

    layer_output_bias: every decoder layer's attention output (o_proj) and FFN output (down_proj) has
    a bias, even where the family has none (LLaMA): FLAP's compensation stores the mean contribution
    of the removed channels there.
    slice_dims: the residual-stream widths of a SliceGPT-sliced model (slimgpt.models.sliced), or None.
    """

    layer_num_attention_heads: list[int] | None
    layer_num_key_value_heads: list[int] | None
    layer_intermediate_sizes: list[int] | None
    layer_output_bias: bool
    slice_dims: list[int] | None

    def layer_sizes(self) -> list[LayerSizes]:
        cfg: Any = self
        n = cfg.num_hidden_layers
        heads = cfg.layer_num_attention_heads or [cfg.num_attention_heads] * n
        kv_default = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        kv = cfg.layer_num_key_value_heads or [kv_default] * n
        ffn_default = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None)
        ffn = cfg.layer_intermediate_sizes or [ffn_default] * n
        return [LayerSizes(int(h), int(k), int(f)) for h, k, f in zip(heads, kv, ffn, strict=True)]


class _SlimModelMixin:
    """Builds the stock model, then shapes each decoder layer to the config's per-layer sizes."""

    def _apply_layer_sizes(self) -> None:
        model: Any = self
        adapter = get_adapter(model.config)
        for layer, sizes in zip(adapter.decoder_layers(model), model.config.layer_sizes(), strict=True):
            if adapter.layer_sizes(layer) != sizes:
                adapter.resize_layer(layer, sizes)
            if getattr(model.config, "layer_output_bias", False):
                for linear in (adapter.attn_output(layer), adapter.mlp_output(layer)):
                    add_zero_bias(linear)
        if getattr(model.config, "slice_dims", None):
            apply_slice_dims(model, list(model.config.slice_dims))


def add_zero_bias(linear: torch.nn.Linear) -> None:
    """Give ``linear`` an output bias of zeros if it has none (changes no output)."""
    if linear.bias is None:
        linear.bias = torch.nn.Parameter(
            torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device),
            requires_grad=linear.weight.requires_grad,
        )


def _make_family(family: Family) -> tuple[Any, Any]:
    """The ``slimgpt_<family>`` config and model classes: the stock ones with per-layer sizes."""
    base_config, base_model = family.config_class, family.model_class
    model_type = family.slim_model_type
    namespace: dict[str, Any] = {
        "model_type": model_type,
        "__annotations__": {
            "layer_num_attention_heads": list[int] | None,
            "layer_num_key_value_heads": list[int] | None,
            "layer_intermediate_sizes": list[int] | None,
            "layer_output_bias": bool,
            "slice_dims": list[int] | None,
        },
        "layer_num_attention_heads": None,
        "layer_num_key_value_heads": None,
        "layer_intermediate_sizes": None,
        "layer_output_bias": False,
        "slice_dims": None,
        "__module__": __name__,
    }
    config_name, model_name = family.slim_class_names
    config_cls: Any = strict(type(config_name, (SlimConfigMixin, base_config), namespace))

    def __init__(self: Any, config: Any) -> None:
        base_model.__init__(self, config)
        self._apply_layer_sizes()
        self.post_init()

    model_cls = type(
        model_name, (_SlimModelMixin, base_model),
        {"config_class": config_cls, "__init__": __init__, "__module__": __name__},
    )
    return config_cls, model_cls


SLIM_CLASSES: dict[str, tuple[Any, Any]] = {name: _make_family(row) for name, row in FAMILIES.items()}

for _config_cls, _model_cls in SLIM_CLASSES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)


def slim_config_from(config: PretrainedConfig, sizes: list[LayerSizes], output_bias: bool = False,
                     slice_dims: list[int] | None = None) -> PretrainedConfig:
    """The ``slimgpt_<family>`` config describing ``config``'s model with per-layer ``sizes``.

    output_bias: the layers' o_proj / down_proj carry a bias (``layer_output_bias``).
    slice_dims: the model was sliced by SliceGPT (slimgpt.models.sliced); its embeddings are no longer tied.
    """
    family = family_row(config.model_type)
    config_cls, _ = SLIM_CLASSES[family.model_type]
    values = base_config_values(config)
    values.update(
        layer_num_attention_heads=[s.n_heads for s in sizes],
        layer_num_key_value_heads=[s.n_kv_heads for s in sizes],
        layer_intermediate_sizes=[s.ffn_dim for s in sizes],
        layer_output_bias=bool(output_bias),
        slice_dims=list(slice_dims) if slice_dims else None,
    )
    if slice_dims:
        values["tie_word_embeddings"] = False
    if family.head_dim_key:
        values["head_dim"] = get_adapter(config).head_dim
    slim = config_cls(**values)
    slim._attn_implementation = getattr(config, "_attn_implementation", None)
    return slim


def base_config_values(config: PretrainedConfig) -> dict[str, Any]:
    """``config``'s values without the keys a derived config class sets itself (type, architectures, ...)."""
    values = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        values.pop(key, None)
    return values


def adopt_config(model: Any, config: PretrainedConfig, model_class: type) -> None:
    """Give ``model`` (and every submodule sharing its config) ``config`` and the class ``model_class``."""
    old = model.config
    for module in model.modules():
        if getattr(module, "config", None) is old:
            module.config = config
    model.__class__ = model_class


def adopt_slim_config(model: Any, slim: PretrainedConfig) -> None:
    """Give ``model`` (and every submodule sharing its config) the ``slimgpt_<family>`` config and class."""
    adopt_config(model, slim, SLIM_CLASSES[family_row(slim.model_type).model_type][1])


def builtin_model_path(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("slimgpt") / "assets" / "models" / name))


def resolve_model_path(name_or_path: str) -> str:
    """A built-in name (``tiny-mha``, ``tiny-gqa``) becomes its shipped folder; anything else is kept."""
    if name_or_path == SMOLLM2:  # the real built-in model, converted once from its wheel
        return str(smollm2_folder())
    if name_or_path in BUILTIN_MODELS:
        path = builtin_model_path(name_or_path)
        if not (path / "config.json").exists():
            raise SlimGPTError(f"built-in model {name_or_path!r} is missing from {path}: reinstall slimgpt")
        return str(path)
    return name_or_path


def load_model(name_or_path: str, *, dtype: torch.dtype | str | None = None, device: str = "cpu",
               trust_remote_code: bool = False, attn_implementation: str | None = None) -> tuple[Any, Any]:
    """Load a dense or pruned causal LM and its tokenizer: a built-in name, a Hub id or a local folder.

    ``dtype`` None keeps the checkpoint's dtype ("auto"). Safetensors only; no remote code unless asked.
    """
    path = resolve_model_path(name_or_path)
    dtype = parse_dtype(dtype)
    if path.lower().endswith(".gguf"):  # a GGUF file (llama.cpp, Ollama), dequantised (slimgpt.models.gguf)
        return load_gguf(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise SlimGPTError(
            f"cannot load model {name_or_path!r}: not a local folder with config.json and not reachable on the "
            f"Hub ({str(error).splitlines()[0]}); pass a local path or a cached Hub id"
        ) from None
    get_adapter(config)  # unsupported families fail here, before the weights are read
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto", "use_safetensors": True,
                              "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model: Any = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer


def load_pruned(path: str | Path, **kwargs: Any) -> tuple[Any, Any]:
    """Load a model saved by ``slimgpt prune`` (or any model): ``(model, tokenizer)``."""
    return load_model(str(path), **kwargs)
