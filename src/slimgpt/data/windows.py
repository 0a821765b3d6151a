"""Token windows cut from a source: random calibration windows and consecutive eval windows.

Nothing is cached in memory: ``datasets`` already caches downloads on disk. The token streams of the
shipped corpora (``builtin``, ``english``) are cached on disk, keyed by the tokenizer and the text
(slimgpt.data.token_cache).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

import slimgpt.corpus as corpus
from slimgpt.data.documents import source_documents
from slimgpt.data.sources import BuiltinSource, EnglishSource, Source, check_positive, check_windowing, resolve_source
from slimgpt.data.token_cache import cached_encode
from slimgpt.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Documents tokenized per call in "documents" windowing: big enough to amortise the call, small enough
# that few are wasted once nsamples windows are found.
DOCUMENT_BATCH = 64


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    *,
    windowing: str | None = None,
) -> torch.Tensor:
    """``nsamples`` random windows of exactly ``seqlen`` tokens: a LongTensor [nsamples, seqlen].

    The windows follow GPTQ's protocol, which the paper uses: random windows, a ``torch.Generator``
    seeded with ``seed``, so the same arguments give the same windows on every machine. No special
    tokens are added, so every window is a plain slice of the text's tokens (GPTQ's windows start at
    random offsets too, so they almost never hold the one BOS its tokenizer call adds).

    How windows are drawn (``windowing``; by default the source's own, "stream" for local paths):

    - "stream" (every source but ``c4``): the documents joined by a blank line are tokenized once and
      each window starts at a uniform random offset of that token stream. Short documents (Alpaca
      records, WikiText lines) need this: few of them hold a whole window on their own. Raises
      ``DataError`` if the stream has fewer than ``nsamples * seqlen`` tokens, which would make the
      windows mostly repeat each other.
    - "documents" (``c4``): documents are visited in a seeded random order, each tokenized on its
      own; one with more than ``seqlen`` tokens gives one window at a random offset, a shorter one is
      skipped. Only the visited documents are tokenized, so a 356k-document shard costs seconds.
      Unlike GPTQ (which draws with replacement) each window comes from a different document, so
      the loop ends; raises ``DataError`` if fewer than ``nsamples`` documents are long enough.
    """
    check_positive(nsamples=nsamples, seqlen=seqlen)
    resolved = resolve_source(source)
    mode = check_windowing(windowing) if windowing is not None else resolved.windowing
    documents = source_documents(source, resolved, "calibration")
    generator = torch.Generator().manual_seed(seed)
    if mode == "documents":
        return _document_windows(tokenizer, documents, source, nsamples, seqlen, generator)

    stream = _encode_stream(tokenizer, documents, _shipped(resolved))
    needed = nsamples * seqlen
    if stream.numel() < needed:
        raise DataError(
            f"calibration source {source!r} has {stream.numel()} tokens but {nsamples} samples of "
            f"{seqlen} tokens need {needed}: pass fewer --nsamples, a shorter --seqlen, or more data"
        )
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples,), generator=generator)
    offsets = starts[:, None] + torch.arange(seqlen)  # [nsamples, seqlen]
    return stream[offsets]


def eval_windows(
    tokenizer: PreTrainedTokenizerBase, source: str, seqlen: int, max_windows: int | None = None
) -> torch.Tensor:
    """Non-overlapping ``seqlen``-token windows of the eval text: a LongTensor [n, seqlen].

    The standard perplexity protocol: the eval documents joined by a blank line ("\\n\\n".join, as
    everyone does for WikiText-2), tokenized once without special tokens, cut into consecutive
    windows; the tail shorter than a window is dropped. ``max_windows`` keeps only the first windows.
    """
    check_positive(seqlen=seqlen)
    if max_windows is not None:
        check_positive(max_windows=max_windows)
    resolved = resolve_source(source)
    stream = _encode_stream(tokenizer, source_documents(source, resolved, "eval"), _shipped(resolved))
    count = stream.numel() // seqlen
    if count == 0:
        raise DataError(
            f"eval source {source!r} has {stream.numel()} tokens, fewer than one window of {seqlen}: "
            "pass a shorter --seqlen or more data"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    # clone: a view would keep the whole token stream alive for as long as the windows live.
    return stream[: count * seqlen].reshape(count, seqlen).clone()


def _encode(tokenizer: PreTrainedTokenizerBase, texts: str | list[str]) -> Any:
    """Token ids without special tokens. ``verbose=False`` silences the "longer than model_max_length"
    warning, which does not apply here: windows are cut to ``seqlen`` afterwards."""
    return tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]


def _encode_stream(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], cache: bool = False) -> torch.Tensor:
    """The documents joined by a blank line, tokenized once: a LongTensor [tokens]; ``cache``: read and
    write the on-disk token cache (the shipped corpora)."""
    text = corpus.DOC_SEPARATOR.join(documents)
    if cache:
        stream = cached_encode(tokenizer, text, lambda whole: _encode(tokenizer, whole))
    else:
        stream = torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    logger.info("%d documents (%d characters): %d tokens", len(documents), len(text), stream.numel())
    return stream


def _shipped(resolved: Source) -> bool:
    """Whether the source is a corpus shipped with slimgpt (its token stream is cached on disk)."""
    return isinstance(resolved, (BuiltinSource, EnglishSource))


def _document_windows(
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    source: str,
    nsamples: int,
    seqlen: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One window per document longer than ``seqlen`` tokens, documents in seeded random order."""
    order: list[int] = torch.randperm(len(documents), generator=generator).tolist()
    windows: list[torch.Tensor] = []
    for batch_start in range(0, len(order), DOCUMENT_BATCH):
        batch = order[batch_start : batch_start + DOCUMENT_BATCH]
        for ids in _encode(tokenizer, [documents[index] for index in batch]):
            if len(ids) <= seqlen:
                continue
            start = int(torch.randint(0, len(ids) - seqlen + 1, (1,), generator=generator))
            windows.append(torch.tensor(ids[start : start + seqlen], dtype=torch.long))
            if len(windows) == nsamples:
                return torch.stack(windows)  # [nsamples, seqlen]
    raise DataError(
        f"calibration source {source!r} has {len(windows)} documents longer than {seqlen} tokens "
        f"(of {len(documents)} documents) but {nsamples} samples need {nsamples} such documents: "
        "pass fewer --nsamples, a shorter --seqlen, or more data"
    )
