"""Per-layer progress of a layer-by-layer run on disk, so an interrupted run resumes bit for bit.

Files: ``layer_<i>.safetensors`` (the finished layer's state dict, keys relative to the layer), one
stream file with what the next layer needs (``hidden.safetensors`` for head/channel methods;
``stream.safetensors`` with the basis too for SliceGPT), optional extras (SliceGPT's
``embeddings.safetensors``) and ``state.json``, written last: it commits the layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from slimgpt._util.files import save_tensors_atomic, write_text_atomic
from slimgpt.errors import ConfigError
from slimgpt.models.adapters import LayerSizes, ModelAdapter
from slimgpt.models.slim import add_zero_bias


class Checkpoint:
    """The checkpoint folder of one run. ``stream_name``: the stream file's name without suffix."""

    def __init__(self, directory: Path, stream_name: str = "hidden") -> None:
        self.directory = directory
        self.stream_name = stream_name

    @property
    def state_path(self) -> Path:
        return self.directory / "state.json"

    def exists(self) -> bool:
        return self.state_path.exists()

    def layer_path(self, index: int) -> Path:
        """The pruned weights of layer ``index`` (its state dict, keys relative to the layer)."""
        return self.directory / f"layer_{index}.safetensors"

    def save(self, index: int, layer: nn.Module, stream: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Commit layer ``index``: its weights, the stream the next layer reads, then the state."""
        self.directory.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(layer.state_dict(), self.layer_path(index))
        save_tensors_atomic(stream, self.directory / f"{self.stream_name}.safetensors")
        write_text_atomic(json.dumps(state), self.state_path)  # last: it commits the layer

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """An extra file the run needs on resume (written before the first layer is committed)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(tensors, self.directory / f"{name}.safetensors")

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.directory / f"{name}.safetensors"))

    def stream(self) -> dict[str, torch.Tensor]:
        return self.load_tensors(self.stream_name)

    def load_state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.state_path.read_text())
        return state

    def resume_state(self, expected: dict[str, Any]) -> dict[str, Any]:
        """The saved state, if every entry of ``expected`` (the options, ...) matches it; else refuse."""
        state = self.load_state()
        if any(state.get(key) != value for key, value in expected.items()):
            raise ConfigError(f"the checkpoint in {self.directory} was made with other options: "
                              "resume with the same options, or remove it to start over")
        return state

    def restore_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter, sizes: LayerSizes) -> None:
        """Shape a dense layer to ``sizes`` and load its checkpointed head/channel-pruned weights."""
        adapter.resize_layer(layer, sizes)
        state = load_file(str(self.layer_path(index)))
        for name, module in layer.named_modules():  # output biases a method added (FLAP)
            if isinstance(module, nn.Linear) and module.bias is None and f"{name}.bias" in state:
                add_zero_bias(module)
        layer.load_state_dict(state)
