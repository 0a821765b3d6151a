"""Token streams of the shipped corpora, cached on disk so a second run does not tokenize them again.

The built-in corpus is 11.5 MB of text: tokenizing it takes tens of seconds on every call. The token ids
are kept as a safetensors file under the slimgpt cache folder (``$SLIMGPT_CACHE``, default
``~/.cache/slimgpt``) in ``tokens/``, named by a hash of the tokenizer (its full serialised form: vocabulary,
merges, normalisation and pre-tokenisation) and of the text. A changed tokenizer or a changed corpus
(another Python's standard library) is another name, so a stale file is never read; the hashes are also
stored in the file and checked on reading. Files are written atomically; a cache that cannot be written
or read is skipped with a log line (tokenizing as before). Tokenizers without a serialised form (slow
Python tokenizers) are not cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from slimgpt.models.smollm2 import cache_root

logger = logging.getLogger(__name__)

FORMAT = "1"  # bump when the file layout or the tokenization call changes
FOLDER = "tokens"


def tokenizer_digest(tokenizer: Any) -> str | None:
    """A hash of everything that decides the tokenizer's ids (None: it has no serialised form)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{backend.to_str()}".encode()).hexdigest()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def cache_path(tokenizer_hash: str, text_hash: str) -> Path:
    """Where the token ids of this tokenizer on this text are cached."""
    key = hashlib.sha256(f"{FORMAT}\n{tokenizer_hash}\n{text_hash}".encode()).hexdigest()[:32]
    return cache_root() / FOLDER / f"{key}.safetensors"


def read_tokens(path: Path, metadata: dict[str, str]) -> torch.Tensor | None:
    """The cached ids at ``path`` if it exists with this metadata, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if handle.metadata() != metadata:
                logger.info("token cache %s was made from another tokenizer or text: tokenizing again", path)
                return None
            ids = handle.get_tensor("ids")
    except (OSError, SafetensorError, KeyError, RuntimeError) as error:
        logger.warning("token cache %s is unreadable (%s): tokenizing again", path, error)
        return None
    return ids.long()


def write_tokens(path: Path, ids: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write ``ids`` atomically (a temporary file renamed into place); a failure is logged, not raised."""
    small = ids.numel() == 0 or int(ids.max()) < 2**31
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(descriptor)
        try:
            save_file({"ids": ids.to(torch.int32 if small else torch.int64).contiguous()}, temporary, metadata)
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)
    except OSError as error:
        logger.warning("could not write the token cache %s (%s): the next run tokenizes again", path, error)


def cached_encode(tokenizer: Any, text: str, encode: Any) -> torch.Tensor:
    """``encode(text)`` as a LongTensor, read from the cache when this tokenizer already tokenized this text."""
    tokenizer_hash = tokenizer_digest(tokenizer)
    if tokenizer_hash is None:
        return torch.tensor(encode(text), dtype=torch.long)
    text_hash = text_digest(text)
    metadata = {"format": FORMAT, "tokenizer": tokenizer_hash, "text": text_hash}
    path = cache_path(tokenizer_hash, text_hash)
    ids = read_tokens(path, metadata)
    if ids is not None:
        logger.info("read %d cached tokens from %s", ids.numel(), path)
        return ids
    ids = torch.tensor(encode(text), dtype=torch.long)
    write_tokens(path, ids, metadata)
    return ids
