"""Models pruned by DISP-LLM (slimgpt.methods.disp_llm): per-block gather/scatter indices of the residual stream.

The residual stream and the embeddings stay ``hidden_size`` wide and every head keeps its ``head_dim``; each
decoder block reads and writes its own subset of the residual dimensions, independent of every other
block's. Per layer, ``disp_index[l]`` holds five sorted index lists:

- ``attn_in`` (S1): the residual dims q/k/v read from the normed residual (their kept input columns);
- ``attn_out`` (S2): the residual dims o_proj writes back (its kept output rows);
- ``mlp_in`` (S3): the dims gate/up read; ``mlp_mid`` (S4): the kept FFN channels (indices into the dense
  FFN, for the record: the saved model has ``len(S4)`` channels); ``mlp_out`` (S5): the dims down_proj
  writes back.

The forward of a block is the stock one: ``x~ = norm(x)`` over the full width, the attention (MLP) module
gathers ``x~[..., S_in]``, runs its stock forward on it, and scatters its output into a zero residual-wide
tensor at ``S_out`` (the stock ``x + y`` then adds it: ``x.index_add(-1, S_out, y)``). A pruned model is
saved with ``model_type = "slimgpt_disp_<family>"``; importing slimgpt registers those types with
``AutoConfig`` / ``AutoModelForCausalLM``. LLaMA-like families only.
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from slimgpt.models.adapters import slice_linear
from slimgpt.models.families import FAMILIES, Family, family_row, get_adapter
from slimgpt.models.slim import adopt_config, base_config_values

SETS = ("attn_in", "attn_out", "mlp_in", "mlp_mid", "mlp_out")


class DispConfigMixin:
    """The per-block index sets of a DISP-LLM model; one ``[S1, S2, S3, S4, S5]`` entry per decoder layer."""

    disp_index: list[list[list[int]]] | None

    def disp_layer(self, index: int) -> dict[str, list[int]]:
        """Layer ``index``'s five index sets by name (``SETS``); all dims kept when the config has none."""
        cfg: Any = self
        if cfg.disp_index:
            return {name: [int(i) for i in values] for name, values in zip(SETS, cfg.disp_index[index], strict=True)}
        d, ffn = int(cfg.hidden_size), int(cfg.intermediate_size)
        return {name: list(range(ffn if name == "mlp_mid" else d)) for name in SETS}


class GatherScatter:
    """Mixed into a block's attention or MLP module: read ``disp_in`` of the residual, write ``disp_out``.

    ``disp_in`` / ``disp_out`` are plain lists (config, not weights: they survive loading on the meta
    device); their index tensors are built on first use on the device of the input.
    """

    disp_in: list[int]
    disp_out: list[int]
    disp_width: int
    disp_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]]

    def disp_indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self.disp_cache:
            self.disp_cache[device] = (torch.tensor(self.disp_in, dtype=torch.long, device=device),
                                       torch.tensor(self.disp_out, dtype=torch.long, device=device))
        return self.disp_cache[device]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        read, write = self.disp_indices(hidden.device)
        gathered = hidden.index_select(-1, read)
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = gathered
        else:
            args = (gathered, *args[1:])
        out = super().forward(*args, **kwargs)  # type: ignore[misc]
        first = out[0] if isinstance(out, tuple) else out
        scattered = first.new_zeros((*first.shape[:-1], self.disp_width)).index_copy(-1, write, first)
        return (scattered, *out[1:]) if isinstance(out, tuple) else scattered


_GATHERED: dict[type, type] = {}


def gathered_class(cls: type) -> type:
    """``cls`` with ``GatherScatter`` in front (one class per stock module class)."""
    if issubclass(cls, GatherScatter):
        return cls
    if cls not in _GATHERED:
        _GATHERED[cls] = type(f"Disp{cls.__name__}", (GatherScatter, cls), {"__module__": __name__})
    return _GATHERED[cls]


def make_gathered(module: nn.Module, read: list[int], write: list[int], width: int) -> None:
    """Turn ``module`` (a block's attention or MLP) into its gather/scatter form in place."""
    module.__class__ = gathered_class(type(module))
    gathered: Any = module
    gathered.disp_in, gathered.disp_out, gathered.disp_width = list(read), list(write), int(width)
    gathered.disp_cache = {}


