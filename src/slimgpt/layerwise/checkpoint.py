"""Per-layer progress of a layer-by-layer run on disk, so an interrupted run resumes bit for bit.

Files: ``slimgpt-checkpoint.json`` (the marker: only marked folders are ever deleted),
``layer_<i>.safetensors`` (the finished layer's state dict, keys relative to the layer), extras a run
needs on resume (SliceGPT's ``embeddings.safetensors``), and one folder per commit, ``gen-<n>`` (n layers
done), with the stream file (``hidden.safetensors`` for head/channel methods; ``stream.safetensors``
with the basis too for SliceGPT) and ``state.json``. A commit fills ``gen-<n>.tmp`` and renames it into
place: that one rename commits the layer, so a crash anywhere leaves the previous generation whole.
``state.json`` records the sha256 of every file the generation depends on (checked on resume) and the
run's fingerprint (model weights and config, calibration windows: ``fingerprint``), refused on mismatch.

A folder written by an older slimgpt (``state.json`` and the stream file at the top, no fingerprint or
hashes) still resumes, with a warning that nothing could be checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from slimgpt._util.files import (
    is_checkpoint_dir,
    save_tensors_atomic,
    sha256_file,
    write_checkpoint_marker,
    write_text_atomic,
)
from slimgpt.errors import ConfigError
from slimgpt.models.adapters import LayerSizes, ModelAdapter
from slimgpt.models.slim import add_zero_bias

logger = logging.getLogger(__name__)

_SAMPLES = 4096  # values per tensor that enter the model fingerprint


def _sample_digest(digest: Any, name: str, tensor: torch.Tensor) -> None:
    digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
    if tensor.device.type != "meta" and tensor.numel():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLES)].to("cpu", torch.float64)
        digest.update(sample.numpy().tobytes())


def run_fingerprint(model: nn.Module, layers: Any, calibration: torch.Tensor | None) -> dict[str, Any]:
    """What identifies a run's inputs: ``model`` (config, every tensor's shape, and an evenly strided
    sample of the values outside the decoder layers), ``layers`` (the same sample of the decoder layers'
    values; None when they are not in memory, as when streaming) and ``calibration`` (the token ids)."""
    in_layers = {id(t) for layer in layers for t in layer.state_dict(keep_vars=True).values()}
    outer, inner = hashlib.sha256(), hashlib.sha256()
    to_json = getattr(model.config, "to_json_string", None)
    outer.update((to_json(use_diff=False) if to_json else repr(model.config)).encode())
    materialised = True
    for index, layer in enumerate(layers):
        for name, tensor in layer.state_dict().items():
            outer.update(f"{index}.{name} {tuple(tensor.shape)}".encode())
            materialised = materialised and tensor.device.type != "meta"
            _sample_digest(inner, f"{index}.{name}", tensor)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in in_layers:
            _sample_digest(outer, name, tensor)
    return {"model": outer.hexdigest(), "layers": inner.hexdigest() if materialised else None,
            "calibration": tensor_fingerprint(calibration)}


def tensor_fingerprint(tensor: torch.Tensor | None) -> str | None:
    """The sha256 of a (small) tensor's values and shape, e.g. the calibration token ids."""
    if tensor is None:
        return None
    data = tensor.detach().to("cpu").contiguous()
    return hashlib.sha256(f"{tuple(data.shape)} {data.dtype}".encode() + data.numpy().tobytes()).hexdigest()


