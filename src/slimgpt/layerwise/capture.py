"""Calibration activations: layer 0's inputs, running a layer over them in batches, and the store.

The model's forward is stopped with private exceptions once what is needed is known: at layer 0 (its
inputs and the keyword arguments its forward needs) and at a hooked linear (its input).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimgpt.config import PruneConfig
from slimgpt.layerwise.distributed import reduce_statistics
from slimgpt.layerwise.memory import fits_in_memory
from slimgpt.models.adapters import ModelAdapter
from slimgpt.solver.hessian import InputStatistics

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the layer-0 hook to stop the model's forward once the inputs are captured."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.hidden = hidden
        self.kwargs = kwargs


class _StopAtInput(Exception):
    """Raised by a forward pre-hook once the hooked linear's input is known."""

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__()
        self.inputs = inputs


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor, a tuple of them, or anything else) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    return value


def _stop_at_layer_zero(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    hidden = args[0] if args else kwargs.pop("hidden_states")
    raise _StopForward(hidden, kwargs)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor, batch_size: int,
                         device: torch.device, store: torch.device) -> tuple[torch.Tensor, dict[int, dict[str, Any]]]:
    """Inputs of decoder layer 0 for every window [N, S, d], and the layer kwargs for each batch size.

    Everything before the first layer (embeddings, rotary tables, position embeddings) moves to
    ``device`` for this pass; the decoder layers stay where they are: a hook on layer 0 stops the
    forward with a private exception before any layer runs.
    """
    layers = adapter.decoder_layers(model)
    decoder = model.get_decoder()  # type: ignore[operator]
    others = [m for name, m in decoder.named_children() if name != "layers"]
    homes = [next(iter(m.parameters()), torch.empty(0)).device for m in others]
    for module in others:
        module.to(device)
    handle = layers[0].register_forward_pre_hook(_stop_at_layer_zero, with_kwargs=True)
    n, seqlen = windows.shape
    hidden_all: torch.Tensor | None = None
    kwargs_by_size: dict[int, dict[str, Any]] = {}
    try:
        for start in range(0, n, batch_size):
            batch = windows[start:start + batch_size].to(device)
            try:
                decoder(input_ids=batch, use_cache=False)
            except _StopForward as stop:
                if hidden_all is None:
                    hidden_all = torch.empty((n, seqlen, stop.hidden.shape[-1]), dtype=stop.hidden.dtype,
                                             device=store)
                hidden_all[start:start + len(batch)] = stop.hidden.to(store)
                if len(batch) not in kwargs_by_size:
                    kwargs = {k: v for k, v in stop.kwargs.items() if k not in ("past_key_values", "use_cache")}
                    kwargs_by_size[len(batch)] = kwargs
            else:  # pragma: no cover - the hook always fires
                raise RuntimeError("the layer-0 hook did not fire")
    finally:
        handle.remove()
        for module, home in zip(others, homes, strict=True):
            module.to(home)
    assert hidden_all is not None
    return hidden_all, kwargs_by_size


def run_batches(hidden: torch.Tensor, kwargs_by_size: dict[int, dict[str, Any]], batch_size: int,
                device: torch.device) -> Iterator[tuple[slice, torch.Tensor, dict[str, Any]]]:
    """(windows, their layer inputs on ``device``, the layer kwargs on ``device``) for each batch."""
    for start in range(0, hidden.shape[0], batch_size):
        part = slice(start, min(start + batch_size, hidden.shape[0]))
        h = hidden[part].to(device)
        yield part, h, {k: to_device(v, device) for k, v in kwargs_by_size[h.shape[0]].items()}


@contextmanager
def collect_inputs(linear: nn.Linear, stats: InputStatistics) -> Iterator[None]:
    """Add every input ``linear`` receives inside the block to ``stats``."""
    handle = linear.register_forward_pre_hook(lambda _m, args: stats.add(args[0]))
    try:
        yield
    finally:
        handle.remove()


def input_of(linear: nn.Linear, forward: Callable[[], object]) -> torch.Tensor:
    """What ``linear`` receives when ``forward()`` runs; the forward stops there.

    The statistics passes discard the layer's output, so the hooked matmul and everything after it
    would be wasted work.
    """
    def stop(_module: nn.Module, args: tuple[Any, ...]) -> None:
        raise _StopAtInput(args[0])

    handle = linear.register_forward_pre_hook(stop)
    try:
        forward()
    except _StopAtInput as stopped:
        return stopped.inputs
    finally:
        handle.remove()
    raise RuntimeError(f"the forward never reached {linear}")  # pragma: no cover - o_proj / down_proj always run


LayerBatches = Iterator[tuple[torch.Tensor, torch.Tensor]]  # (layer input, layer output) per batch


