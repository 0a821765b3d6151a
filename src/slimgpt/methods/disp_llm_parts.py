"""DISP-LLM's pieces (slimgpt.methods.disp_llm): the hypernetwork, its gates, the parameter count as a function
of the five index sets of each block, the masks on a dense model, and the final (exported) index sets.

Structures, in the hypernetwork's sequence order, five per decoder layer: S1 (attention input, the residual
dims q/k/v read), S2 (attention output, the dims o_proj writes), S3 (MLP input), S4 (FFN channels), S5 (MLP
output). A mask entry of 1 keeps the dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.disp import SETS
from slimgpt.models.families import stock_llama_like_adapter
from slimgpt.models.geometry import layer_params

INPUT_DIM = 32  # the hypernetwork's fixed random input per structure
HIDDEN = 64  # the bi-GRU's hidden size per direction


def check_model(model: nn.Module) -> ModelAdapter:
    """The adapter of a stock LLaMA-like model; anything else is refused with one line."""
    return stock_llama_like_adapter(model, "disp-llm", "pre-norm, gated FFN")


@dataclass(frozen=True)
class BlockCost:
    """How one dense block's parameter count depends on its five index-set sizes n1..n5.

    P = qkv_rows n1 + (attn_dim + o_bias) n2 + gated n3 n4 + gated_bias n4 + n4 n5 + down_bias n5 + fixed
    (gated: the FFN input matrices, 2 for gate/up; fixed: norms and q/k/v biases, which no set changes).
    """

    hidden: int
    ffn: int
    qkv_rows: int
    attn_dim: int
    o_bias: int
    gated: int
    gated_bias: int
    down_bias: int
    fixed: int

    def params(self, n: list[Any]) -> Any:
        """The block's parameter count for set sizes ``n`` (ints, or tensors for a differentiable count)."""
        n1, n2, n3, n4, n5 = n
        return (self.qkv_rows * n1 + (self.attn_dim + self.o_bias) * n2 + self.gated * n3 * n4
                + self.gated_bias * n4 + n4 * n5 + self.down_bias * n5 + self.fixed)

    def entry_cost(self, kind: int, n: list[int]) -> int:
        """What keeping one more entry of set ``kind`` (0..4) adds at set sizes ``n``."""
        if kind == 0:
            return self.qkv_rows
        if kind == 1:
            return self.attn_dim + self.o_bias
        if kind == 2:
            return self.gated * n[3]
        if kind == 3:
            return self.gated * n[2] + self.gated_bias + n[4]
        return n[3] + self.down_bias

    @property
    def sizes(self) -> list[int]:
        return [self.hidden, self.hidden, self.hidden, self.ffn, self.hidden]

    @property
    def largest_entry(self) -> int:
        """The most one entry can cost (all sets at their dense size): the granularity of the size."""
        return max(self.entry_cost(kind, self.sizes) for kind in range(5))


def block_cost(adapter: ModelAdapter, layer: nn.Module) -> BlockCost:
    q, k, v = adapter.attn_inputs(layer)
    o, down, ins = adapter.attn_output(layer), adapter.mlp_output(layer), adapter.mlp_inputs(layer)
    qkv_bias = sum(m.bias.numel() for m in (q, k, v) if m.bias is not None)
    cost = BlockCost(hidden=adapter.hidden_size, ffn=down.in_features,
                     qkv_rows=q.out_features + k.out_features + v.out_features, attn_dim=o.in_features,
                     o_bias=int(o.bias is not None), gated=len(ins), gated_bias=sum(m.bias is not None for m in ins),
                     down_bias=int(down.bias is not None), fixed=qkv_bias)
    extra = layer_params(layer) - cost.params(cost.sizes)
    return BlockCost(**{**cost.__dict__, "fixed": qkv_bias + extra})


class HyperNetwork(nn.Module):
    """Fixed random inputs (one per structure) -> bi-GRU -> LayerNorm -> GELU -> one linear head per structure."""

    def __init__(self, sizes: list[int], generator: torch.Generator) -> None:
        super().__init__()
        self.register_buffer("inputs", torch.randn(len(sizes), INPUT_DIM, generator=generator))
        self.gru = nn.GRU(INPUT_DIM, HIDDEN, bidirectional=True, batch_first=True)
        self.norm = nn.LayerNorm(2 * HIDDEN)
        self.heads: Any = nn.ModuleList(nn.Linear(2 * HIDDEN, size) for size in sizes)
        with torch.no_grad():  # PyTorch's default initialisations, drawn from ``generator`` (not the global RNG)
            for p in self.gru.parameters():
                p.uniform_(-1 / math.sqrt(HIDDEN), 1 / math.sqrt(HIDDEN), generator=generator)
            bound = 1 / math.sqrt(2 * HIDDEN)
            for p in self.heads.parameters():
                p.uniform_(-bound, bound, generator=generator)

    def forward(self) -> list[torch.Tensor]:
        """The logits of every structure."""
        inputs: Any = self.inputs
        out, _ = self.gru(inputs.unsqueeze(0))
        hidden = F.gelu(self.norm(out[0]))
        return [head(hidden[i]) for i, head in enumerate(self.heads)]


