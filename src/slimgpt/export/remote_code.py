"""Opt-in: make a pruned folder loadable with plain transformers, via ``trust_remote_code=True``.

A pruned model's config has ``model_type = "slimgpt_<family>"``, which only an installed slimgpt
registers. This export copies two small standalone files (``configuration_slimgpt.py``,
``modeling_slimgpt.py``; torch and transformers only) into the folder and adds an ``auto_map`` to
config.json pointing at them. Loading then needs ``trust_remote_code=True`` (the user runs code
shipped with the model), which is why slimgpt never does this by default: a folder saved by
``slimgpt prune`` contains no code.

Covered: LLaMA, Mistral, Qwen2 and OPT, with per-layer query heads, key/value heads, FFN widths and
the optional output biases (FLAP). Not covered: a layer with no heads or no FFN channels (export
refuses; use the llama-padded or GGUF export), and transformers releases whose stock attention does
not read its head counts from ``num_key_value_groups`` / ``num_heads`` (the 4.x and 5.x lines do).
"""

from __future__ import annotations

import json
import logging
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from slimgpt._util.files import replace_text, write_atomic_dir
from slimgpt.errors import SlimGPTError
from slimgpt.export.checkpoint import family_of, read_config
from slimgpt.models.families import FAMILIES

logger = logging.getLogger(__name__)

REMOTE_FILES = ("configuration_slimgpt.py", "modeling_slimgpt.py")
README_SECTION = """
## Loading without slimgpt (remote code)
This folder ships `configuration_slimgpt.py` and `modeling_slimgpt.py` (torch and transformers only):
```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)
```
`trust_remote_code=True` runs those two files; read them first. With slimgpt installed, no remote code is
needed (`import slimgpt` registers the model type).
"""


def remote_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the ``auto_map`` that points the Auto classes at the shipped files."""
    family = family_of(config)
    if not str(config.get("model_type", "")).startswith("slimgpt_"):
        raise SlimGPTError(f"model type {config.get('model_type')!r} is a stock transformers type: the folder "
                           "already loads without slimgpt, so it needs no remote code")
    config_class, model_class = FAMILIES[family].slim_class_names
    values = dict(config)
    values["auto_map"] = {
        "AutoConfig": f"configuration_slimgpt.{config_class}",
        "AutoModelForCausalLM": f"modeling_slimgpt.{model_class}",
    }
    values["architectures"] = [model_class]
    return values


def _check_buildable(config: dict[str, Any]) -> None:
    """The stock attention cannot hold zero heads: refuse before writing anything."""
    widths = zip(config.get("layer_num_attention_heads") or [], config.get("layer_num_key_value_heads") or [],
                 config.get("layer_intermediate_sizes") or [], strict=True)
    for index, (heads, kv_heads, ffn) in enumerate(widths):
        if min(heads, kv_heads, ffn) == 0:
            raise SlimGPTError(
                f"layer {index} has {heads} heads, {kv_heads} key/value heads and {ffn} FFN channels: the "
                "remote-code classes cannot build an empty attention or FFN; export with --format llama-padded "
                "or gguf instead"
            )


def _add_files(directory: Path, config: dict[str, Any]) -> None:
    package = resources.files("slimgpt.export.remote")
    for name in REMOTE_FILES:
        (directory / name).write_text(package.joinpath(name).read_text())
    readme = directory / "README.md"
    if readme.exists() and README_SECTION not in readme.read_text():
        replace_text(readme, readme.read_text() + README_SECTION)
    # Last: a crash before this line leaves a folder that still loads as before.
    replace_text(directory / "config.json", json.dumps(remote_config(config), indent=2, sort_keys=True) + "\n")


def export_remote_code(directory: str | Path, output: str | Path | None = None, overwrite: bool = False) -> Path:
    """Add the standalone modelling files and ``auto_map`` to a pruned folder; returns the folder.

    ``output`` None edits ``directory`` in place (it keeps loading with slimgpt as before); otherwise
    a copy is written to ``output``, atomically.
    """
    source = Path(directory)
    config = read_config(source)
    remote_config(config)  # validates the model type before any work
    _check_buildable(config)
    if output is None:
        _add_files(source, config)
        logger.info("added remote code to %s", source)
        return source

    def fill(tmp: Path) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        _add_files(tmp, config)

    path = write_atomic_dir(output, fill, overwrite)
    logger.info("wrote %s (remote code)", path)
    return path