def shape_layer(layer: Any, config: Any, sets: dict[str, list[int]], weights_follow: bool = True) -> None:
    """Give a decoder layer DISP-LLM's structure ``sets`` (slicing its linears by the index sets).

    weights_follow: the layer is freshly built and its weights are loaded afterwards (index order does not
    matter); False slices the dense layer's own weights (the export of a trained mask).
    """
    adapter = get_adapter(config)
    paths = adapter.linear_paths()
    d = int(config.hidden_size)

    def index(name: str) -> torch.Tensor:
        values = sets[name]
        return torch.arange(len(values)) if weights_follow else torch.tensor(values, dtype=torch.long)

    for role in ("q", "k", "v"):
        adapter.set_linear(layer, paths[role], slice_linear(layer.get_submodule(paths[role]),
                                                            in_index=index("attn_in")))
    adapter.set_linear(layer, paths["o"], slice_linear(layer.get_submodule(paths["o"]), out_index=index("attn_out")))
    for path in paths["mlp_in"].split(","):
        adapter.set_linear(layer, path, slice_linear(layer.get_submodule(path), in_index=index("mlp_in"),
                                                     out_index=index("mlp_mid")))
    adapter.set_linear(layer, paths["mlp_out"], slice_linear(layer.get_submodule(paths["mlp_out"]),
                                                             in_index=index("mlp_mid"), out_index=index("mlp_out")))
    make_gathered(adapter.attention(layer), sets["attn_in"], sets["attn_out"], d)
    make_gathered(layer.mlp, sets["mlp_in"], sets["mlp_out"], d)


def _make_family(family: Family) -> tuple[Any, Any]:
    """The ``slimgpt_disp_<family>`` config and model classes."""
    base_config, base_model = family.config_class, family.model_class
    namespace: dict[str, Any] = {
        "model_type": f"slimgpt_disp_{family.model_type}",
        "__annotations__": {"disp_index": list[list[list[int]]] | None},
        "disp_index": None,
        "__module__": __name__,
    }
    config_cls: Any = strict(type(f"Disp{base_config.__name__}", (DispConfigMixin, base_config), namespace))

    def __init__(self: Any, config: Any) -> None:
        base_model.__init__(self, config)
        for index, layer in enumerate(get_adapter(config).decoder_layers(self)):
            shape_layer(layer, config, config.disp_layer(index))
        self.post_init()

    model_cls = type(f"Disp{base_model.__name__}", (base_model,),
                     {"config_class": config_cls, "__init__": __init__, "__module__": __name__})
    return config_cls, model_cls


DISP_CLASSES: dict[str, tuple[Any, Any]] = {name: _make_family(row) for name, row in FAMILIES.items() if row.llama_like}

for _config_cls, _model_cls in DISP_CLASSES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls, exist_ok=True)
    AutoModelForCausalLM.register(_config_cls, _model_cls, exist_ok=True)


def disp_config_from(config: PretrainedConfig, index: list[dict[str, list[int]]]) -> PretrainedConfig:
    """The ``slimgpt_disp_<family>`` config of ``config``'s model with these per-layer index sets."""
    family = family_row(config.model_type)
    config_cls, _ = DISP_CLASSES[family.model_type]
    values = base_config_values(config)
    values.update(disp_index=[[sorted(int(i) for i in layer[name]) for name in SETS] for layer in index],
                  head_dim=get_adapter(config).head_dim)
    disp = config_cls(**values)
    disp._attn_implementation = getattr(config, "_attn_implementation", None)
    return disp


def export_disp(model: Any, index: list[dict[str, list[int]]]) -> None:
    """Slice ``model`` (dense, LLaMA-like) to the index sets and give it the ``slimgpt_disp_<family>`` class."""
    config = disp_config_from(model.config, index)
    adapter = get_adapter(model.config)
    for layer_index, layer in enumerate(adapter.decoder_layers(model)):
        shape_layer(layer, config, config.disp_layer(layer_index), weights_follow=False)
    adopt_config(model, config, DISP_CLASSES[family_row(config.model_type).model_type][1])