def logistic_noise(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """g = log u - log(1 - u): the difference of two Gumbels, the noise of a Gumbel-sigmoid."""
    u = torch.rand(shape, generator=generator).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def gumbel_gates(logits: list[torch.Tensor], generator: torch.Generator, temperature: float,
                 offset: float) -> list[torch.Tensor]:
    """z = round(sigmoid((l + offset + g) / T)), straight-through (the forward is binary, the gradient soft)."""
    gates = []
    for logit in logits:
        soft = torch.sigmoid((logit + offset + logistic_noise(logit.shape, generator)) / temperature)
        hard = (soft > 0.5).to(soft.dtype)
        gates.append(hard + soft - soft.detach())
    return gates


def model_params(costs: list[BlockCost], gates: list[torch.Tensor]) -> torch.Tensor:
    """The decoder's parameter count under ``gates`` (5 per block), differentiable in the gates."""
    total = torch.zeros(())
    for index, cost in enumerate(costs):
        total = total + cost.params([g.sum() for g in gates[5 * index: 5 * index + 5]])
    return total


class MaskHooks:
    """Multiplies a dense model's five insertion points per block by the current masks (``masks``).

    S1 scales the normed input of the attention, S2 its output, S3 the normed input of the MLP, S4 the
    input of down_proj (the FFN channels), S5 the MLP's output. With all-ones masks nothing changes.
    """

    def __init__(self, model: nn.Module, adapter: ModelAdapter) -> None:
        self.masks: list[torch.Tensor] = []
        self.handles: list[Any] = []
        for index, layer in enumerate(adapter.decoder_layers(model)):
            attn, mlp = adapter.attention(layer), layer.get_submodule("mlp")
            self.handles += [
                attn.register_forward_pre_hook(self._scale_kwarg(5 * index), with_kwargs=True),
                attn.register_forward_hook(self._scale_output(5 * index + 1)),
                mlp.register_forward_pre_hook(self._scale_input(5 * index + 2)),
                adapter.mlp_output(layer).register_forward_pre_hook(self._scale_input(5 * index + 3)),
                mlp.register_forward_hook(self._scale_output(5 * index + 4)),
            ]

    def _mask(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        return self.masks[slot].to(device=like.device, dtype=like.dtype)

    def _scale_kwarg(self, slot: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = kwargs["hidden_states"] * self._mask(slot, kwargs["hidden_states"])
                return args, kwargs
            return (args[0] * self._mask(slot, args[0]), *args[1:]), kwargs
        return hook

    def _scale_input(self, slot: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
            return (args[0] * self._mask(slot, args[0]), *args[1:])
        return hook

    def _scale_output(self, slot: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if isinstance(output, tuple):
                return (output[0] * self._mask(slot, output[0]), *output[1:])
            return output * self._mask(slot, output)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@dataclass
class FinalSets:
    """The exported masks and how they were reached."""

    masks: list[torch.Tensor]  # bool, 5 per block
    params: int  # the decoder's parameter count with them
    params_at_zero: int  # ... with the hypernetwork's own threshold (score > 0), at least one entry per set
    threshold: float  # the score threshold the size target needed (0 = the hypernetwork's own)


def final_sets(scores: list[torch.Tensor], costs: list[BlockCost], target: int) -> FinalSets:
    """Keep entries in descending score (``l + offset``, plus seeded noise for a sampled export) until the
    decoder's parameter count is closest to ``target``; every set keeps at least its best entry.

    Each entry's cost follows from the set sizes so far (P is bilinear in the sizes), so the count grows
    monotonically along the order and the closest prefix is within half an entry's cost of ``target``.
    """
    flat = torch.cat([s.detach().float().cpu() for s in scores])
    owner = torch.cat([torch.full((len(s),), i, dtype=torch.long) for i, s in enumerate(scores)])
    starts = torch.tensor([0] + [len(s) for s in scores]).cumsum(0)[:-1]
    first = torch.tensor([int(s.detach().float().cpu().argmax()) for s in scores]) + starts
    order = torch.sort(-flat, stable=True).indices
    forced = torch.zeros(len(flat), dtype=torch.bool)
    forced[first] = True
    order = torch.cat([first, order[~forced[order]]])
    counts = [[0] * 5 for _ in costs]
    params = sum(c.params([0] * 5) for c in costs)
    trace = []
    for entry in order.tolist():
        structure = int(owner[entry])
        block, kind = divmod(structure, 5)
        params += costs[block].entry_cost(kind, counts[block])
        counts[block][kind] += 1
        trace.append(params)
    totals = torch.tensor(trace, dtype=torch.float64)
    keep = max(int((totals - target).abs().argmin()) + 1, len(scores))
    chosen = torch.zeros(len(flat), dtype=torch.bool)
    chosen[order[:keep]] = True
    masks = list(chosen.split([len(s) for s in scores]))
    threshold = float(flat[order[keep - 1]]) if keep > len(scores) else float("nan")
    return FinalSets(masks, int(trace[keep - 1]), own_params(scores, costs), threshold)


def own_params(scores: list[torch.Tensor], costs: list[BlockCost]) -> int:
    """The decoder's parameter count with every entry of score > 0 (at least one per set)."""
    total = 0
    for block, cost in enumerate(costs):
        sizes = [max(int((scores[5 * block + k].detach().float() > 0).sum()), 1) for k in range(5)]
        total += cost.params(sizes)
    return total


def index_sets(masks: list[torch.Tensor]) -> list[dict[str, list[int]]]:
    """Per block, the kept indices of each set (``slimgpt.models.disp.SETS``)."""
    blocks = len(masks) // 5
    return [{name: torch.nonzero(masks[5 * b + k]).flatten().tolist() for k, name in enumerate(SETS)}
            for b in range(blocks)]
