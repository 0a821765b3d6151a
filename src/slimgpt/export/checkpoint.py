"""Reading a saved (pruned or dense) model folder as plain tensors, for the exporters.

The exporters work on the saved files, not on an instantiated model: they must handle shapes that
the slim model classes cannot build (a layer left with no heads), they never need the forward pass,
and a padded or GGUF copy of a large model should not hold two models in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from slimgpt.errors import SlimGPTError, UnsupportedModelError
from slimgpt.models.adapters import LayerSizes
from slimgpt.models.families import base_model_type

LLAMA_LIKE = ("llama", "mistral", "qwen2")
FAMILIES = (*LLAMA_LIKE, "opt")

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


@dataclass
class Checkpoint:
    """A model folder: its config.json, every tensor (by saved name), and per-layer widths."""

    directory: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    family: str  # llama | mistral | qwen2 | opt
    head_dim: int
    sizes: list[LayerSizes]

    @property
    def names(self) -> dict[str, str]:
        return OPT_NAMES if self.family == "opt" else LLAMA_NAMES

    def layer_prefix(self, index: int) -> str:
        return f"model.decoder.layers.{index}." if self.family == "opt" else f"model.layers.{index}."

    def layer_tensor(self, index: int, role: str, kind: str = "weight") -> torch.Tensor | None:
        """The ``kind`` ("weight" / "bias") tensor of ``role`` in layer ``index``; None if absent."""
        return self.tensors.get(f"{self.layer_prefix(index)}{self.names[role]}.{kind}")

    @property
    def tied_embeddings(self) -> bool:
        return "lm_head.weight" not in self.tensors or bool(self.config.get("tie_word_embeddings", False))

    @property
    def stock_sizes(self) -> LayerSizes:
        """The widths a stock config of this family would give every layer (the dense model's)."""
        cfg = self.config
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        ffn = int(cfg.get("ffn_dim") or 0) if self.family == "opt" else int(cfg["intermediate_size"])
        return LayerSizes(heads, kv, ffn)


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise SlimGPTError(f"{directory} has no config.json: pass a folder written by `slimgpt prune`")
    config: dict[str, Any] = json.loads(path.read_text())
    return config


def family_of(config: dict[str, Any]) -> str:
    family = base_model_type(str(config.get("model_type", "")))
    if family not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {config.get('model_type')!r} cannot be exported: slimgpt exports {', '.join(FAMILIES)}"
        )
    return family


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (one file or an indexed set of shards)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SlimGPTError(f"{directory} has no *.safetensors weights: slimgpt exports safetensors checkpoints only")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = handle.get_tensor(name)
    return tensors


def _layer_sizes(config: dict[str, Any], family: str, head_dim: int, tensors: dict[str, torch.Tensor],
                 prefix: str, names: dict[str, str]) -> list[LayerSizes]:
    n = int(config["num_hidden_layers"])
    sizes = []
    for i in range(n):
        layer = prefix.format(i)
        try:
            q, k = tensors[f"{layer}{names['q']}.weight"], tensors[f"{layer}{names['k']}.weight"]
            down = tensors[f"{layer}{names['down']}.weight"]
        except KeyError as error:
            raise SlimGPTError(f"layer {i} has no tensor {error.args[0]}: the folder is incomplete or not "
                               f"a {family} checkpoint") from None
        sizes.append(LayerSizes(q.shape[0] // head_dim, k.shape[0] // head_dim, down.shape[1]))
    listed = config.get("layer_num_attention_heads")
    if listed is not None:
        expected = [LayerSizes(int(h), int(k), int(f)) for h, k, f in zip(
            listed, config["layer_num_key_value_heads"], config["layer_intermediate_sizes"], strict=True)]
        if expected != sizes:
            raise SlimGPTError("the per-layer widths in config.json do not match the saved tensors: the folder "
                               "was edited or written by another tool; re-save it with `slimgpt prune`")
    return sizes


def read_checkpoint(directory: str | Path) -> Checkpoint:
    """Load a model folder (pruned ``slimgpt_<family>`` or a stock dense one) as tensors."""
    path = Path(directory)
    config = read_config(path)
    family = family_of(config)
    if family == "opt":
        head_dim = int(config["hidden_size"]) // int(config["num_attention_heads"])
        prefix, names = "model.decoder.layers.{}.", OPT_NAMES
    else:
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))
        prefix, names = "model.layers.{}.", LLAMA_NAMES
    tensors = read_tensors(path)
    sizes = _layer_sizes(config, family, head_dim, tensors, prefix, names)
    return Checkpoint(path, config, tensors, family, head_dim, sizes)


def support_files(directory: Path) -> list[Path]:
    """Files of a model folder other than weights and config: tokenizer, generation config, report."""
    skip_suffixes = (".safetensors", ".bin", ".pt", ".gguf")
    return [p for p in sorted(directory.iterdir())
            if p.is_file() and not p.name.endswith(skip_suffixes) and p.name not in ("config.json",
                                                                                    "model.safetensors.index.json")
            and not p.name.startswith(".")]