class Checkpoint:
    """The checkpoint folder of one run. ``stream_name``: the stream file's name without suffix.

    fingerprint: what identifies the run's inputs (set by the driver before ``save`` / ``resume_state``).
    """

    def __init__(self, directory: Path, stream_name: str = "hidden") -> None:
        self.directory = directory
        self.stream_name = stream_name
        self.fingerprint: dict[str, Any] = {}
        self._hashes: dict[str, str] = {}

    # --- layout -------------------------------------------------------------------------------------

    def _generations(self) -> list[tuple[int, Path]]:
        found = []
        if self.directory.is_dir():
            for path in self.directory.glob("gen-*"):
                number = path.name[4:]
                if path.is_dir() and number.isdigit():
                    found.append((int(number), path))
        return sorted(found)

    def _current(self) -> Path:
        """The folder of the newest committed generation (the checkpoint itself for an old one)."""
        generations = self._generations()
        return generations[-1][1] if generations else self.directory

    @property
    def state_path(self) -> Path:
        return self._current() / "state.json"

    def exists(self) -> bool:
        return self.state_path.exists()

    def layer_path(self, index: int) -> Path:
        """The pruned weights of layer ``index`` (its state dict, keys relative to the layer)."""
        return self.directory / f"layer_{index}.safetensors"

    def _start(self) -> None:
        if self.directory.exists() and any(self.directory.iterdir()) and not is_checkpoint_dir(self.directory):
            raise ConfigError(f"{self.directory} is not a slimgpt checkpoint folder: pass an empty or new "
                              "--checkpoint-dir")
        self.directory.mkdir(parents=True, exist_ok=True)
        write_checkpoint_marker(self.directory)

    # --- writing ------------------------------------------------------------------------------------

    def save(self, index: int, layer: nn.Module, stream: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Commit layer ``index``: its weights, then a new generation (stream + state) renamed into place."""
        self._start()
        save_tensors_atomic(layer.state_dict(), self.layer_path(index))
        self._hashes[self.layer_path(index).name] = sha256_file(self.layer_path(index))
        number = index + 1
        final = self.directory / f"gen-{number}"
        tmp = self.directory / f"gen-{number}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        stream_file = tmp / f"{self.stream_name}.safetensors"
        save_tensors_atomic(stream, stream_file)
        files = dict(self._hashes) | {f"{final.name}/{stream_file.name}": sha256_file(stream_file)}
        write_text_atomic(json.dumps(state | {"fingerprint": self.fingerprint, "files": files}), tmp / "state.json")
        shutil.rmtree(final, ignore_errors=True)  # a generation of a run that was resumed before this layer
        tmp.rename(final)  # the commit
        for other, path in self._generations():
            if other != number:
                shutil.rmtree(path, ignore_errors=True)
        for old in ("state.json", f"{self.stream_name}.safetensors"):  # an older slimgpt's layout, superseded
            (self.directory / old).unlink(missing_ok=True)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """An extra file the run needs on resume (written before the first layer is committed)."""
        self._start()
        path = self.directory / f"{name}.safetensors"
        save_tensors_atomic(tensors, path)
        self._hashes[path.name] = sha256_file(path)

    # --- reading ------------------------------------------------------------------------------------

    def _load(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as error:
            raise ConfigError(f"checkpoint file {path} cannot be read ({str(error).splitlines()[0]}): remove "
                              f"{self.directory} to start over") from None

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return self._load(self.directory / f"{name}.safetensors")

    def stream(self, rows: Callable[[int], slice] | None = None) -> dict[str, torch.Tensor]:
        """The stream file's tensors; ``rows(n)``: read only those rows of each (n rows; a rank's windows)."""
        path = self._current() / f"{self.stream_name}.safetensors"
        if rows is None:
            return self._load(path)
        try:
            with safe_open(str(path), "pt") as file:
                names = list(file.keys())
                return {key: file.get_slice(key)[rows(file.get_slice(key).get_shape()[0])] for key in names}
        except (OSError, SafetensorError) as error:
            raise ConfigError(f"checkpoint file {path} cannot be read ({str(error).splitlines()[0]}): remove "
                              f"{self.directory} to start over") from None

    def load_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"the checkpoint state {self.state_path} is unreadable ({error}): remove "
                              f"{self.directory} to start over") from None
        if not isinstance(state, dict) or not isinstance(state.get("rows"), list):
            raise ConfigError(f"{self.state_path} is not a slimgpt checkpoint state: remove {self.directory} "
                              "to start over")
        return state

    def resume_state(self, expected: dict[str, Any]) -> dict[str, Any]:
        """The saved state, if every entry of ``expected`` (the options, ...), the fingerprint and every
        file's hash match; else refuse with one line."""
        state = self.load_state()
        if any(state.get(key) != value for key, value in expected.items()):
            raise ConfigError(f"the checkpoint in {self.directory} was made with other options: "
                              "resume with the same options, or remove it to start over")
        if "fingerprint" not in state:
            logger.warning("the checkpoint in %s was written by an older slimgpt: its model, calibration data and "
                           "files cannot be checked; resuming as it is", self.directory)
            return state
        for key, value in self.fingerprint.items():
            saved = state["fingerprint"].get(key)
            if saved != value and not (key == "layers" and None in (saved, value)):
                what = {"model": "another model (weights or config)", "layers": "another model (layer weights)",
                        "calibration": "other calibration data"}
                raise ConfigError(f"the checkpoint in {self.directory} was made from {what.get(key, key)}: resume "
                                  "with the same model and data, or remove the checkpoint to start over")
        for name, digest in state.get("files", {}).items():
            path = self.directory / name
            if not path.is_file() or sha256_file(path) != digest:
                raise ConfigError(f"checkpoint file {path} is missing or damaged (hash mismatch): remove "
                                  f"{self.directory} to start over")
        self._hashes = {k: v for k, v in state.get("files", {}).items() if "/" not in k}
        return state

    def restore_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter, sizes: LayerSizes) -> None:
        """Shape a dense layer to ``sizes`` and load its checkpointed head/channel-pruned weights."""
        adapter.resize_layer(layer, sizes)
        state = self._load(self.layer_path(index))
        for name, module in layer.named_modules():  # output biases a method added (FLAP)
            if isinstance(module, nn.Linear) and module.bias is None and f"{name}.bias" in state:
                add_zero_bias(module)
        layer.load_state_dict(state)
