"""The pieces of MoDeGPT (slimgpt.methods.modegpt) that read a layer: its parameter costs, the dense
model's block importance, the attention statistics and the new attention weights."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from slimgpt.layerwise.capture import Activations
from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.families import stock_llama_like_adapter
from slimgpt.models.geometry import layer_params
from slimgpt.report import PruneReport
from slimgpt.solver.hessian import InputStatistics
from slimgpt.solver.modegpt import LayerCost, LayerDims, keep_top, low_rank_vo, pair_rows, rope_pair_scores


def check_model(model: nn.Module) -> ModelAdapter:
    """The adapter of a stock LLaMA-like model; anything else is refused with one line."""
    return stock_llama_like_adapter(model, "modegpt", "rotary attention, gated FFN")


def layer_cost(adapter: ModelAdapter, layer: nn.Module) -> LayerCost:
    """How a dense layer's parameter count depends on its q/k head dim, v head dim and FFN width."""
    q, k, v = adapter.attn_inputs(layer)
    hd, d = adapter.head_dim, adapter.hidden_size
    n_heads, n_kv = q.out_features // hd, k.out_features // hd
    per_qk = n_heads * (d + (q.bias is not None)) + n_kv * (d + (k.bias is not None))
    per_v = n_kv * (d + (v.bias is not None)) + n_heads * d
    down = adapter.mlp_output(layer)
    per_channel = sum(m.in_features + (m.bias is not None) for m in adapter.mlp_inputs(layer)) + down.out_features
    fixed = layer_params(layer) - hd * (per_qk + per_v) - down.in_features * per_channel
    return LayerCost(fixed, per_qk, per_v, per_channel, hd, down.in_features)


@torch.no_grad()
def block_importance(layers: list[nn.Module], adapter: ModelAdapter, acts: Activations) -> list[float]:
    """BI_l = mean over calibration tokens of 1 - cos(x_l, x_{l+1}) on the dense model (acts unchanged)."""
    hidden = acts.hidden.clone()
    dense = Activations(hidden, acts.kwargs_by_size, acts.batch_size, acts.device)
    scores = []
    for layer in layers:
        home = next(layer.parameters()).device
        layer.to(acts.device)
        total, count = 0.0, 0
        for part, h, kw in dense.batches():
            out = adapter.mlp_block(layer, adapter.attention_block(layer, h, kw))
            cos = torch.nn.functional.cosine_similarity(h.to(torch.float32), out.to(torch.float32), dim=-1)
            total += float((1 - cos).sum())
            count += cos.numel()
            hidden[part] = out.to(hidden.device)
        layer.to(home)
        scores.append(total / max(count, 1))
    return scores


class AttentionGrams:
    """One attention module's statistics: per-feature sums of squares of q_proj's and k_proj's outputs
    (before RoPE) and the Gram of v_proj's input."""

    def __init__(self, attn: Any, device: torch.device) -> None:
        self.attn = attn
        self.q = torch.zeros(attn.q_proj.out_features, dtype=torch.float64, device=device)
        self.k = torch.zeros(attn.k_proj.out_features, dtype=torch.float64, device=device)
        self.x = InputStatistics(attn.v_proj.in_features, device, full=True)

    def hooks(self) -> ExitStack:
        """Hooks that collect the statistics while the attention runs; close the stack to remove them."""
        def add_square(target: torch.Tensor, output: torch.Tensor) -> None:
            target += output.reshape(-1, output.shape[-1]).to(target.device, torch.float64).square().sum(0)

        stack = ExitStack()
        for linear, target in ((self.attn.q_proj, self.q), (self.attn.k_proj, self.k)):
            handle = linear.register_forward_hook(lambda _m, _a, out, t=target: add_square(t, out))
            stack.callback(handle.remove)
        handle = self.attn.v_proj.register_forward_pre_hook(lambda _m, args: self.x.add(args[0]))
        stack.callback(handle.remove)
        return stack

    def value_gram(self, bias: bool) -> torch.Tensor:
        """C of v_proj's input; with a bias, augmented by a constant-one input (last row and column)."""
        H = self.x.hessian.to(torch.float64)
        if not bias:
            return H
        n = H.shape[0]
        out = torch.empty((n + 1, n + 1), dtype=torch.float64, device=H.device)
        out[:n, :n] = H
        out[:n, n] = out[n, :n] = 2 * self.x.mean.to(torch.float64)  # H = 2 E[x x^T]; the one-input: 2 E[x]
        out[n, n] = 2.0
        return out


