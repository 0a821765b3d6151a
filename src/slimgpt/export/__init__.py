"""Exports that make a pruned model usable outside slimgpt (``slimgpt export``).

A folder saved by ``slimgpt prune`` loads with transformers once slimgpt is imported. For runtimes
without slimgpt there are three opt-in exports:

- ``remote-code`` (remote_code.py): two standalone files plus an ``auto_map``; loads with
  ``trust_remote_code=True`` at the pruned size. Never done by default: it ships code with the model.
- ``llama-padded`` (padded.py): removed heads and channels zero-padded back to a stock config; loads
  in every runtime, exact, but as large and slow as the dense model.
- ``gguf`` (gguf.py): one GGUF file for llama.cpp's ``deci`` architecture, which has per-layer widths;
  keeps the pruned size and speed.
"""

from slimgpt.export.gguf import GGUFExport, export_gguf
from slimgpt.export.padded import export_padded
from slimgpt.export.remote_code import export_remote_code

FORMATS = ("remote-code", "llama-padded", "gguf")

__all__ = ["FORMATS", "GGUFExport", "export_gguf", "export_padded", "export_remote_code"]
