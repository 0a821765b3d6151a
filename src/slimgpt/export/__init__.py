"""Exports that make a pruned model usable outside slimgpt (``slimgpt export``).

A folder saved by ``slimgpt prune`` loads with transformers once slimgpt is imported. For runtimes
without slimgpt there are three opt-in exports:

- ``remote-code`` (remote_code.py): two standalone files plus an ``auto_map``; loads with
  ``trust_remote_code=True`` at the pruned size. Never done by default: it ships code with the model.
- ``llama-padded`` (padded.py): removed heads and channels zero-padded back to a stock config; loads
  in every runtime, exact, but as large and slow as the dense model.
- ``gguf`` (gguf.py): one GGUF file for llama.cpp's ``deci`` architecture, which has per-layer widths;
  keeps the pruned size and speed. Needs the ``gguf`` package, imported only when used, so the other
  exports work without it. ``llama_cpp.py`` runs such a file under llama.cpp (optional
  llama-cpp-python) to check it against PyTorch.
- ``bits-back`` (bitsback.py, with bitsback_layout.py and bitsback_codec.py): a SliceGPT / dynamic-slicing
  folder as one rANS-coded file, smaller than its safetensors at the same precision, by bits-back coding
  of each residual basis's free rotation. Needs the ``constriction`` package (the ``bitsback`` extra),
  imported only when used. ``load_bits_back`` decodes it; ``slimgpt eval`` accepts the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from slimgpt.errors import SlimGPTError
from slimgpt.export.padded import export_padded
from slimgpt.export.remote_code import export_remote_code

if TYPE_CHECKING:
    from slimgpt.export.gguf import GGUFExport

FORMATS = ("remote-code", "llama-padded", "gguf", "bits-back")
GGUF_OUTTYPES = ("f32", "f16")


def export_gguf(directory: str | Path, output: str | Path, outtype: str = "f16",
                overwrite: bool = False) -> GGUFExport:
    """Write a pruned LLaMA / Mistral / Qwen2 folder as one GGUF file (see slimgpt.export.gguf)."""
    try:
        from slimgpt.export import gguf as gguf_export
    except ImportError as error:
        raise SlimGPTError(f"the GGUF export needs the gguf package ({error}): pip install gguf") from None
    return gguf_export.export_gguf(directory, output, outtype=outtype, overwrite=overwrite)


__all__ = ["FORMATS", "GGUF_OUTTYPES", "export_gguf", "export_padded", "export_remote_code"]
