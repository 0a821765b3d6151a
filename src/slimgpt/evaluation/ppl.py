"""Perplexity on non-overlapping windows, under the window protocols of the pruning literature.

Every window is evaluated on its own, from an empty context: the first token of a window has no
prediction, so a window of T tokens contributes T - 1 predicted tokens. The reported value is
exp(mean token NLL over every predicted token of every window), which is what LLM-Pruner, SlimGPT
(128-token windows) and SliceGPT (2048-token windows) compute. The two window lengths give very
different numbers for the same model, so a result always carries its protocol.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimgpt.data import eval_windows
from slimgpt.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Window lengths that name a protocol of the literature: numbers are only comparable
# within one protocol.
PROTOCOL_NAMES = {
    128: "LLM-Pruner/SlimGPT protocol",
    2048: "SliceGPT protocol",
    4096: "DISP-LLM/MoDeGPT protocol",
}

# Positions whose logits are upcast to float32 at once. A float32 [positions, vocab] block of a
# 128k-vocabulary model is 0.5 GB per 1024 positions; the model's own logits stay in its dtype.
LOSS_CHUNK_POSITIONS = 1024


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity number and everything needed to know what it can be compared with."""

    value: float
    dataset: str
    protocol: str
    seqlen: int
    n_windows: int
    n_tokens: int  # predicted tokens: n_windows * (seqlen - 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "dataset": self.dataset,
            "protocol": self.protocol,
            "seqlen": self.seqlen,
            "n_windows": self.n_windows,
            "n_tokens": self.n_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerplexityResult:
        return cls(
            value=float(data["value"]),
            dataset=str(data["dataset"]),
            protocol=str(data["protocol"]),
            seqlen=int(data["seqlen"]),
            n_windows=int(data["n_windows"]),
            n_tokens=int(data["n_tokens"]),
        )


def window_protocol(requested: int, context: int | None) -> tuple[int, str]:
    """The window length actually used and the protocol string that says so.

    A model whose context (``max_position_embeddings``) is shorter than the requested window is
    evaluated on windows of its full context; the string names both lengths so the number is never
    mistaken for the requested protocol.
    """
    if requested < 2:
        raise ConfigError(f"a perplexity window needs at least 2 tokens, got {requested}")
    name = PROTOCOL_NAMES.get(requested)
    if context is not None and context < requested:
        wanted = f"{requested} requested" + (f", {name}" if name else "")
        return context, f"{context}-token windows (model context; {wanted})"
    return requested, f"{requested}-token windows" + (f" ({name})" if name else "")


def model_context(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's positions allow, or None when its config does not say."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def window_nll_sum(logits: torch.Tensor, window: torch.Tensor, chunk: int = LOSS_CHUNK_POSITIONS) -> float:
    """Sum of the NLL of tokens 1..T-1 of ``window`` given ``logits`` of positions 0..T-2.

    logits: [T, vocab] in the model's dtype; window: [T]. Upcasting only ``chunk`` positions at a
    time keeps the float32 copy small whatever the vocabulary size.
    """
    total = 0.0
    n_predicted = window.shape[0] - 1
    for start in range(0, n_predicted, chunk):
        stop = min(start + chunk, n_predicted)
        block = logits[start:stop].float()  # [stop - start, vocab]
        targets = window[start + 1 : stop + 1]  # [stop - start]
        # per-token NLL in float32, summed in float64 so the result does not depend on the chunking
        total += float(F.cross_entropy(block, targets, reduction="none").double().sum())
    return total


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """exp(mean token NLL) of ``model`` over ``windows`` [n, seqlen], each window on its own.

    ``device`` is where the windows are sent (default: the device of the model's first parameter).
    The model's forward runs in its own dtype; the loss is computed in float32.
    """
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise DataError(
            f"perplexity needs windows of shape [n >= 1, seqlen >= 2], got {tuple(windows.shape)}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    target = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    n_predicted = 0
    try:
        batches = range(0, windows.shape[0], batch_size)
        for start in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
            batch = windows[start : start + batch_size].to(target)  # [b, seqlen]
            logits = model(input_ids=batch, use_cache=False).logits  # [b, seqlen, vocab]
            for row in range(batch.shape[0]):
                nll_sum += window_nll_sum(logits[row, :-1], batch[row])
                n_predicted += batch.shape[1] - 1
            del logits
    finally:
        model.train(was_training)
    mean_nll = nll_sum / n_predicted
    logger.debug("perplexity: mean NLL %.6f over %d tokens", mean_nll, n_predicted)
    if not math.isfinite(mean_nll):
        logger.warning("perplexity: the loss is not finite (NaN/inf logits?); try --dtype float32")
    # exp overflows a float above ~709; such a model is broken and reads as inf
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: str,
    seqlen: int,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    max_windows: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``dataset`` (a name ``slimgpt.data.eval_windows`` knows, or a path).

    The window is clipped to the model's context when that is shorter, and the protocol says so.
    """
    used, protocol = window_protocol(seqlen, model_context(model))
    if used != seqlen:
        logger.warning("%s: model context is %d tokens; evaluating %s", dataset, used, protocol)
    windows = eval_windows(tokenizer, dataset, used, max_windows=max_windows)
    logger.info("perplexity on %s: %d windows of %d tokens", dataset, windows.shape[0], used)
    value = perplexity(model, windows, batch_size=batch_size, device=device)
    return PerplexityResult(
        value=value,
        dataset=dataset,
        protocol=protocol,
        seqlen=used,
        n_windows=int(windows.shape[0]),
        n_tokens=int(windows.shape[0] * (used - 1)),
    )
