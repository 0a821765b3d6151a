"""SliceGPT (Ashkboos et al., ICLR 2024) as a slimgpt method: ``--method slicegpt``.

SliceGPT removes width from the residual stream instead of heads and FFN channels:

1. Fold the norms. Every norm's scale (and, for LayerNorm, its shift) moves into the linear maps that
   read its output; LayerNorm's centring moves into everything that writes to the stream (the
   embeddings, o_proj and down_proj get zero-mean outputs). Every norm is then a plain RMS norm, which
   commutes with an orthogonal rotation of the stream: the network's function is unchanged.
2. Layer by layer, on the calibration data as transformed so far: take the principal directions Q of the
   normalised signal entering each block (eigenvectors of its covariance, in float64, by decreasing
   eigenvalue; damping 1% of the mean variance, as the authors), rotate that block's readers and the
   previous block's writers into them, and keep the leading ``d`` directions. Each residual connection
   gets a shortcut matrix ``Q_prev[:, :d]^T Q_next[:, :d]`` that maps one block's basis into the next's.
3. The embeddings are rotated into layer 0's basis; the last layer writes back into the original basis at
   full width, so the final norm and lm_head are unchanged (SliceGPT's default: the head is not sliced).
   A tied lm_head is untied first.

slimgpt compares methods at equal decoder-parameter count, so ``--ratio`` is the fraction of decoder
parameters removed, shortcut matrices counted; the slicing width ``d`` (the same for every layer) is the
one whose decoder parameter count is closest to the target. SliceGPT's own papers quote the fraction of
the hidden width sliced, which removes fewer parameters; the report gives both. The sliced structure and
saved format are in slimgpt.models.sliced.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimgpt._util.timing import Stopwatch, reset_peak_memory
from slimgpt.config import PruneConfig
from slimgpt.layerwise.capture import capture_layer_inputs, run_batches
from slimgpt.layerwise.checkpoint import Checkpoint, run_fingerprint
from slimgpt.layerwise.run import LayerLoop, RunTotals, assemble_report, run_layers
from slimgpt.methods.base import ModelMethod, ModelRun, register
from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.families import get_adapter
from slimgpt.models.geometry import decoder_params, layer_params, total_params
from slimgpt.models.rotate import fold_layer_norms, plan_width, rotate_readers, rotate_writer, shortcut, slice_dims_for
from slimgpt.models.sliced import SlicedRMSNorm, layer_widths, resize_sliced_layer, set_embedding_width, sliced_layer
from slimgpt.models.slim import adopt_slim_config, slim_config_from
from slimgpt.report import LayerReport, PruneReport
from slimgpt.solver.pca import Covariance, principal_directions

logger = logging.getLogger(__name__)


@register
class SliceGPTMethod(ModelMethod):
    """SliceGPT: rotate every block's residual stream into its principal directions and slice it."""

    name = "slicegpt"
    summary = ("SliceGPT (Ashkboos et al., ICLR 2024; baseline): norms folded, each block's residual stream rotated "
               "into the\nprincipal directions of its calibration signal and sliced to a narrower width, with "
               "shortcut matrices\n(heads and FFN channels kept).")
    help = "baseline: rotate and slice the residual stream (SliceGPT)"
    streaming_refusal = "rotates the embeddings before the first layer, which needs the whole model in memory"

    def __init__(self, config: PruneConfig, width: int | None = None) -> None:
        super().__init__(config)
        self.width = width  # force the slicing width (tests: the full hidden size gives an equivalent model)

    @torch.no_grad()
    def run(self, model: nn.Module, calibration: torch.Tensor, run: ModelRun) -> PruneReport:
        """Slice ``model`` in place to ``config.ratio`` of its decoder parameters; returns the report."""
        config = self.config
        adapter = get_adapter(model.config)
        adapter.check_sliceable(model)
        layers = list(adapter.decoder_layers(model))
        full = adapter.hidden_size
        loop = LayerLoop(torch.device(config.device), desc=f"{self.name} layers", progress=run.progress,
                         hooks=run.hooks, stop_after_layer=run.stop_after_layer)
        reset_peak_memory(loop.device)
        dims = self.plan_dims(model, adapter, layers, calibration, loop)
        totals = RunTotals(decoder_params(model, adapter), total_params(model))
        layer_before = [layer_params(layer) for layer in layers]
        checkpoint = Checkpoint(Path(run.checkpoint_dir), stream_name="stream") if run.checkpoint_dir else None
        if checkpoint is not None:
            checkpoint.fingerprint = run_fingerprint(model, layers, calibration)
        stream = _Stream(model, adapter, config, loop, dims)
        rows: list[LayerReport] = []
        _untie_head(model)
        if checkpoint and run.resume and checkpoint.exists():
            rows = stream.resume(checkpoint, layers)
        elif adapter.norm_subtracts_mean:
            _center_embeddings(model.get_decoder(), adapter)  # type: ignore[operator]
        stream.start(calibration, checkpoint)

        def step(index: int, layer: nn.Module) -> LayerReport:
            return stream.slice(index, layer, layer_before[index], last=index == len(layers) - 1)

        def commit(index: int, layer: nn.Module, done: list[LayerReport]) -> None:
            assert checkpoint is not None and stream.basis is not None and stream.hidden is not None
            checkpoint.save(index, layer, {"basis": stream.basis, "hidden": stream.hidden},
                            {"config": config.to_dict(), "dims": dims, "rows": [asdict(r) for r in done],
                             "stage_seconds": loop.watch.seconds})

        run_layers(layers, rows, loop, step, commit if checkpoint is not None else None)
        if len(rows) == len(layers):
            _adopt_sliced_config(model, adapter, dims)
        report = assemble_report(model, self.name, config, rows, totals, decoder_params(model, adapter),
                                 self.schedule_summary(dims, full, rows), calibration, loop, run.model_name)
        report.schedule["planned_ratio"] = report.realised_ratio
        report.ratio_convention = self.slicing_convention(report, dims, full)
        return report

    def plan_dims(self, model: nn.Module, adapter: ModelAdapter, layers: list[nn.Module], calibration: torch.Tensor,
                  loop: LayerLoop) -> list[int]:
        """The stream widths ``slice_dims`` (slimgpt.models.sliced), planned on the dense model before any work.

        SliceGPT: one width for every stream, the one whose decoder parameter count is closest to the target.
        """
        config, full = self.config, adapter.hidden_size
        width = self.width if self.width is not None else plan_width(adapter, layers, config.ratio, config.round_to)
        logger.info("slicegpt: hidden width %d -> %d (%.1f%% sliced) for %.1f%% of decoder parameters", full, width,
                    100 * (1 - width / full), 100 * config.ratio)
        return slice_dims_for(len(layers), width, full)

    def schedule_summary(self, dims: list[int], full: int, rows: list[LayerReport]) -> dict[str, Any]:
        """The report's ``schedule``: the slicing planned (``planned_ratio`` is filled in afterwards)."""
        width = dims[0]
        return {"name": "uniform-slicing", "high": 1 - width / full, "low": 1 - width / full,
                "planned_ratio": None, "ratios": [r.ratio for r in rows], "slice_dims": dims}

    def slicing_convention(self, report: PruneReport, dims: list[int], full: int) -> str:
        """The report's ``ratio_convention``: the method's own ratio next to slimgpt's."""
        return slicing_convention(report, dims[0], full)


