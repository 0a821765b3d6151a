"""Models on the ``meta`` device filled lazily from safetensors shards, and a sharded writer.

For pruning models larger than CPU RAM (slimgpt.streaming): the skeleton has every shape and no storage;
modules are read from the checkpoint's shards when needed and sent back to ``meta`` afterwards.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from slimgpt._util.dtypes import DTYPE_NAMES, SAFETENSORS_DTYPES, parse_dtype
from slimgpt.errors import SlimGPTError
from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.families import get_adapter
from slimgpt.models.slim import resolve_model_path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]



# --- the source checkpoint ------------------------------------------------------------------------------

def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local folder (or built-in name) as is; anything else is a Hub id, downloaded to the HF cache.

    Only configs, safetensors shards and tokenizer files are fetched: streaming reads nothing else, and
    the shards go to disk, never all into RAM.
    """
    path = Path(resolve_model_path(str(name_or_path)))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_PATTERNS))
    except Exception as error:  # the hub client raises many types (offline, 404, gated, bad id)
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise SlimGPTError(
            f"cannot stream model {str(name_or_path)!r}: not a local folder and not downloadable from the Hub "
            f"({first_line}); pass a local folder with config.json and safetensors shards"
        ) from None


class ShardedWeights:
    """Lazy, read-only access to the tensors of a safetensors checkpoint (one file or an indexed set).

    Nothing is read at construction beyond the index (or the single file's header); ``read`` opens each
    needed shard once and reads only the requested tensors.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX_NAME
        if index.exists():
            self.weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
        elif (directory / SINGLE_NAME).exists():
            with safe_open(str(directory / SINGLE_NAME), framework="pt") as handle:
                self.weight_map = dict.fromkeys(handle.keys(), SINGLE_NAME)
        else:
            raise SlimGPTError(
                f"{directory} has no {SINGLE_NAME} or {INDEX_NAME}: streaming reads safetensors only; convert the "
                "checkpoint (load it once and save_pretrained it) or prune without --stream"
            )

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, on the CPU in their stored dtype."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise SlimGPTError(f"tensor {name!r} is missing from the checkpoint in {self.directory}: the "
                                   "shards do not match config.json; re-download or re-save the model")
            by_file[self.weight_map[name]].append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file_name, file_names in by_file.items():
            with safe_open(str(self.directory / file_name), framework="pt", device="cpu") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name)
        return tensors

    def stored_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating tensor (what ``dtype="auto"`` falls back to)."""
        for name, file_name in self.weight_map.items():
            with safe_open(str(self.directory / file_name), framework="pt") as handle:
                dtype = SAFETENSORS_DTYPES.get(handle.get_slice(name).get_dtype())
            if dtype is not None:
                return dtype
        return None


def stream_dtype(value: torch.dtype | str | None, config: Any, source: ShardedWeights) -> torch.dtype:
    """The dtype to prune in: the one asked for, else the config's, else the stored one (like "auto")."""
    value = parse_dtype(value)
    if value is not None:
        return value
    configured = getattr(config, "dtype", None)
    if isinstance(configured, str):
        configured = DTYPE_NAMES.get(configured)
    if isinstance(configured, torch.dtype):
        return configured
    return source.stored_dtype() or torch.float32


# --- the model skeleton -----------------------------------------------------------------------------------

