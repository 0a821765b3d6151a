"""What a pruning method is: the ``Method`` class with a default for every hook, and the registry.

Two kinds of method:
- ``LayerMethod``: removes attention units and FFN channels layer by layer on the shared driver
  (slimgpt.prune). The driver collects input statistics of o_proj and down_proj on the calibration
  data and hands the method a ``PruneJob`` per weight; the method returns a ``Decision`` (which units go,
  the new weights). Hooks: ``plan`` (per-layer counts, before the loop), ``prepare_layer`` (scores from a
  dense layer's weights), ``prune_attention`` / ``prune_ffn``, and ``prune_layer``, which runs the three
  calibration passes around them (slimgpt.layerwise.passes).
- ``ModelMethod``: owns its loop (SliceGPT rotates the embeddings before the first layer); it runs on the
  same loop, checkpoint and report code (slimgpt.layerwise).

Every method declares its name, the model card's summary and options text and the CLI's help line;
``register`` adds it to ``METHODS``, which the driver, the CLI and the model card read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from slimgpt._util.timing import Stopwatch
from slimgpt.config import PruneConfig
from slimgpt.layerwise.capture import Activations
from slimgpt.layerwise.passes import attention_pass, ffn_pass, propagate
from slimgpt.layerwise.run import LayerHooks
from slimgpt.models.adapters import ModelAdapter
from slimgpt.models.geometry import attention_units, layer_params, model_geometry, units_to_heads
from slimgpt.models.slim import add_zero_bias
from slimgpt.report import LayerReport, PruneReport, decoder_ratio_convention
from slimgpt.solver.hessian import InputStatistics
from slimgpt.solver.obs import reconstruction_error
from slimgpt.solver.schedule import SchedulePlan, plan_schedule


@dataclass
class PruneJob:
    """One weight to prune. ``weight`` is W (d_out x d_in, float32); units are groups of its columns.

    rounds: for attention, greedy rounds (each removes one unit per bucket); for the FFN, the number of
    channels (single columns) to remove.
    """

    weight: torch.Tensor
    stats: InputStatistics | None
    units: torch.Tensor  # [n_units, g] column indices
    rounds: int
    buckets: list[list[int]] | None = None
    layer: int = 0  # index of the decoder layer, for methods that planned per-layer scores beforehand


@dataclass
class Decision:
    removed_units: list[int]
    weight: torch.Tensor  # full-shape new weight; removed columns are zero
    bias_delta: torch.Tensor | None = None  # added to the output bias (FLAP-style compensation)
    info: dict[str, float] = field(default_factory=dict)


class Method:
    """A pruning method. Class attributes declare what it needs; every hook has a default.

    needs_data: uses calibration data at all. needs_layer_inputs: runs the layer-by-layer statistics
    passes (False when the data serves only ``plan``). needs_hessian: the full X X^T of o_proj's and
    down_proj's inputs (else per-feature statistics). plan_reads_weights: ``plan`` reads every layer's
    weights before any is pruned, so the model must be in memory (no ``--stream``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # the model card's description (may span lines)
    help: ClassVar[str] = ""  # one line for ``slimgpt prune --help``
    needs_data: ClassVar[bool] = True
    needs_layer_inputs: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = False
    plan_reads_weights: bool = False  # class-wide, or set per instance (SlimGPT's --schedule auto)
    plan_needs_data: bool = False  # ``plan`` reads the calibration data (else it runs before loading it)
    streaming_refusal: ClassVar[str] = ""  # why this method cannot prune a streamed model, if it cannot
    stock_config: ClassVar[bool] = False  # uniform layers with all heads keep the stock config (PruneNet)

    def __init__(self, config: PruneConfig) -> None:
        self.config = config

    def cannot_stream(self) -> str:
        """Why the method cannot prune a model streamed layer by layer from disk ("" if it can)."""
        if self.streaming_refusal:
            return f"--method {self.name} {self.streaming_refusal}"
        if self.plan_reads_weights:
            return f"--method {self.name} ranks every layer before pruning any, which needs the whole model in memory"
        return ""

    def ratio_convention(self, report: PruneReport) -> str:
        """How the method's own papers quote a pruning ratio, with this run's numbers."""
        return decoder_ratio_convention(report)

    def card_options(self, config: dict[str, Any]) -> str:
        """The options line of the model card."""
        return f"GQA policy {config.get('gqa_policy')}, round-to {config.get('round_to')}"


class LayerMethod(Method):
    """Removes attention units and FFN channels layer by layer on the shared driver."""

    def plan(self, model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor | None) -> SchedulePlan:
        """Per-layer removal counts for the whole model; the default is SlimGPT's ratio schedule."""
        c = self.config
        return plan_schedule(model_geometry(model, adapter, c.gqa_policy), c.ratio, c.schedule, c.first_ratio,
                             c.first_fraction, c.round_to)

    def prepare_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter) -> None:
        """Called with each dense layer before its statistics passes (magnitude scores its weights here)."""

    def prune_attention(self, job: PruneJob) -> Decision:
        """Which attention units of o_proj go, and o_proj's new weight."""
        raise NotImplementedError(f"{type(self).__name__} must decide attention units")  # pragma: no cover

    def prune_ffn(self, job: PruneJob) -> Decision:
        """Which FFN channels of down_proj go, and down_proj's new weight."""
        raise NotImplementedError(f"{type(self).__name__} must decide FFN channels")  # pragma: no cover

    def prune_layer(self, index: int, layer: nn.Module, run: LayerRun) -> LayerReport:
        """Prune one layer on ``run.device``: attention, then FFN, then propagate the activations.

        Pre-norm layers (``adapter.attention_is_residual``) take three passes over the calibration windows
        (slimgpt.layerwise.passes). Post-norm layers, and ``run.rerun_attention`` (the straightforward
        path, for tests), run the attention half in all three.
        """
        adapter = run.adapter
        sizes = adapter.layer_sizes(layer)
        params_before = layer_params(layer)
        self.prepare_layer(index, layer, adapter)
        reuse = run.acts is not None and not run.rerun_attention and adapter.attention_is_residual(layer)
        attn, keep_heads = self._attention_half(index, layer, run, reuse)
        ffn, keep_channels = self._ffn_half(index, layer, run, reuse)
        layer_plan = run.schedule.layers[index]
        row = LayerReport(
            layer=index, ratio=layer_plan.ratio, heads_kept=len(keep_heads), heads_total=sizes.n_heads,
            kv_heads_kept=len((keep_heads // (sizes.n_heads // sizes.n_kv_heads)).unique()),
            kv_heads_total=sizes.n_kv_heads, ffn_kept=len(keep_channels), ffn_total=sizes.ffn_dim,
            params_before=params_before, params_after=params_before - layer_plan.params_removed,
            kept_heads=keep_heads.tolist(), kept_channels=keep_channels.tolist(),
        )
        attn.record(row, "attn")
        ffn.record(row, "ffn")
        if run.compact:
            adapter.shrink_layer(layer, keep_heads, keep_channels)
            row.params_after = layer_params(layer)
        if run.acts is not None:
            with run.watch.stage("propagation", run.device):
                propagate(layer, adapter, run.acts, attention=not reuse, keep_channels=keep_channels)
        return row

    def _attention_half(self, index: int, layer: nn.Module, run: LayerRun,
                        reuse: bool) -> tuple[_Outcome, torch.Tensor]:
        """Statistics of o_proj's inputs, the method's decision, the compensated o_proj; the kept heads."""
        adapter, acts, removed = run.adapter, run.acts, run.schedule.layers[index].attn_units_removed
        sizes = adapter.layer_sizes(layer)
        o_proj = adapter.attn_output(layer)
        stats = InputStatistics(o_proj.in_features, run.device, full=self.needs_hessian) if acts else None
        if acts is not None and (reuse or removed):
            with run.watch.stage("hessians", run.device):
                attention_pass(layer, adapter, acts, stats if removed else None, reuse)
        units, buckets, unit_kind = attention_units(adapter, sizes, self.config.gqa_policy)
        W_o = o_proj.weight.detach().to(torch.float32, copy=True)
        with run.watch.stage("solve", run.device):
            decision = self.prune_attention(PruneJob(W_o.clone(), stats, units, removed, buckets, layer=index))
        write_weight(o_proj, decision)
        gone = units_to_heads(decision.removed_units, unit_kind, sizes)
        keep = torch.tensor([h for h in range(sizes.n_heads) if h not in gone], dtype=torch.long)
        return _Outcome(W_o, decision, stats, units), keep

    def _ffn_half(self, index: int, layer: nn.Module, run: LayerRun, reuse: bool) -> tuple[_Outcome, torch.Tensor]:
        """Statistics of down_proj's inputs (pruned attention in place), the decision, the kept channels."""
        adapter, acts, removed = run.adapter, run.acts, run.schedule.layers[index].channels_removed
        ffn_dim = adapter.layer_sizes(layer).ffn_dim
        down_proj = adapter.mlp_output(layer)
        stats = InputStatistics(down_proj.in_features, run.device, full=self.needs_hessian) if acts else None
        if acts is not None and (reuse or removed):
            with run.watch.stage("hessians" if removed else "propagation", run.device):
                ffn_pass(layer, adapter, acts, stats if removed else None, reuse)
        W_down = down_proj.weight.detach().to(torch.float32, copy=True)
        units = torch.arange(ffn_dim).view(-1, 1)
        with run.watch.stage("solve", run.device):
            decision = self.prune_ffn(PruneJob(W_down.clone(), stats, units, removed, layer=index))
        write_weight(down_proj, decision)
        gone = set(decision.removed_units)
        keep = torch.tensor([c for c in range(ffn_dim) if c not in gone], dtype=torch.long)
        return _Outcome(W_down, decision, stats, units), keep


@dataclass
class LayerRun:
    """What ``LayerMethod.prune_layer`` needs from the driver, the same for every layer.

    acts: the calibration activations (None when the method uses no layer inputs).
    compact: shrink layers physically (False leaves removed parts zero-masked at full shape).
    """

    adapter: ModelAdapter
    schedule: SchedulePlan
    acts: Activations | None
    device: torch.device
    watch: Stopwatch
    compact: bool = True
    rerun_attention: bool = False


@dataclass
class _Outcome:
    """One weight's dense value, the method's decision, the statistics it saw and its units."""

    dense: torch.Tensor
    decision: Decision
    stats: InputStatistics | None
    units: torch.Tensor

    def record(self, row: LayerReport, prefix: str) -> None:
        """Layer-wise output error with the method's weights and with plain dropping (needs the full H)."""
        stats, removed = self.stats, self.decision.removed_units
        if "damping" in self.decision.info:  # the damping the solve ended with (raised when H was not PD)
            setattr(row, f"{prefix}_damping", self.decision.info["damping"])
        if stats is None or not stats.full or not stats.tokens or not removed:
            return
        dropped = self.dense.clone()
        dropped[:, self.units[removed].flatten()] = 0
        setattr(row, f"{prefix}_error", reconstruction_error(self.dense, self.decision.weight, stats.hessian))
        setattr(row, f"{prefix}_error_uncompensated", reconstruction_error(self.dense, dropped, stats.hessian))


def write_weight(linear: nn.Linear, decision: Decision) -> None:
    """Write a decision's weight (and output-bias change) into ``linear``."""
    linear.weight.data.copy_(decision.weight.to(linear.weight.dtype))
    if decision.bias_delta is not None:
        add_zero_bias(linear)  # LLaMA-like layers have none; the slim config records it (layer_output_bias)
        assert linear.bias is not None
        linear.bias.data.add_(decision.bias_delta.to(linear.bias.dtype))


@dataclass
class ModelRun:
    """What a ``ModelMethod`` gets from the driver besides the model and the calibration windows."""

    checkpoint_dir: str | None = None
    resume: bool = False
    model_name: str = ""
    progress: bool = True
    stop_after_layer: int | None = None
    hooks: LayerHooks | None = None


class ModelMethod(Method):
    """A method that owns its loop over the model (on slimgpt.layerwise's loop and checkpoint)."""

    def run(self, model: nn.Module, calibration: torch.Tensor, run: ModelRun) -> PruneReport:
        raise NotImplementedError(f"{type(self).__name__} must implement run")  # pragma: no cover


METHODS: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    METHODS[cls.name] = cls
    return cls
