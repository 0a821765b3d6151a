"""GGUF files in: a llama.cpp / Ollama model file loaded as a plain Hugging Face model.

``slimgpt prune model.gguf``, ``eval`` and ``finetune`` read GGUF through transformers' own reader
(``from_pretrained(folder, gguf_file=name)``, the ``gguf`` package), which dequantises every tensor to
float32. The object it returns carries a GGUF ``quantization_config`` and refuses ``save_pretrained``
("quantized with gguf and is not serializable"), so a pruned copy could not be saved. Here the model
class is built afresh from its config without ``quantization_config`` and given the dequantised state
dict: the result saves, reloads and prunes like any dense model.

Families: the GGUF architectures that are both read by transformers and pruned by slimgpt, ``llama``
and ``qwen2`` (``mistral`` too, should a file say so). llama.cpp writes Mistral models as ``llama``;
they load as LLaMA, the same network without Mistral's sliding window (exact up to the window, which
Mistral v0.2 and later no longer have). Anything else is a one-line ``UnsupportedModelError`` before any tensor is read.

Nothing here is cached: a GGUF file is loaded in memory each time. ``convert_gguf`` writes the plain
folder once (``slimgpt.models.smollm2`` caches the built-in real model that way).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimgpt.errors import SlimGPTError, UnsupportedModelError

logger = logging.getLogger(__name__)

# GGUF ``general.architecture`` values slimgpt prunes (transformers reads more: phi3, gemma2, ...).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
INSTALL_HINT = 'pip install "slimgpt[gguf]" (or: pip install gguf accelerate)'
PROVENANCE_FILE = "slimgpt_gguf_source.json"


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file's header says: architecture, model name, file type and tensor types."""

    path: Path
    architecture: str
    name: str | None
    file_type: str
    tensor_types: dict[str, int]

    def describe(self) -> str:
        """``MOSTLY_Q4_1 (210 Q4_1, 61 F32, 1 Q8_0 tensors)``."""
        counts = ", ".join(f"{count} {kind}" for kind, count in self.tensor_types.items())
        return f"{self.file_type} ({counts} tensors)"

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "architecture": self.architecture, "name": self.name,
                "file_type": self.file_type, "tensor_types": dict(self.tensor_types)}


def is_gguf_path(name_or_path: str | Path) -> bool:
    """Whether a model argument names a GGUF file (by its ``.gguf`` suffix)."""
    return str(name_or_path).lower().endswith(".gguf")


def require_gguf() -> Any:
    """The ``gguf`` module, or a one-line error with the install command (transformers also needs accelerate)."""
    try:
        import accelerate  # noqa: F401  (transformers refuses gguf_file without it)
        import gguf
    except ImportError as error:
        raise SlimGPTError(f"reading a GGUF file needs the {error.name} package: {INSTALL_HINT}") from None
    return gguf


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Read the header of a GGUF file (metadata and tensor table only, no tensor data)."""
    gguf = require_gguf()
    file = Path(path).expanduser()
    if not file.is_file():
        raise SlimGPTError(f"GGUF file {str(path)!r} does not exist: check the path")
    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as error:  # the reader raises ValueError, struct.error, ... on a damaged file
        raise SlimGPTError(f"{str(file)!r} is not a readable GGUF file ({type(error).__name__}: {error}): "
                           "re-download or re-export it") from None

    def field(key: str) -> Any:
        value = reader.fields.get(key)
        return None if value is None else value.contents()

    file_type = field("general.file_type")
    try:
        type_name = gguf.LlamaFileType(int(file_type)).name if file_type is not None else "unknown"
    except ValueError:
        type_name = f"file type {file_type}"
    tensor_types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    return GGUFInfo(path=file, architecture=str(field("general.architecture")), name=field("general.name"),
                    file_type=type_name, tensor_types=dict(tensor_types.most_common()))


def check_supported(info: GGUFInfo) -> None:
    if info.architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {info.architecture!r} of {info.path.name} is not one slimgpt prunes from GGUF "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}): convert the model to a Hugging Face folder "
            "of a supported family"
        )


def load_gguf(path: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu",
              attn_implementation: str | None = None) -> tuple[Any, Any]:
    """A GGUF file as ``(model, tokenizer)``: a plain, saveable transformers model, dequantised.

    ``dtype`` None keeps float32 (what the reader dequantises to); the file's own quantisation is
    logged. Raises ``UnsupportedModelError`` for an architecture slimgpt does not prune.
    """
    info = read_gguf_info(path)
    check_supported(info)
    from transformers import AutoModelForCausalLM

    folder, name = str(info.path.parent), info.path.name
    logger.info("reading GGUF %s (%s, %s)", info.path, info.architecture, info.describe())
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = load_gguf_tokenizer(info.path)
    except (ValueError, KeyError, NotImplementedError) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise UnsupportedModelError(
            f"transformers cannot read {info.path.name} ({first}): use the model's original Hugging Face release"
        ) from None
    model = plain_model(loaded, dtype=dtype or torch.float32, attn_implementation=attn_implementation)
    del loaded
    logger.info("dequantised %s from %s to %s", info.path.name, info.file_type,
                str(next(model.parameters()).dtype).removeprefix("torch."))
    model.to(device)
    model.eval()
    return model, tokenizer


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The tokenizer a GGUF file carries (transformers rebuilds it from the file's metadata)."""
    info = read_gguf_info(path)
    check_supported(info)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(info.path.parent), gguf_file=info.path.name)


def plain_model(loaded: Any, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None) -> Any:
    """A fresh model of ``loaded``'s class and config, without its ``quantization_config``, same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = loaded.config.to_dict()
    for key in ("quantization_config", "transformers_version", "_name_or_path", "_model_name_or_path"):
        values.pop(key, None)
    values["architectures"] = [type(loaded).__name__]
    values["dtype"] = str(dtype).removeprefix("torch.")
    config = AutoConfig.for_model(**values)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    state = {key: tensor.to(dtype) for key, tensor in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise SlimGPTError(f"GGUF weights do not fit {type(model).__name__} (missing {sorted(missing)[:3]}, unexpected "
                           f"{sorted(unexpected)[:3]}): report this file's architecture")
    model.tie_weights()
    return model


def convert_gguf(path: str | Path, destination: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write a GGUF file as a plain Hugging Face folder (safetensors, config, tokenizer), atomically.

    ``destination`` must not exist; it appears complete or not at all. The folder also holds
    ``slimgpt_gguf_source.json``: the file's header summary plus ``extra``.
    """
    target = Path(destination)
    info = read_gguf_info(path)
    model, tokenizer = load_gguf(path, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        provenance = {"gguf": info.to_dict(), "dequantised_to": "float32", **(extra or {})}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s to %s", info.path, target)
    return target