class _Stream:
    """The calibration signals (original basis, full width) and the current layer's input basis."""

    def __init__(self, model: Any, adapter: ModelAdapter, config: PruneConfig, loop: LayerLoop,
                 dims: list[int]) -> None:
        self.model, self.adapter, self.config, self.loop, self.dims = model, adapter, config, loop, dims
        self.store = torch.device("cpu") if config.offload else loop.device
        self.basis: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self.kwargs_by_size: dict[int, dict[str, Any]] = {}

    def resume(self, checkpoint: Checkpoint, layers: list[nn.Module]) -> list[LayerReport]:
        """Restore the embeddings, the finished layers and the stream of an interrupted run."""
        state = checkpoint.resume_state({"config": self.config.to_dict(), "dims": self.dims})
        decoder = self.model.get_decoder()
        for path, weight in checkpoint.load_tensors("embeddings").items():
            set_embedding_width(decoder.get_submodule(path), weight, self.dims[0])
        rows = [LayerReport(**r) for r in state["rows"]]
        for row in rows:
            resize_sliced_layer(layers[row.layer], self.adapter, layer_widths(self.dims, row.layer),
                                self.adapter.hidden_size)
            layers[row.layer].load_state_dict(checkpoint.load_tensors(f"layer_{row.layer}"))
        stream = checkpoint.stream()
        self.basis, self.hidden = stream["basis"].to(self.loop.device), stream["hidden"].to(self.store)
        self.loop.watch.seconds = state["stage_seconds"]
        logger.info("resuming after layer %d from %s", len(rows) - 1, checkpoint.directory)
        return rows

    def start(self, calibration: torch.Tensor, checkpoint: Checkpoint | None) -> None:
        """Layer 0's inputs (on resume only the layer kwargs are needed); rotate the embeddings."""
        device, watch = self.loop.device, self.loop.watch
        with watch.stage("calibration_forward", device):
            captured, self.kwargs_by_size = capture_layer_inputs(self.model, self.adapter, calibration.long(),
                                                                 self.config.batch_size, device, self.store)
        if self.hidden is not None:
            return
        self.hidden = captured
        with watch.stage("pca", device):
            cov = Covariance(self.adapter.hidden_size, device)
            for _, h, _kw in run_batches(self.hidden, self.kwargs_by_size, self.config.batch_size, device):
                cov.add(h)
            self.basis = principal_directions(cov.matrix)
        decoder = self.model.get_decoder()
        embeddings = {}
        for path in self.adapter.embedding_paths():
            embedding = decoder.get_submodule(path)
            set_embedding_width(embedding, embedding.weight.detach().double() @ self.basis[:, :self.dims[0]],
                                self.dims[0])
            embeddings[path] = embedding.weight
        if checkpoint is not None:
            checkpoint.save_tensors("embeddings", embeddings)

    def slice(self, index: int, layer: nn.Module, params_before: int, last: bool) -> LayerReport:
        """Slice one layer (on the loop's device) and report its widths."""
        assert self.basis is not None and self.hidden is not None
        widths = layer_widths(self.dims, index)
        self.basis = _slice_layer(layer, self.adapter, widths, self.basis, self.hidden, self.kwargs_by_size,
                                  self.config, self.loop.device, self.loop.watch, last=last)
        sizes = self.adapter.layer_sizes(layer)
        after = layer_params(layer)
        logger.info("layer %d: widths %s, %d -> %d parameters", index, list(widths), params_before, after)
        return LayerReport(layer=index, ratio=1 - after / params_before, heads_kept=sizes.n_heads,
                           heads_total=sizes.n_heads, kv_heads_kept=sizes.n_kv_heads,
                           kv_heads_total=sizes.n_kv_heads, ffn_kept=sizes.ffn_dim, ffn_total=sizes.ffn_dim,
                           params_before=params_before, params_after=after, widths=list(widths))


