"""MoDeGPT (Lin et al., ICLR 2025) as a slimgpt method: ``--method modegpt``.

MoDeGPT keeps every head and shrinks the three module types of each layer with closed-form solutions
(slimgpt.solver.modegpt):

1. Budget. On the dense model, each layer's block importance BI_l = mean over tokens of
   1 - cos(x_l, x_{l+1}); the per-layer sparsity is phi_l = L * mean_phi * softmax(-BI / eps)_l, capped
   at 0.8 with the excess redistributed. The keep fraction 1 - phi_l applies to the layer's q/k head dim
   (whole RoPE pairs), its V/O rank and its FFN width. slimgpt compares methods at equal decoder-parameter
   count, so mean_phi is solved (bisection) for ``--ratio`` of the decoder parameters, and FFN channels
   are then given back one at a time until the count is within half a channel of the target.
2. Layer by layer on the calibration data as pruned so far, attention first:
   - Q/K (CR decomposition): per KV head, RoPE pairs scored from the diagonals of the head's q and k
     output Grams (its query heads summed); q_proj / k_proj keep the rows of the best pairs, unchanged;
     the kept pairs are the layer's RoPE index.
   - V/O (SVD): per KV group, the rank-k factorisation of C^1/2 W_V [W_O^h ...], C the Gram of
     v_proj's input (a v bias rides along as a constant-one input).
   - FFN (Nystrom): the Gram of down_proj's inputs (with the pruned attention in place); the channels of
     largest ridge leverage stay, down_proj is re-fit by least squares (slimgpt.solver.restore, damping
     ``--percdamp``), gate/up keep their rows.
The output format (per-layer q/k and v head dims, a RoPE index) is slimgpt.models.modegpt. LLaMA-like
families only.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimgpt._util.timing import reset_peak_memory
from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError
from slimgpt.layerwise.capture import Activations, capture_layer_inputs, input_of
from slimgpt.layerwise.checkpoint import Checkpoint
from slimgpt.layerwise.passes import ffn_pass, propagate
from slimgpt.layerwise.run import LayerLoop, RunTotals, assemble_report, run_layers
from slimgpt.methods.base import ModelMethod, ModelRun, register
from slimgpt.methods.modegpt_parts import (
    AttentionGrams,
    attention_weights,
    block_importance,
    check_model,
    layer_cost,
    modegpt_convention,
)
from slimgpt.models.adapters import ModelAdapter, slice_linear
from slimgpt.models.geometry import decoder_params, layer_params, total_params
from slimgpt.models.modegpt import adopt_modegpt_config, modegpt_config_from, replace_attention, shape_layer
from slimgpt.report import LayerReport, PruneReport
from slimgpt.solver.hessian import InputStatistics
from slimgpt.solver.modegpt import LayerDims, keep_top, plan_budget, ridge_leverage
from slimgpt.solver.obs import reconstruction_error
from slimgpt.solver.restore import restore_least_squares

logger = logging.getLogger(__name__)


@register
class ModeGPTMethod(ModelMethod):
    """MoDeGPT: Nystrom FFN, CR query/key pairs, SVD value/output, per-layer budget from block importance."""

    name = "modegpt"
    summary = ("MoDeGPT (Lin et al., ICLR 2025; peer): every head kept and shrunk. FFN channels by ridge leverage "
               "with a\nleast-squares re-fit of down_proj, query/key RoPE pairs by a CR-decomposition score, "
               "value/output by a\nper-head SVD; per-layer budget softmax(-block importance / eps).")
    help = "peer: modular decomposition (MoDeGPT): Nystrom FFN, CR query/key, SVD value/output"
    streaming_refusal = ("measures every layer's block importance on the dense model before pruning any, which "
                         "needs the whole model in memory")
    smoothing = 0.15  # eps of softmax(-BI / eps) (the reference code's config default)
    cap = 0.8  # the largest sparsity of one layer
    leverage_ridge = 0.01  # lambda / mean(diag C) of the ridge-leverage scores
    vo_ridge = 1e-4  # lambda / mean diagonal of W_V^T C W_V in the V/O factorisation

    def __init__(self, config: PruneConfig, smoothing: float | None = None) -> None:
        super().__init__(config)
        if smoothing is not None:
            self.smoothing = smoothing

    def card_options(self, config: dict[str, Any]) -> str:
        return (f"block-importance smoothing {self.smoothing}, per-layer sparsity cap {self.cap}, ridge-leverage "
                f"ridge {self.leverage_ridge}, FFN re-fit damping {config.get('percdamp')}")

    @torch.no_grad()
    def run(self, model: nn.Module, calibration: torch.Tensor, run: ModelRun) -> PruneReport:
        """Prune ``model`` in place to ``config.ratio`` of its decoder parameters; returns the report."""
        config = self.config
        adapter = check_model(model)
        layers = list(adapter.decoder_layers(model))
        loop = LayerLoop(torch.device(config.device), desc="modegpt layers", progress=run.progress,
                         hooks=run.hooks, stop_after_layer=run.stop_after_layer)
        reset_peak_memory(loop.device)
        totals = RunTotals(decoder_params(model, adapter), total_params(model))
        layer_before = [layer_params(layer) for layer in layers]
        checkpoint = Checkpoint(Path(run.checkpoint_dir)) if run.checkpoint_dir else None
        store = torch.device("cpu") if config.offload else loop.device
        with loop.watch.stage("calibration_forward", loop.device):
            hidden, kwargs_by_size = capture_layer_inputs(model, adapter, calibration.long(), config.batch_size,
                                                          loop.device, store)
        acts = Activations(hidden, kwargs_by_size, config.batch_size, loop.device)
        rows: list[LayerReport] = []
        pairs: list[list[list[int]]] = []
        if checkpoint is not None and run.resume and checkpoint.exists():
            plan = self._resume(checkpoint, model, layers, acts, loop, rows, pairs)
        else:
            with loop.watch.stage("block_importance", loop.device):
                importance = block_importance(layers, adapter, acts)
            plan = self._plan(layers, adapter, importance, totals.decoder_params_before)
        dims = [LayerDims(*d) for d in plan["dims"]]

        def step(index: int, layer: nn.Module) -> LayerReport:
            row, kept = self._prune_layer(index, layer, adapter, dims[index], acts, loop)
            row.params_before = layer_before[index]
            row.ratio = 1 - row.params_after / layer_before[index]
            pairs.append(kept)
            return row

        def commit(index: int, layer: nn.Module, done: list[LayerReport]) -> None:
            assert checkpoint is not None
            checkpoint.save(index, layer, {"hidden": acts.hidden},
                            {"config": config.to_dict(), "smoothing": self.smoothing, "plan": plan,
                             "rope_index": pairs, "rows": [asdict(r) for r in done],
                             "stage_seconds": loop.watch.seconds})

        run_layers(layers, rows, loop, step, commit if checkpoint is not None else None)
        if len(rows) == len(layers):
            dense_config: Any = model.config
            adopt_modegpt_config(model, modegpt_config_from(dense_config, [d.qk for d in dims], [d.v for d in dims],
                                                            [d.ffn for d in dims], pairs))
        schedule = {"name": "block-importance", "high": max(plan["sparsity"]), "low": min(plan["sparsity"]),
                    "planned_ratio": plan["planned_ratio"], "ratios": plan["sparsity"],
                    "mean_sparsity": plan["mean_sparsity"], "block_importance": plan["importance"],
                    "smoothing": self.smoothing, "qk_dims": [d.qk for d in dims], "v_dims": [d.v for d in dims],
                    "ffn_dims": [d.ffn for d in dims]}
        report = assemble_report(model, self.name, config, rows, totals, decoder_params(model, adapter), schedule,
                                 calibration, loop, run.model_name)
        report.ratio_convention = modegpt_convention(report, plan["mean_sparsity"])
        return report

    def _plan(self, layers: list[nn.Module], adapter: ModelAdapter, importance: list[float],
              before: int) -> dict[str, Any]:
        """Per-layer sparsities and dims for ``config.ratio`` of the decoder parameters (JSON-ready)."""
        costs = [layer_cost(adapter, layer) for layer in layers]
        target = round(before * (1 - self.config.ratio))
        try:
            mean, sparsity, dims = plan_budget(costs, importance, target, self.smoothing, self.cap)
        except ValueError:
            raise ConfigError(f"--ratio {self.config.ratio} is more than --method modegpt can remove with at most "
                              f"{self.cap:.0%} of each layer's width: use a smaller ratio") from None
        planned = 1 - sum(c.params(d) for c, d in zip(costs, dims, strict=True)) / before
        logger.info("modegpt: block importance %s; sparsity %s (mean %.4f); %.2f%% of decoder parameters",
                    [round(b, 4) for b in importance], [round(p, 3) for p in sparsity], mean, 100 * planned)
        return {"importance": importance, "mean_sparsity": mean, "sparsity": sparsity, "planned_ratio": planned,
                "dims": [[d.qk, d.v, d.ffn] for d in dims]}

    def _resume(self, checkpoint: Checkpoint, model: nn.Module, layers: list[nn.Module], acts: Activations,
                loop: LayerLoop, rows: list[LayerReport], pairs: list[list[list[int]]]) -> dict[str, Any]:
        """Restore the layers an interrupted run finished and its stream; returns its plan."""
        state = checkpoint.resume_state({"config": self.config.to_dict(), "smoothing": self.smoothing})
        rows.extend(LayerReport(**r) for r in state["rows"])
        pairs.extend(state["rope_index"])
        for row in rows:
            qk, v, ffn = state["plan"]["dims"][row.layer]
            shape_layer(layers[row.layer], model.config, row.layer, (qk, v, ffn, pairs[row.layer]))
            layers[row.layer].load_state_dict(checkpoint.load_tensors(f"layer_{row.layer}"))
        acts.hidden = checkpoint.stream()["hidden"].to(acts.hidden.device)
        loop.watch.seconds = state["stage_seconds"]
        logger.info("resuming after layer %d from %s", len(rows) - 1, checkpoint.directory)
        plan: dict[str, Any] = state["plan"]
        return plan

    def _prune_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter, dims: LayerDims,
                     acts: Activations, loop: LayerLoop) -> tuple[LayerReport, list[list[int]]]:
        """Attention (Q/K pairs, V/O rank), then the FFN (Nystrom), then propagate; the row and the RoPE index."""
        attn = adapter.attention(layer)
        config = attn.config
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        grams = AttentionGrams(attn, loop.device)
        if dims.qk < adapter.head_dim or dims.v < adapter.head_dim:
            with loop.watch.stage("attention_grams", loop.device), grams.hooks():
                for _part, h, kw in acts.batches():
                    input_of(adapter.attn_output(layer), partial(adapter.attention_block, layer, h, kw))
        with loop.watch.stage("solve", loop.device):
            weights, kept = attention_weights(attn, grams, adapter.head_dim, n_heads, n_kv, dims, self.vo_ridge)
            replace_attention(layer, config, index, kept, weights)
        row = LayerReport(layer=index, ratio=0.0, heads_kept=n_heads, heads_total=n_heads, kv_heads_kept=n_kv,
                          kv_heads_total=n_kv, ffn_kept=dims.ffn, ffn_total=adapter.mlp_output(layer).in_features,
                          params_before=0, params_after=0)
        if dims.ffn < row.ffn_total:
            stats = InputStatistics(row.ffn_total, loop.device, full=True)
            with loop.watch.stage("hessians", loop.device):
                ffn_pass(layer, adapter, acts, stats, rebuild_attention=False)
            with loop.watch.stage("solve", loop.device):
                self._prune_ffn(layer, adapter, stats, dims.ffn, row)
        with loop.watch.stage("propagation", loop.device):
            propagate(layer, adapter, acts, attention=True)
        row.params_after = layer_params(layer)
        logger.info("layer %d: q/k dim %d, v dim %d, ffn %d/%d", index, dims.qk, dims.v, dims.ffn, row.ffn_total)
        return row, kept

    def _prune_ffn(self, layer: nn.Module, adapter: ModelAdapter, stats: InputStatistics, width: int,
                   row: LayerReport) -> None:
        """Keep the ``width`` channels of largest ridge leverage; re-fit down_proj by least squares."""
        down = adapter.mlp_output(layer)
        H = stats.hessian
        keep = keep_top(ridge_leverage(H, self.leverage_ridge), width)
        dense = down.weight.detach().to(torch.float32)
        refit = restore_least_squares(dense, H, keep, damp=self.config.percdamp)
        dropped = torch.zeros_like(dense)
        dropped[:, keep] = dense[:, keep]
        row.ffn_error = reconstruction_error(dense, refit, H)
        row.ffn_error_uncompensated = reconstruction_error(dense, dropped, H)
        row.kept_channels = keep.tolist()
        down.weight.data.copy_(refit.to(down.weight.dtype))
        paths = adapter.linear_paths()
        for path in paths["mlp_in"].split(","):
            adapter.set_linear(layer, path, slice_linear(layer.get_submodule(path), out_index=keep))  # type: ignore[arg-type]
        adapter.set_linear(layer, paths["mlp_out"], slice_linear(down, in_index=keep))
