"""How many calibration windows go through a layer at once: the largest batch a memory budget holds.

The budget is the memory free now on the compute device (``MemAvailable`` of the host for the CPU, the
free CUDA memory for a GPU) times ``SAFETY``, less the activation store when it lives in the same
memory. One window's working memory in a layer pass is estimated from the layer's widths. The choice is
rounded down to a power of two (so small changes of free memory do not change it), and capped at
``MAX_BATCH_TOKENS`` tokens a batch, past which bigger batches buy no speed. ``--batch-size N``
overrides it; results do not depend on it beyond float rounding (windows are independent).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from slimgpt.config import PruneConfig
from slimgpt.layerwise.checkpoint import Checkpoint
from slimgpt.models.adapters import ModelAdapter

logger = logging.getLogger(__name__)

AUTO_BATCH = 0  # PruneConfig.batch_size: choose from the memory budget
SAFETY = 0.5  # the fraction of the free memory the passes may use
MAX_BATCH_TOKENS = {"cpu": 16384, "cuda": 131072}  # tokens a batch; other devices get the CPU's
MEMINFO = Path("/proc/meminfo")


def available_bytes(device: torch.device) -> int:
    """Memory free for new tensors on ``device``: free CUDA memory, else the host's available memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return int(psutil.virtual_memory().available)


def fits_in_memory(nbytes: int, device: torch.device) -> bool:
    """Whether a new ``nbytes`` tensor on ``device`` stays within the budget."""
    return nbytes <= SAFETY * available_bytes(device)


def window_bytes(adapter: ModelAdapter, layer: nn.Module, seqlen: int, itemsize: int) -> int:
    """One window's working memory in a layer pass: the residual, norm, q/k/v and rotary copies of the
    hidden state, the FFN's gate, up and product, an eager attention's scores and probabilities, and the
    float32 copy of a linear's input that the Hessian product reads."""
    d = adapter.attn_output(layer).out_features
    attn = adapter.attn_output(layer).in_features
    ffn = adapter.mlp_output(layer).in_features
    heads = adapter.layer_sizes(layer).n_heads
    per_token = (6 * d + 4 * attn + 4 * ffn + 2 * heads * seqlen) * itemsize + 4 * max(attn, ffn)
    return seqlen * per_token


def store_bytes(adapter: ModelAdapter, layer: nn.Module, windows: int, seqlen: int, itemsize: int) -> int:
    """The activation store: the layer inputs and o_proj's inputs of every window (down_proj's inputs are
    kept only where they fit afterwards)."""
    width = adapter.attn_output(layer).out_features + adapter.attn_output(layer).in_features
    return windows * seqlen * width * itemsize


def auto_batch_size(model: nn.Module, adapter: ModelAdapter, windows: int, seqlen: int, device: torch.device,
                    store: torch.device) -> int:
    """The batch size (a power of two, 1 to ``windows``) that fits the memory budget of ``device``."""
    layer = adapter.decoder_layers(model)[0]
    itemsize = next(model.parameters()).element_size()
    budget = SAFETY * available_bytes(device)
    if store.type == device.type:  # the store shares the compute memory
        budget -= store_bytes(adapter, layer, windows, seqlen, itemsize)
    by_memory = int(budget // window_bytes(adapter, layer, seqlen, itemsize))
    cap = max(1, MAX_BATCH_TOKENS.get(device.type, MAX_BATCH_TOKENS["cpu"]) // seqlen)
    size = max(1, min(windows, by_memory, cap))
    return 1 << (size.bit_length() - 1)


def resolve_batch_size(config: PruneConfig, model: nn.Module, adapter: ModelAdapter,
                       calibration: torch.Tensor | None, saved: int | None = None) -> PruneConfig:
    """``config`` with its batch size chosen (``AUTO_BATCH``), logged; ``saved``: the size of the run resumed."""
    if config.batch_size != AUTO_BATCH:
        return config
    windows, seqlen = tuple(calibration.shape) if calibration is not None else (config.nsamples, config.seqlen)
    device = torch.device(config.device)
    if saved is not None:
        size, why = saved, "the size of the checkpointed run"
    else:
        store = torch.device("cpu") if config.offload else device
        size = auto_batch_size(model, adapter, windows, seqlen, device, store)
        why = f"{available_bytes(device) / 2**30:.1f} GiB free on {device}, x{SAFETY} budget"
    logger.info("calibration batch size %d (%s; --batch-size N overrides it)", size, why)
    return replace(config, batch_size=size)


def saved_batch_size(checkpoint_dir: str | Path | None, resume: bool) -> int | None:
    """The batch size of the checkpointed run a resume continues (None: no resume, or none recorded), so an
    automatic choice resumes with the size the checkpoint was made with."""
    if checkpoint_dir is None or not resume:
        return None
    checkpoint = Checkpoint(Path(checkpoint_dir))
    if not checkpoint.exists():
        return None
    size = checkpoint.load_state().get("config", {}).get("batch_size")
    return int(size) if isinstance(size, int) and size > 0 else None