def _weights(attn: Any) -> dict[str, torch.Tensor]:
    return {name: p.detach().to(torch.float32) for name, p in attn.named_parameters()}


def attention_weights(attn: Any, grams: AttentionGrams, head_dim: int, n_heads: int, n_kv: int, dims: LayerDims,
                      vo_ridge: float) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """The pruned attention's state dict and its RoPE index (kept pairs per KV head, in row order).

    Q/K: each KV head keeps its ``dims.qk / 2`` best RoPE pairs (all, in order, at full dim); V/O: each KV
    group is factorised to rank ``dims.v`` (unchanged at full rank).
    """
    dense, group, hd = _weights(attn), n_heads // n_kv, head_dim
    out = dict(dense)
    kept, q_rows, k_rows = [], [], []
    for g in range(n_kv):
        pairs = torch.arange(hd // 2)
        if dims.qk < hd:
            q_diag = grams.q.view(n_heads, hd)[g * group:(g + 1) * group].sum(0)
            pairs = keep_top(rope_pair_scores(q_diag, grams.k.view(n_kv, hd)[g]), dims.qk // 2).cpu()
        kept.append(pairs.tolist())
        rows = pair_rows(pairs, hd)
        k_rows.append(g * hd + rows)
        q_rows += [h * hd + rows for h in range(g * group, (g + 1) * group)]
    for name, rows in (("q_proj", torch.cat(q_rows)), ("k_proj", torch.cat(k_rows))):
        for kind in ("weight", "bias"):
            if f"{name}.{kind}" in dense:
                out[f"{name}.{kind}"] = dense[f"{name}.{kind}"][rows.to(dense[f"{name}.{kind}"].device)]
    if dims.v < hd:
        out.update(_low_rank_values(dense, grams, hd, n_kv, group, dims.v, vo_ridge))
    return out, kept


def _low_rank_values(dense: dict[str, torch.Tensor], grams: AttentionGrams, hd: int, n_kv: int, group: int,
                     rank: int, ridge: float) -> dict[str, torch.Tensor]:
    """v_proj and o_proj factorised to ``rank`` per KV group (a v bias as a constant-one input column)."""
    bias = "v_proj.bias" in dense
    C = grams.value_gram(bias)
    v_w, o_w = dense["v_proj.weight"], dense["o_proj.weight"]
    v_rows, v_bias, o_cols = [], [], []
    for g in range(n_kv):
        W = v_w[g * hd:(g + 1) * hd]
        if bias:
            W = torch.cat([W, dense["v_proj.bias"][g * hd:(g + 1) * hd, None]], dim=1)
        heads = range(g * group, (g + 1) * group)
        v_new, o_new = low_rank_vo(W, [o_w[:, h * hd:(h + 1) * hd] for h in heads], C, rank, ridge)
        v_rows.append(v_new[:, :-1] if bias else v_new)
        v_bias.append(v_new[:, -1])
        o_cols += o_new
    out = {"v_proj.weight": torch.cat(v_rows), "o_proj.weight": torch.cat(o_cols, dim=1)}
    if bias:
        out["v_proj.bias"] = torch.cat(v_bias)
    return out


def modegpt_convention(report: PruneReport, mean_sparsity: float) -> str:
    """MoDeGPT's own ratio (the mean per-layer sparsity of every module's width) next to slimgpt's."""
    return (f"MoDeGPT quotes a compression ratio, the mean per-layer sparsity applied to each layer's FFN width, "
            f"q/k head dim and V/O rank: {mean_sparsity:.1%} here (before rounding); that removes "
            f"{report.realised_ratio:.2%} of decoder-layer parameters and {report.realised_total_ratio:.2%} of all "
            "parameters (embeddings and lm_head kept)")