def dense_pass(model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor, config: PruneConfig,
               device: torch.device | None = None) -> Iterator[tuple[nn.Module, LayerBatches]]:
    """Walk the unpruned model layer by layer on the calibration windows, each layer on ``device`` in turn.

    Yields (layer, batches); iterating ``batches`` (fully, before the next layer) gives each batch's
    (layer input, layer output) and stores the outputs as the next layer's inputs. For methods that measure
    every dense layer before pruning any (FLAP's statistics, dynamic slicing's redundancy).
    """
    device = device if device is not None else torch.device(config.device)
    store = torch.device("cpu") if config.offload else device
    hidden, kwargs_by_size = capture_layer_inputs(model, adapter, calibration.long(), config.batch_size, device,
                                                  store)

    def batches(layer: nn.Module) -> LayerBatches:
        for part, h, kw in run_batches(hidden, kwargs_by_size, config.batch_size, device):
            out = adapter.mlp_block(layer, adapter.attention_block(layer, h, kw))
            yield h, out
            hidden[part] = out.to(hidden.device)

    for layer in adapter.decoder_layers(model):
        home = next(layer.parameters()).device
        layer.to(device)
        yield layer, batches(layer)
        layer.to(home)


@torch.no_grad()
def dense_input_statistics(model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor, config: PruneConfig,
                           full: bool = False) -> list[tuple[InputStatistics, InputStatistics]]:
    """Statistics of every layer's o_proj and down_proj inputs on the unpruned model, in one pass.

    For methods that rank all layers before pruning any (FLAP); returns one (o_proj, down_proj) pair per layer.
    """
    device = torch.device(config.device)
    result = []
    for layer, batches in dense_pass(model, adapter, calibration, config, device):
        o_proj, down_proj = adapter.attn_output(layer), adapter.mlp_output(layer)
        attn = InputStatistics(o_proj.in_features, device, full=full)
        ffn = InputStatistics(down_proj.in_features, device, full=full)
        with collect_inputs(o_proj, attn), collect_inputs(down_proj, ffn):
            for _ in batches:
                pass
        reduce_statistics(attn)  # the sums over every rank's windows (a no-op in one process)
        reduce_statistics(ffn)
        result.append((attn, ffn))
    return result


@dataclass
class Activations:
    """The calibration activations the layer passes read and write, on the store (CPU with offload).

    hidden: [N, S, d], the current layer's inputs; the passes overwrite them with the layer's outputs.
    inner: [N, S, heads * head_dim], o_proj's inputs in the current layer (pre-norm layers only), so the
    attention half with a new o_proj is one matmul. ffn_inner: [N, S, ffn], down_proj's inputs (pre-norm
    layers, where they fit the memory budget), so propagation is down_proj's matmul on the kept channels'
    inputs. Allocated once and reused by every layer.
    """

    hidden: torch.Tensor
    kwargs_by_size: dict[int, dict[str, Any]]
    batch_size: int
    device: torch.device
    inner: torch.Tensor | None = None
    ffn_inner: torch.Tensor | None = None
    ffn_ready: bool = False  # ffn_inner holds the current layer's down_proj inputs

    def batches(self) -> Iterator[tuple[slice, torch.Tensor, dict[str, Any]]]:
        """(windows, layer inputs on the device, layer kwargs on the device) for each batch."""
        return run_batches(self.hidden, self.kwargs_by_size, self.batch_size, self.device)

    def keep_inner(self, part: slice, x: torch.Tensor) -> None:
        """Store o_proj's input ``x`` [B, S, heads * head_dim] of the windows ``part``."""
        self.inner = self._buffer(self.inner, x)
        self.inner[part] = x.to(self.inner.device)

    def keep_ffn_inner(self, part: slice, x: torch.Tensor) -> None:
        """Store down_proj's input ``x`` [B, S, ffn] of the windows ``part``, when the store can hold every
        window's (decided at the first batch); ``ffn_ready`` says whether all of this layer's are kept."""
        if part.start == 0:
            self.ffn_ready = self._ffn_buffer(x)
        if self.ffn_ready:
            assert self.ffn_inner is not None
            self.ffn_inner[part] = x.to(self.ffn_inner.device)

    def _buffer(self, buffer: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """``buffer``, or a new [N, S, width] one on the store when it does not match ``x``'s width and dtype."""
        if buffer is None or buffer.shape[-1] != x.shape[-1] or buffer.dtype != x.dtype:
            return torch.empty((*self.hidden.shape[:2], x.shape[-1]), dtype=x.dtype, device=self.hidden.device)
        return buffer

    def _ffn_buffer(self, x: torch.Tensor) -> bool:
        """Whether the buffer for down_proj's inputs exists or fits the store's memory budget (then made)."""
        buffer = self.ffn_inner
        if buffer is not None and buffer.shape[-1] == x.shape[-1] and buffer.dtype == x.dtype:
            return True
        self.ffn_inner = None  # the old buffer's memory counts as free
        nbytes = self.hidden.shape[0] * self.hidden.shape[1] * x.shape[-1] * x.element_size()
        if not fits_in_memory(nbytes, self.hidden.device):
            logger.info("down_proj's inputs (%.2f GB) exceed the memory budget on %s: propagation runs the FFN "
                        "half again", nbytes / 1e9, self.hidden.device)
            return False
        self.ffn_inner = self._buffer(None, x)
        return True
