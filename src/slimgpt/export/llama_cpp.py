"""Logits of a GGUF file under llama.cpp (via llama-cpp-python), to check an export against PyTorch.

Optional: llama-cpp-python compiles llama.cpp at install time, so slimgpt does not depend on it; the
GGUF export itself needs only the ``gguf`` package. Used by the parity test and
benchmarks/gguf_parity.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from slimgpt.errors import SlimGPTError

KV_TYPES = {"f32": 0, "f16": 1}  # ggml type ids of the KV cache


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """llama.cpp logs from C through fd 2 even with verbose=False; keep test and benchmark output readable."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def llama_cpp_logits(path: str | Path, tokens: torch.Tensor, kv_type: str = "f32",
                     n_threads: int | None = None) -> torch.Tensor:
    """llama.cpp's logits for every position of every window: tokens [n, T] -> float32 [n, T, vocab].

    The KV cache is float32 by default so that the comparison measures the export (and the weight
    type), not llama.cpp's default float16 cache.
    """
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SlimGPTError("llama-cpp-python is not installed: pip install llama-cpp-python "
                           "(it compiles llama.cpp; CMAKE_ARGS=-DGGML_NATIVE=OFF for a portable build)") from None
    windows = tokens.reshape(-1, tokens.shape[-1])
    length = int(windows.shape[1])
    with _quiet_native_stderr():
        llm = Llama(model_path=str(path), n_ctx=length, n_batch=length, n_ubatch=length, logits_all=True,
                    verbose=False, n_threads=n_threads or 1, n_threads_batch=n_threads or 1,
                    type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type])
        try:
            rows = []
            for window in windows.tolist():
                llm.reset()  # n_tokens = 0: eval then clears the whole KV cache
                llm.eval(window)
                rows.append(np.array(llm.scores[:length], dtype=np.float32, copy=True))
        finally:
            llm.close()
    return torch.from_numpy(np.stack(rows)).reshape(*tokens.shape, -1)


def llama_cpp_tokenize(path: str | Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's token ids of each text (no BOS, special tokens as text), from the GGUF's tokenizer only."""
    from llama_cpp import Llama

    with _quiet_native_stderr():
        llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
        try:
            return [llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) for text in texts]
        finally:
            llm.close()