class LazyModel:
    """A model on the ``meta`` device whose modules can be filled from, and emptied back to, the checkpoint."""

    def __init__(self, source: ShardedWeights, config: Any, dtype: torch.dtype,
                 attn_implementation: str | None = None, trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForCausalLM

        self.source = source
        self.dtype = dtype
        self.adapter: ModelAdapter = get_adapter(config)
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        with torch.device("meta"):
            self.model: Any = AutoModelForCausalLM.from_config(config, **kwargs)
        self.model.eval()
        self.layers = self.adapter.decoder_layers(self.model)
        names = {id(module): name for name, module in self.model.named_modules()}
        self.layer_prefixes = [names[id(layer)] + "." for layer in self.layers]
        prefix = getattr(self.model, "base_model_prefix", "")
        self._strip = f"{prefix}." if prefix else ""
        self._names = names

    def checkpoint_key(self, name: str) -> str:
        """The checkpoint's name for a state-dict key (some checkpoints omit the base model prefix)."""
        if name not in self.source and self._strip and name.startswith(self._strip):
            bare = name.removeprefix(self._strip)
            if bare in self.source:
                return bare
        return name

    def read(self, names: Iterable[str], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors by state-dict key, cast to the skeleton's dtype for each (floating tensors only)."""
        keys = {name: self.checkpoint_key(name) for name in names}
        stored = self.source.read(keys.values())
        tensors = {}
        for name, key in keys.items():
            tensor = stored.pop(key)
            target = like[name]
            tensors[name] = tensor.to(target.dtype) if tensor.is_floating_point() else tensor
        return tensors

    def materialise(self, module: nn.Module) -> None:
        """Fill ``module`` from the checkpoint, on the CPU; non-persistent buffers are recomputed."""
        prefix = self._names[id(module)] + "."
        skeleton = module.state_dict()
        tensors = self.read([prefix + key for key in skeleton], {prefix + k: v for k, v in skeleton.items()})
        module.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()}, strict=True, assign=True)
        for name, sub in module.named_modules():
            if any(b is not None and b.is_meta for b in sub.buffers(recurse=False)):
                self._rebuild_buffers(sub, f"{prefix}{name}")

    def _rebuild_buffers(self, module: nn.Module, name: str) -> None:
        """Non-persistent buffers (rotary tables) are not in the checkpoint: recompute them the way
        ``from_pretrained`` does, with the model's ``_init_weights``. Only for parameterless modules, so
        no loaded weight can be re-initialised by accident."""
        if any(True for _ in module.parameters(recurse=False)):
            raise SlimGPTError(f"module {name} has buffers that are not in the checkpoint and weights too; "
                               "streaming cannot rebuild it: prune without --stream")
        module.to_empty(device="cpu", recurse=False)
        self.model._init_weights(module)

    def release(self, module: nn.Module) -> None:
        """Send ``module`` back to ``meta``: its storage is freed, its shapes stay for the driver."""
        module.to("meta")

    def decoder_others(self) -> list[nn.Module]:
        """The decoder's non-layer children: what the driver's calibration capture runs."""
        decoder = self.model.get_decoder()
        return [module for name, module in decoder.named_children() if name != "layers"]

    def non_layer_keys(self) -> list[str]:
        """State-dict keys outside the decoder layers, tied copies left out (as ``save_pretrained`` does)."""
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        return [key for key in self.model.state_dict()
                if not key.startswith(tuple(self.layer_prefixes)) and key not in tied]

    def resident_params(self, modules: Iterable[nn.Module]) -> int:
        return sum(p.numel() for module in modules for p in module.parameters() if not p.is_meta)


# --- the output ------------------------------------------------------------------------------------------

class ShardWriter:
    """Writes a model as numbered safetensors shards plus the index ``from_pretrained`` reads."""

    def __init__(self, directory: Path, n_shards: int) -> None:
        self.directory = directory
        self.n_shards = n_shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.total_parameters = 0

    def shard_name(self, number: int) -> str:
        return f"model-{number:05d}-of-{self.n_shards:05d}.safetensors"

    def write(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        name = self.shard_name(number)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(self.directory / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            self.weight_map[key] = name
            self.total_size += tensor.numel() * tensor.element_size()
            self.total_parameters += tensor.numel()

    def finish(self) -> None:
        written = {name for name in self.weight_map.values()}
        if len(written) != self.n_shards:
            raise RuntimeError(f"{len(written)} of {self.n_shards} shards were written")  # a bug, not user input
        index = {"metadata": {"total_size": self.total_size, "total_parameters": self.total_parameters},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
