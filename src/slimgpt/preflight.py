"""Checks that run before anything heavy: paths, device, model folder, data source, options vs geometry.

Every refusal is one line (a ``slimgpt.errors`` class) raised before the model is loaded or any file
written. ``check_prune`` / ``check_finetune`` run them for a command and take the output's lock
(``OUTPUT.lock``), then remove the partial outputs a killed earlier run left next to the output.
It sits with the drivers (it asks a method whether it can stream) and below the CLI.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import slimgpt.data as data
from slimgpt._util.files import OutputLock, remove_stale_partials
from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError, OutputExistsError, UnsupportedModelError
from slimgpt.methods import get_method
from slimgpt.models.slim import resolve_model_path
from slimgpt.saving import check_checkpoint, check_output

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class RunPaths:
    """What a checked command writes: its output, its checkpoint folder, and the lock it holds."""

    output: Path
    checkpoint: Path
    lock: OutputLock

    def __iter__(self) -> Iterator[Any]:
        return iter((self.output, self.checkpoint, self.lock))


def check_device(device: str) -> torch.device:
    """The torch device ``device``, if it exists on this machine; else a one-line ConfigError."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device} but this torch has no usable CUDA device: pass --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device} but only {torch.cuda.device_count()} CUDA device(s) exist: "
                              f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device} but MPS is not available here: pass --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device} is not supported: use cpu, cuda or cuda:N")
    return parsed


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_distinct(model: str, output: Path, checkpoint: Path | None, json_path: str | None) -> None:
    """The input model, the output, the checkpoint folder and the JSON report are four different places."""
    out = output.resolve()
    if _inside(Path.cwd().resolve(), out):
        raise OutputExistsError(f"--output {output} is the current folder or holds it: name a new folder")
    source = Path(resolve_model_path(model))
    places = {"--output": out}
    if checkpoint is not None:
        places["--checkpoint-dir"] = checkpoint.resolve()
    if json_path:
        places["--json"] = Path(json_path).resolve()
    if source.exists():
        for flag, place in places.items():
            if _inside(place, source.resolve()) or _inside(source.resolve(), place):
                raise OutputExistsError(f"{flag} {place} overlaps the input model {source}: write somewhere else")
    names = list(places)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if _inside(places[first], places[second]) or _inside(places[second], places[first]):
                raise OutputExistsError(f"{first} and {second} overlap ({places[first]}, {places[second]}): "
                                        "give each its own path")


