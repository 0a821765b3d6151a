"""Reading a saved (pruned or dense) model folder as plain tensors, for the exporters.

The exporters work on the saved files, not on an instantiated model: they must handle shapes that
the slim model classes cannot build (a layer left with no heads), they never need the forward pass,
and a padded or GGUF copy of a large model should not hold two models in memory.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from slimgpt.errors import NumericalError, SlimGPTError, UnsupportedModelError
from slimgpt.models.adapters import LayerSizes
from slimgpt.models.families import FAMILIES, Family, base_model_type


@dataclass
class SavedModel:
    """A model folder: its config.json, every tensor (by saved name), and per-layer widths."""

    directory: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    family: str  # a key of slimgpt.models.families.FAMILIES
    head_dim: int
    sizes: list[LayerSizes]

    @property
    def row(self) -> Family:
        return FAMILIES[self.family]

    @property
    def names(self) -> dict[str, str]:
        return self.row.tensor_names

    def layer_prefix(self, index: int) -> str:
        return self.row.layer_prefix.format(index)

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
        ffn = int(cfg.get(self.row.ffn_size_key) or 0)
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


def _layer_sizes(config: dict[str, Any], row: Family, head_dim: int,
                 tensors: dict[str, torch.Tensor]) -> list[LayerSizes]:
    n, names = int(config["num_hidden_layers"]), row.tensor_names
    sizes = []
    for i in range(n):
        layer = row.layer_prefix.format(i)
        try:
            q, k = tensors[f"{layer}{names['q']}.weight"], tensors[f"{layer}{names['k']}.weight"]
            down = tensors[f"{layer}{names['down']}.weight"]
        except KeyError as error:
            raise SlimGPTError(f"layer {i} has no tensor {error.args[0]}: the folder is incomplete or not "
                               f"a {row.model_type} checkpoint") from None
        sizes.append(LayerSizes(q.shape[0] // head_dim, k.shape[0] // head_dim, down.shape[1]))
    listed = config.get("layer_num_attention_heads")
    if listed is not None:
        expected = [LayerSizes(int(h), int(k), int(f)) for h, k, f in zip(
            listed, config["layer_num_key_value_heads"], config["layer_intermediate_sizes"], strict=True)]
        if expected != sizes:
            raise SlimGPTError("the per-layer widths in config.json do not match the saved tensors: the folder "
                               "was edited or written by another tool; re-save it with `slimgpt prune`")
    return sizes


def read_checkpoint(directory: str | Path) -> SavedModel:
    """Load a model folder (pruned ``slimgpt_<family>`` or a stock dense one) as tensors."""
    path = Path(directory)
    config = read_config(path)
    family = family_of(config)
    row = FAMILIES[family]
    listed_head_dim = config.get("head_dim") if row.head_dim_key else None
    head_dim = int(listed_head_dim or int(config["hidden_size"]) // int(config["num_attention_heads"]))
    tensors = read_tensors(path)
    for name, tensor in tensors.items():  # an export of a damaged model would be damaged too
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NumericalError(f"{path} has non-finite weights (NaN or inf) in {name}: the model is damaged; "
                                 "export an intact copy of it")
    sizes = _layer_sizes(config, row, head_dim, tensors)
    return SavedModel(path, config, tensors, family, head_dim, sizes)


def support_files(directory: Path) -> list[Path]:
    """Files of a model folder other than weights and config: tokenizer, generation config, report."""
    skip_suffixes = (".safetensors", ".bin", ".pt", ".gguf")
    return [p for p in sorted(directory.iterdir())
            if p.is_file() and not p.name.endswith(skip_suffixes) and p.name not in ("config.json",
                                                                                    "model.safetensors.index.json")
            and not p.name.startswith(".")]


def copy_files(files: list[Path], directory: Path) -> None:
    for file in files:
        shutil.copy2(file, directory / file.name)
