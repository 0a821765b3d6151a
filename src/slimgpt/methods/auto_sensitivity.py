"""The ``auto`` schedule's measurements on the dense model: one pass for the planning Hessians, and the
sensitivity probes' output divergences as a staircase from the dense activations.

``dense_run`` walks the planning windows through the dense layers once, collecting every layer's full
o_proj and down_proj input Hessians and, on the first (sensitivity) windows, each layer's inputs, the
attention half's outputs and o_proj's inputs. ``staircase_divergences`` then measures, for every probe (one
module's weight replaced by its compensated weight), the mean per-token KL divergence of the model's
next-token distribution from the dense one: a probe at layer i changes nothing before layer i, so its
copy of the windows starts there from the dense activations and runs the layers after it only, the copies
of all probes started so far batched together through each layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimgpt.config import PruneConfig
from slimgpt.layerwise.capture import capture_layer_inputs, collect_inputs, run_batches
from slimgpt.layerwise.distributed import reduce_statistics
from slimgpt.methods.auto_divergence import TOP_K, TopKDivergence, linear_head, run_given
from slimgpt.models.adapters import ModelAdapter
from slimgpt.solver.hessian import InputStatistics

LOGIT_BUDGET = 1 << 27  # logits (floats) of one head call
STAIR_TOKENS = 1 << 14  # tokens of one layer call of the staircase
# The top-token KL from vocabularies this large on (smaller heads are cheaper whole: tiny-mha's 4096 rows
# took 0.21 s whole and 0.45 s as top-256 for its 12 probes).
TOP_VOCAB = 32 * TOP_K


@dataclass
class DenseRun:
    """What one pass of the planning windows through the dense model measures.

    stats: every layer's (o_proj, down_proj) input statistics. On the first ``keep`` windows (the
    sensitivity windows), per layer: inputs, mids (the attention half's outputs, the FFN half's inputs) and
    attn_inputs (o_proj's inputs); final: the last layer's outputs.
    """

    stats: list[tuple[InputStatistics, InputStatistics]] = field(default_factory=list)
    inputs: list[torch.Tensor] = field(default_factory=list)
    mids: list[torch.Tensor] = field(default_factory=list)
    attn_inputs: list[torch.Tensor] = field(default_factory=list)
    final: torch.Tensor = field(default_factory=lambda: torch.empty(0))


def dense_run(model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor, keep: int,
              config: PruneConfig) -> DenseRun:
    """Full o_proj and down_proj input Hessians of every dense layer, and the first ``keep`` windows'
    activations (``DenseRun``, on the activation store), in one pass."""
    device = torch.device(config.device)
    store = torch.device("cpu") if config.offload else device
    hidden, kwargs_by_size = capture_layer_inputs(model, adapter, windows.long(), config.batch_size, device, store)
    run = DenseRun()
    for layer in adapter.decoder_layers(model):
        home = next(layer.parameters()).device
        layer.to(device)
        o_proj, down_proj = adapter.attn_output(layer), adapter.mlp_output(layer)
        attn = InputStatistics(o_proj.in_features, device, full=True)
        ffn = InputStatistics(down_proj.in_features, device, full=True)
        kept: list[list[torch.Tensor]] = [[], [], [], []]
        seen: list[torch.Tensor] = []
        handle = o_proj.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0]))
        try:
            with collect_inputs(o_proj, attn), collect_inputs(down_proj, ffn):
                for part, h, kw in run_batches(hidden, kwargs_by_size, config.batch_size, device):
                    mid = adapter.attention_block(layer, h, kw)
                    out = adapter.mlp_block(layer, mid)
                    if part.start < keep:
                        for where, x in zip(kept, (h, mid, seen[-1], out), strict=True):
                            where.append(x[:keep - part.start].to(store, copy=True))
                    seen.clear()
                    hidden[part] = out.to(hidden.device)
        finally:
            handle.remove()
        layer.to(home)
        reduce_statistics(attn)  # the sums over every rank's windows (a no-op in one process)
        reduce_statistics(ffn)
        run.stats.append((attn, ffn))
        run.inputs.append(torch.cat(kept[0]))
        run.mids.append(torch.cat(kept[1]))
        run.attn_inputs.append(torch.cat(kept[2]))
        run.final = torch.cat(kept[3])
    return run


Probe = tuple[int, int, torch.Tensor]  # a layer index, its module (0: o_proj, 1: down_proj), the weight change
Change = tuple[nn.Linear, slice, torch.Tensor]  # a module, the batch rows it changes on, its weight change


@contextmanager
def _perturbed(changes: list[Change]) -> Iterator[None]:
    """Inside the block each module adds its weight change's output to its own rows of the batch only."""
    handles = []
    for linear, rows, change in changes:
        def perturb(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor,
                    rows: slice = rows, change: torch.Tensor = change) -> None:
            output[rows] += F.linear(args[0][rows], change)

        handles.append(linear.register_forward_hook(perturb))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Stream:
    """One probe's copy of the sensitivity windows: its hidden states (or, at its own layer, the FFN half's
    inputs when ``mid``), and the weight change its own layer still has to apply (module, change)."""

    hidden: torch.Tensor
    mid: bool = False
    change: tuple[int, torch.Tensor] | None = None


def _start(layer: nn.Module, adapter: ModelAdapter, dense: DenseRun, index: int, module: int,
           delta: torch.Tensor) -> _Stream:
    """A probe's stream at its own layer: the FFN half's inputs wherever they are known without running
    the attention half (the dense ones for a down_proj probe; plus the o_proj change's output on the dense
    o_proj inputs where the attention half is residual + o_proj), else the layer's inputs."""
    if module == 1:
        return _Stream(dense.mids[index], True, (1, delta))
    if adapter.attention_is_residual(layer):
        attn_in = dense.attn_inputs[index]
        return _Stream(dense.mids[index] + F.linear(attn_in, delta.to(attn_in.device, attn_in.dtype)), True)
    return _Stream(dense.inputs[index], False, (0, delta))


def staircase_divergences(model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor, dense: DenseRun,
                          probes: list[Probe], config: PruneConfig, per_call: int = 0) -> list[float]:
    """Mean KL(dense || model with one probe's weight change) per token, for every probe (in layer order).

    A probe at layer i changes nothing before layer i, so its copy of the windows starts at layer i from
    the dense activations there (``_start``) and runs layers i, i+1, ... only; the copies of all probes
    started so far go through each layer together (at most ``STAIR_TOKENS`` tokens a call), a forward
    hook adding a change to its own copy's rows (``per_call`` copies a call, if given). The dense reference
    is ``dense.final``.
    """
    device = torch.device(config.device)
    per_call = per_call or max(1, STAIR_TOKENS // windows.numel())
    kwargs = _LayerKwargs(model, adapter, windows, device)
    streams: list[_Stream] = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        streams += [_start(layer, adapter, dense, index, m, delta) for at, m, delta in probes if at == index]
        home = next(layer.parameters()).device
        layer.to(device)
        for start in range(0, len(streams), per_call):
            _through_layer(layer, adapter, streams[start:start + per_call], kwargs, dense.final.device)
        layer.to(home)
    return _divergences(model, windows, dense.final, [s.hidden for s in streams])


class _LayerKwargs:
    """The decoder layers' keyword arguments for a batch of the sensitivity windows repeated c times."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor, device: torch.device) -> None:
        self.model, self.adapter, self.windows, self.device = model, adapter, windows, device
        self.by_copies: dict[int, dict[str, Any]] = {}

    def __call__(self, copies: int) -> dict[str, Any]:
        if copies not in self.by_copies:
            size = copies * len(self.windows)
            self.by_copies[copies] = capture_layer_inputs(self.model, self.adapter, self.windows.repeat(copies, 1),
                                                          size, self.device, self.device)[1][size]
        return self.by_copies[copies]


def _changes(linear: nn.Linear, module: int, streams: list[_Stream], n: int) -> list[Change]:
    """The weight changes of ``module`` that the streams still apply, at each stream's rows of the batch."""
    return [(linear, slice(c * n, (c + 1) * n), s.change[1].to(linear.weight.device, linear.weight.dtype))
            for c, s in enumerate(streams) if s.change is not None and s.change[0] == module]


def _through_layer(layer: nn.Module, adapter: ModelAdapter, streams: list[_Stream], kwargs: _LayerKwargs,
                   store: torch.device) -> None:
    """Run the streams through one layer in one batch (the attention half only for those that need it)."""
    n = len(kwargs.windows)
    full = [s for s in streams if not s.mid]
    if full:
        with _perturbed(_changes(adapter.attn_output(layer), 0, full, n)):
            mids = adapter.attention_block(layer, torch.cat([s.hidden for s in full]).to(kwargs.device),
                                           kwargs(len(full)))
        for c, s in enumerate(full):
            s.hidden, s.mid = mids[c * n:(c + 1) * n], True
    with _perturbed(_changes(adapter.mlp_output(layer), 1, streams, n)):
        out = adapter.mlp_block(layer, torch.cat([s.hidden for s in streams]).to(kwargs.device))
    for c, s in enumerate(streams):
        s.hidden, s.mid, s.change = out[c * n:(c + 1) * n].to(store), False, None


def _divergences(model: nn.Module, windows: torch.Tensor, reference: torch.Tensor,
                 streams: list[torch.Tensor]) -> list[float]:
    """Mean per-token KL of each stream's next-token distribution from the reference's: from the streams'
    final hidden states through the dense head's top tokens where the head is linear and has at least
    ``TOP_VOCAB`` rows (slimgpt.methods.auto_divergence), else through the whole head, in chunks of at
    most ``LOGIT_BUDGET`` logits."""
    tokens = windows.numel()
    vocab = int(model.get_output_embeddings().weight.shape[0])  # type: ignore[operator]
    per_chunk = max(1, LOGIT_BUDGET // max(1, tokens * vocab))
    logits = run_given(model, windows, reference, head=True)
    head = None
    if vocab >= TOP_VOCAB:
        final = run_given(model, windows, reference, head=False).flatten(0, 1)
        head = linear_head(model, final, logits.flatten(0, 1))
    if head is not None:
        divergence = TopKDivergence(head, final, logits.flatten(0, 1))
        finals: list[torch.Tensor] = []
        for start in range(0, len(streams), per_chunk):
            out = run_given(model, windows, torch.cat(streams[start:start + per_chunk]), head=False)
            finals += [x.flatten(0, 1) for x in out.split(len(windows))]
        return divergence(finals)
    dense = torch.log_softmax(logits, -1).cpu()
    p = dense.exp()
    result: list[float] = []
    for start in range(0, len(streams), per_chunk):
        log_probs = torch.log_softmax(run_given(model, windows, torch.cat(streams[start:start + per_chunk]),
                                                head=True), -1).cpu()
        for c in range(len(streams[start:start + per_chunk])):
            result.append(float((p * (dense - log_probs[c * len(windows):(c + 1) * len(windows)])).sum()) / tokens)
    return result
