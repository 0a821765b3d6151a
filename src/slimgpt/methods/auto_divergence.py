"""The sensitivity probes' KL divergences from the dense model, with the LM head run once, not per probe.

For a linear head z = W h + b on the final (normed) hidden state h, a change dh changes every logit by
dz_v = W_v . dh, and the per-token KL divergence of the changed distribution q from the dense p is exactly

    KL(p || q) = log E_{v~p}[exp(dz_v)] - E_{v~p}[dz_v].

The second term is m . dh with m = W^T p, one d-vector per token from the dense head. The first is summed
exactly over each token's ``TOP_K`` most likely tokens T; for the rest (mass tau), its log-mean
exp(dz) is taken to second order, log tau + mu . dh / tau + dh^T C dh / 2, with the tail's exact mean
(mu = sum over the rest of p_v W_v) and a covariance C of the tail's head rows shared by all tokens (their
tau-weighted mean). So a probe costs tokens x TOP_K x d multiply-adds instead of the head's tokens x vocab
x d plus a log-softmax over the vocabulary (SmolLM2-135M: 256 against 49,152 a token), and the
approximation is in the tail only (``TopKDivergence.exact_in`` says where there is none). Measured on
SmolLM2-135M's 60 sensitivity probes at 20% (docs/results/auto_schedule.md): within 0.8% of the exact
KL on average, 2.2% at most, against 7% / 12% with the tail at its mean alone.

Where the model's logits are not this linear head on the decoder's output (a soft cap, a scale), the
check in ``linear_head`` fails and the caller runs the whole head per probe instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TOP_K = 256  # exactly summed tokens per position
GATHER_BUDGET = 1 << 25  # floats of the gathered head rows (tokens x TOP_K x d) or of the logits at a time
TAIL_FLOOR = 1e-9  # tail masses below this count as empty (float64 rounding of 1 - sum over the top)


class _Given(nn.Module):
    """Stands in for all decoder layers: returns the given hidden states, so the model's forward runs only
    its embeddings, final norm and head on them."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        return self.hidden.to(hidden_states.device, hidden_states.dtype)


def run_given(model: nn.Module, windows: torch.Tensor, hidden: torch.Tensor, *, head: bool) -> torch.Tensor:
    """The model's float32 logits (``head``) or the decoder's final hidden states for last-layer outputs
    ``hidden`` [n, S, d] (n a multiple of the windows)."""
    decoder = model.get_decoder()  # type: ignore[operator]
    layers = decoder.layers
    decoder.layers = nn.ModuleList([_Given(hidden)])
    try:
        device = next(model.parameters()).device
        batch = windows.repeat(len(hidden) // len(windows), 1).to(device)
        if head:
            return model(input_ids=batch, use_cache=False).logits.float()
        return decoder(input_ids=batch, use_cache=False).last_hidden_state.float()
    finally:
        decoder.layers = layers


def linear_head(model: nn.Module, final: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
    """The head's weight W in float32 if the dense ``logits`` are W final + b up to the head dtype's
    rounding, else None (the bias cancels in every logit change)."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    if not isinstance(head, nn.Linear):
        return None
    weight = head.weight.detach().float()
    bias = head.bias.detach().float() if head.bias is not None else None
    if final.shape[-1] != weight.shape[1]:
        return None
    mine = F.linear(final.to(weight.device), weight, bias)
    scale = max(float(logits.abs().max()), 1.0)
    rounding = max(1e-4, 2 * torch.finfo(head.weight.dtype).eps)  # a bfloat16 head rounds its logits
    if not bool(torch.isfinite(mine).all()) or float((mine.cpu() - logits.cpu()).abs().max()) > rounding * scale:
        return None
    return weight


class TopKDivergence:
    """Per-token KL(dense || changed) from changes of the final hidden state (module docstring).

    final: the dense final hidden states [tokens, d]; logits: the dense logits [tokens, vocab].
    """

    def __init__(self, weight: torch.Tensor, final: torch.Tensor, logits: torch.Tensor, top_k: int = TOP_K) -> None:
        self.weight, self.final = weight, final.to(weight.device)
        k = min(top_k, weight.shape[0])
        self.chunk = max(1, GATHER_BUDGET // max(k * weight.shape[1], weight.shape[0]))
        parts: list[list[torch.Tensor]] = [[], [], [], []]
        tail_mass = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        for s in range(0, len(final), self.chunk):
            p = torch.softmax(logits[s:s + self.chunk].to(weight.device).double(), -1)
            mean_row = (p.to(weight.dtype) @ weight).double()  # m = W^T p per token
            p_top, top = p.topk(k, -1)
            p.scatter_(1, top, 0.0)  # the tail's probabilities
            tail_mass += p.sum(0)
            for where, x in zip(parts, (p_top, top, mean_row, (p.to(weight.dtype) @ weight).double()), strict=True):
                where.append(x)
        self.p_top, self.top, self.mean_row, self.rest = (torch.cat(x) for x in parts)  # rest: mu per token
        self.tail = (1.0 - self.p_top.sum(-1)).clamp_min(0.0)  # tau
        self.exact_in = self.tail <= TAIL_FLOOR
        self.spread = _tail_covariance(weight, tail_mass, self.rest, self.tail)

    def __call__(self, finals: list[torch.Tensor]) -> list[float]:
        """Mean per-token KL for each changed final hidden state [tokens, d] in ``finals``."""
        sums = [0.0] * len(finals)
        for s in range(0, len(self.final), self.chunk):
            end = s + self.chunk
            rows = self.weight[self.top[s:end]]  # [c, k, d]
            log_p, tail = self.p_top[s:end].log(), self.tail[s:end]
            keep = tail > TAIL_FLOOR
            log_tail = torch.where(keep, tail.clamp_min(1e-300).log(), torch.full_like(tail, -torch.inf))
            for i, final in enumerate(finals):
                dh = final[s:end].to(self.weight.device) - self.final[s:end]
                dz = torch.einsum("tkd,td->tk", rows, dh).double()
                dh64 = dh.double()
                # the tail's log E[exp(dz)]: its exact mean change plus half its variance (shared covariance)
                shift = (self.rest[s:end] * dh64).sum(-1) / tail.clamp_min(1e-300)
                shift = shift + 0.5 * ((dh64 @ self.spread) * dh64).sum(-1)
                terms = torch.cat([log_p + dz, torch.where(keep, log_tail + shift, log_tail)[:, None]], 1)
                kl = torch.logsumexp(terms, 1) - (self.mean_row[s:end] * dh64).sum(-1)
                sums[i] += float(kl.sum())
        return [total / len(self.final) for total in sums]


def _tail_covariance(weight: torch.Tensor, tail_mass: torch.Tensor, rest: torch.Tensor,
                     tail: torch.Tensor) -> torch.Tensor:
    """The tails' covariance of the head rows, tau-weighted over tokens: sum_t tau_t C_t / sum_t tau_t with
    tau_t C_t = sum_tail p_v W_v W_v^T - mu_t mu_t^T / tau_t (float64, d x d)."""
    total = float(tail.sum())
    d = weight.shape[1]
    if total <= TAIL_FLOOR:
        return torch.zeros(d, d, dtype=torch.float64, device=weight.device)
    wide = weight.double()
    second = wide.T @ (tail_mass[:, None] * wide)
    keep = tail > TAIL_FLOOR
    centred = rest[keep] / tail[keep].sqrt()[:, None]
    return (second - centred.T @ centred) / total