def _untie_head(model: Any) -> None:
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False


def _center_embeddings(decoder: Any, adapter: ModelAdapter) -> None:
    for path in adapter.embedding_paths():
        embedding = decoder.get_submodule(path)
        weight = embedding.weight.detach().double()
        set_embedding_width(embedding, weight - weight.mean(1, keepdim=True), weight.shape[1])


def _apply(signal: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Coordinates of ``signal`` (original basis) in ``basis`` (float32 product, signal's dtype)."""
    return (signal.to(torch.float32) @ basis.to(signal.device, torch.float32)).to(signal.dtype)


def _slice_layer(layer: Any, adapter: ModelAdapter, widths: tuple[int, int, int], basis: torch.Tensor,
                 hidden: torch.Tensor, kwargs_by_size: dict[int, dict[str, Any]], config: PruneConfig,
                 device: torch.device, watch: Stopwatch, last: bool) -> torch.Tensor:
    """Fold, rotate and slice one layer; ``hidden`` becomes its outputs. Returns the next layer's basis.

    ``hidden`` holds the signals in the original basis at full width (what the sliced network computes,
    mapped back); ``basis`` is the basis of this layer's input (its first ``widths[0]`` columns are kept).
    """
    d_in, d_mid, d_out = widths
    paths = adapter.linear_paths()
    full = adapter.hidden_size
    attn_norm, mlp_norm = adapter.norm_paths()
    fold_layer_norms(layer, adapter)
    sliced_layer(layer, adapter)
    like = adapter.attn_output(layer)
    q_in = basis[:, :d_in].to(device)
    rotate_readers(layer, adapter, [paths["q"], paths["k"], paths["v"]], q_in)
    setattr(layer, attn_norm, SlicedRMSNorm(d_in, full, layer.get_submodule(attn_norm).eps, like.weight.device,
                                            like.weight.dtype))
    layer.attn_shortcut = shortcut(q_in, like)  # back to the original basis while the middle basis is found
    cov = Covariance(full, device)
    with watch.stage("layer_passes", device):
        for part, h, kw in run_batches(hidden, kwargs_by_size, config.batch_size, device):
            mid = layer.attention_half(_apply(h, q_in), **kw)
            cov.add(mid)
            hidden[part] = mid.to(hidden.device)
    with watch.stage("pca", device):
        q_mid = principal_directions(cov.matrix)[:, :d_mid]
    layer.attn_shortcut = shortcut(q_mid.T @ q_in, like)
    rotate_writer(layer, adapter, paths["o"], q_mid)
    rotate_readers(layer, adapter, paths["mlp_in"].split(","), q_mid)
    setattr(layer, mlp_norm, SlicedRMSNorm(d_mid, full, layer.get_submodule(mlp_norm).eps, like.weight.device,
                                           like.weight.dtype))
    layer.mlp_shortcut = shortcut(q_mid, like)
    cov = Covariance(full, device)
    with watch.stage("layer_passes", device):
        for part, h, _kw in run_batches(hidden, kwargs_by_size, config.batch_size, device):
            out = layer.mlp_half(_apply(h, q_mid))
            if not last:
                cov.add(out)
            hidden[part] = out.to(hidden.device)
    with watch.stage("pca", device):
        next_basis = (torch.eye(full, dtype=torch.float64, device=device) if last
                      else principal_directions(cov.matrix))
    q_out = next_basis[:, :d_out]
    layer.mlp_shortcut = shortcut(q_out.T @ q_mid, like)
    rotate_writer(layer, adapter, paths["mlp_out"], q_out)
    return next_basis



def _adopt_sliced_config(model: Any, adapter: ModelAdapter, dims: list[int]) -> None:
    old = model.config
    sizes = [adapter.layer_sizes(layer) for layer in adapter.decoder_layers(model)]
    output_bias = bool(getattr(old, "layer_output_bias", False))
    adopt_slim_config(model, slim_config_from(old, sizes, output_bias=output_bias, slice_dims=dims))


def slicing_convention(report: PruneReport, width: int, full: int) -> str:
    """SliceGPT's own ratio (hidden width sliced) next to slimgpt's (decoder parameters removed)."""
    return (f"SliceGPT quotes the fraction of the hidden width sliced: {1 - width / full:.1%} here ({width} of "
            f"{full} dimensions kept); that removes {report.realised_ratio:.2%} of decoder-layer parameters, "
            f"shortcut matrices counted, and {report.realised_total_ratio:.2%} of all parameters (embeddings "
            "sliced; a tied lm_head is untied and kept whole)")