def check_writable(output: Path, needed_bytes: int = 0) -> None:
    """The output can be created: its nearest existing parent is a writable folder with room for it."""
    parent = output.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputExistsError(f"--output {output} is under {parent}, which is a file: choose another --output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"cannot write in {parent} (permission denied): choose another --output")
    free = shutil.disk_usage(parent).free
    if needed_bytes and free < needed_bytes:
        raise OutputExistsError(f"{parent} has {free / 2**30:.1f} GiB free, the output needs about "
                                f"{needed_bytes / 2**30:.1f} GiB: free some space or choose another --output")


def check_json_path(json_path: str | None) -> None:
    if json_path:
        path = Path(json_path)
        if path.is_dir():
            raise OutputExistsError(f"--json {path} is a folder: pass a file name such as report.json")
        if not path.absolute().parent.is_dir():
            raise OutputExistsError(f"--json {path}: folder {path.absolute().parent} does not exist: create it first")


def _safetensors_intact(file: Path) -> str:
    """'' if ``file``'s header parses and its size matches the header; else what is wrong."""
    try:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > file.stat().st_size:
                return "its header is damaged"
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return "its header is damaged"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if file.stat().st_size < 8 + length + end:
        return "it is truncated"
    return ""


def check_model_source(model: str) -> int:
    """A local model folder has a config and intact safetensors weights; returns their size in bytes.

    Hub ids are left to the loader. Pickle-only folders are refused (slimgpt never unpickles).
    """
    path = Path(resolve_model_path(model))
    if not path.exists():
        return 0
    if path.is_file() and path.suffix.lower() == ".gguf":  # read by transformers' GGUF reader (slimgpt.models.gguf)
        return path.stat().st_size
    if not path.is_dir():
        raise UnsupportedModelError(f"model {model} is a file: pass the model's folder (config.json + safetensors)"
                                    " or a .gguf file")
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(f"model folder {path} has no config.json: pass a saved Hugging Face model folder")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise UnsupportedModelError(f"model folder {path} has only pickle weights ({', '.join(pickles)}); "
                                        "slimgpt loads safetensors only: convert them with save_pretrained")
        raise UnsupportedModelError(f"model folder {path} has no .safetensors weights: save the model there first")
    for file in weights:
        problem = _safetensors_intact(file)
        if problem:
            raise UnsupportedModelError(f"weights {file} cannot be read ({problem}): download or save the model again")
    return sum(f.stat().st_size for f in weights)


def _model_config(model: str) -> dict[str, Any] | None:
    path = Path(resolve_model_path(model)) / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config


def check_options_against_model(config: PruneConfig, model: str) -> None:
    """Options that cannot work on this model's geometry fail; doubtful ones log a warning."""
    geometry = _model_config(model)
    if geometry is None:
        return
    ffn = geometry.get("intermediate_size") or geometry.get("ffn_dim")
    if isinstance(ffn, int) and config.round_to > ffn:
        raise ConfigError(f"--round-to {config.round_to} is larger than the FFN width {ffn}: pass a divisor-friendly "
                          "multiple such as 8, 32 or 128")
    context = geometry.get("max_position_embeddings")
    if isinstance(context, int) and config.seqlen > context:
        logger.warning("--seqlen %d is longer than the model's context (%d tokens): calibration windows beyond "
                       "it are out of distribution", config.seqlen, context)
    if config.first_ratio is not None and config.first_ratio > config.ratio and config.schedule != "uniform":
        logger.warning("--first-ratio %.3f is above --ratio %.3f: the %s schedule then prunes later layers less "
                       "than the first", config.first_ratio, config.ratio, config.schedule)


def check_calibration_source(source: str) -> None:
    """The calibration source can be read, before the model loads: a local one is read now, a Hub one is
    in the datasets cache (offline) or the Hub answers (``data.check_available``)."""
    data.check_available(source, "calibration")


def check_eval_sources(sources: list[str]) -> None:
    """Every perplexity source of ``slimgpt eval`` can be read (``data.check_available``), before the model loads."""
    for source in sources:
        data.check_available(source, "eval")


def take_output(output: Path) -> OutputLock:
    """Lock ``output`` against a second run, then remove what a killed run left next to it."""
    lock = OutputLock(output).acquire()
    remove_stale_partials(output)
    return lock


def check_paths(args: Any, device: str) -> tuple[Path, Path]:
    """The path checks every model-writing command shares (output, checkpoint, JSON, device)."""
    check_device(device)
    output = check_output(args.output, args.overwrite)
    given = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    check_distinct(args.model, output, given, getattr(args, "json", None))
    checkpoint = check_checkpoint(output, args.checkpoint_dir, args.resume)
    check_json_path(getattr(args, "json", None))
    return output, checkpoint


def check_prune(args: Any, config: PruneConfig) -> RunPaths:
    """Every check of ``slimgpt prune`` that needs no model weights, then the output's lock."""
    output, checkpoint = check_paths(args, config.device)
    if getattr(args, "stream", False):
        refusal = get_method(config).cannot_stream()
        if refusal:
            raise ConfigError(f"{refusal}: prune without --stream")
    size = check_model_source(args.model)
    check_writable(output, size)
    check_options_against_model(config, args.model)
    check_calibration_source(config.calib)
    return RunPaths(output, checkpoint, take_output(output))


def check_finetune(args: Any, device: str) -> RunPaths:
    """The path, device and model checks of ``slimgpt finetune``, then the output's lock."""
    output, checkpoint = check_paths(args, device)
    check_writable(output, check_model_source(args.model))
    return RunPaths(output, checkpoint, take_output(output))


__all__ = ["RunPaths", "check_device", "check_distinct", "check_finetune", "check_model_source",
           "check_prune", "check_writable", "take_output"]
