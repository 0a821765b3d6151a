"""The pruning driver: ``prune_model`` runs any registered method on an in-memory model.

A ``LayerMethod`` (SlimGPT and the head/channel baselines) runs on the shared layer-by-layer loop here:
1. ``method.plan`` decides every layer's removal counts (SlimGPT: its ratio schedule; FLAP: a global
   ranking on the dense model; LLM-Pruner: gradients);
2. the calibration windows run through everything before the first decoder layer, and layer 0's inputs
   are kept with the keyword arguments its forward needs (slimgpt.layerwise.capture);
3. each layer, on the compute device, is pruned by ``method.prune_layer`` (statistics passes, the
   method's decisions, physical shrinking, propagation: slimgpt.methods.base) and checkpointed.
A ``ModelMethod`` (SliceGPT) runs its own loop on the same loop and checkpoint code.
Only the layer being pruned is on the compute device; the activations can stay on the CPU (``offload``).
Each finished layer can be checkpointed, and an interrupted run resumed bit for bit.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimgpt._util.timing import reset_peak_memory
from slimgpt.config import PruneConfig
from slimgpt.data import calibration_windows
from slimgpt.errors import ConfigError, DataError
from slimgpt.layerwise.capture import Activations, capture_layer_inputs
from slimgpt.layerwise.checkpoint import Checkpoint, run_fingerprint
from slimgpt.layerwise.run import LayerHooks, LayerLoop, RunTotals, assemble_report, check_finite, run_layers
from slimgpt.methods import METHODS, LayerMethod, Method, ModelMethod, ModelRun, get_method
from slimgpt.methods.base import LayerRun
from slimgpt.models.adapters import LayerSizes, ModelAdapter
from slimgpt.models.families import family_row, get_adapter
from slimgpt.models.geometry import decoder_params, total_params
from slimgpt.models.slim import add_zero_bias, adopt_slim_config, slim_config_from
from slimgpt.report import LayerReport, PruneReport
from slimgpt.solver.schedule import SchedulePlan

logger = logging.getLogger(__name__)

__all__ = ["LayerHooks", "plan", "prune_model"]


def plan(model: nn.Module, config: PruneConfig) -> SchedulePlan:
    """The per-layer schedule that removes ``config.ratio`` of the decoder parameters (SlimGPT's schedule).

    A method with its own ``plan`` (the baselines) decides its per-layer counts inside ``prune_model``.
    """
    return LayerMethod(config).plan(model, get_adapter(model.config), None)


@dataclass
class _Options:
    """prune_model's keyword options, as the layer driver reads them."""

    compact: bool
    checkpoint_dir: str | Path | None
    resume: bool
    model_name: str
    progress: bool
    stop_after_layer: int | None
    layer_hooks: LayerHooks | None
    rerun_attention: bool


@torch.no_grad()
def prune_model(
    model: nn.Module,
    config: PruneConfig,
    calibration: torch.Tensor | None = None,
    tokenizer: Any = None,
    *,
    method: Method | None = None,
    compact: bool = True,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    model_name: str = "",
    progress: bool = True,
    stop_after_layer: int | None = None,
    layer_hooks: LayerHooks | None = None,
    _rerun_attention: bool = False,
) -> PruneReport:
    """Prune ``model`` in place with ``config``; returns the report.

    calibration: [nsamples, seqlen] token ids; if None they are drawn from ``config.calib`` with
    ``tokenizer``. method: a method object (default: the registered ``config.method``), e.g. SlimGPT's
    solver with another allocation. compact=False leaves removed heads/channels zero-masked at full shape
    (for checks). stop_after_layer: stop after pruning that layer (tests use it to simulate a crash).
    layer_hooks: called before a layer is pruned (e.g. to materialise its weights from disk) and after
    (e.g. to write it out and free it); see slimgpt.streaming.
    _rerun_attention: run every layer's attention half in all three passes instead of reusing o_proj's
    inputs (the straightforward path; tests compare the two).
    """
    method = method if method is not None else configured_method(config)
    get_adapter(model.config)  # unsupported families fail here
    refusal = method.cannot_stream()
    if refusal and layer_hooks is not None and layer_hooks.streams_weights:
        raise ConfigError(f"{refusal}: load it without layer streaming")
    options = _Options(compact, checkpoint_dir, resume, model_name, progress, stop_after_layer, layer_hooks,
                       _rerun_attention)
    if isinstance(method, ModelMethod):
        run = ModelRun(str(checkpoint_dir) if checkpoint_dir else None, resume, model_name, progress,
                       stop_after_layer, layer_hooks)
        report = method.run(model, resolve_calibration(config, calibration, tokenizer), run)
    else:
        assert isinstance(method, LayerMethod), f"{type(method).__name__} is neither a layer nor a model method"
        report = _prune_layers(model, method, config, calibration, tokenizer, options)
    report.method_summary = method.summary
    report.method_options = method.card_options(report.config)
    return report


def configured_method(config: PruneConfig) -> Method:
    """``config.method``'s registered method, given the options only it reads (``spread``, ``eps``)."""
    options: dict[str, float] = {}
    if config.spread is not None:
        options["spread"] = config.spread
    if config.eps is not None:
        options["smoothing"] = config.eps
    return METHODS[config.method](config, **options) if options else get_method(config)


def resolve_calibration(config: PruneConfig, calibration: torch.Tensor | None, tokenizer: Any) -> torch.Tensor:
    """The calibration token ids: as given, or drawn from ``config.calib`` with ``tokenizer``."""
    if calibration is None:
        if tokenizer is None:
            raise ConfigError("calibration data is needed: pass calibration token ids or a tokenizer")
        calibration = calibration_windows(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed)
    if calibration.ndim != 2 or calibration.shape[0] < 1:
        raise DataError(f"calibration ids must be [nsamples, seqlen], got shape {tuple(calibration.shape)}")
    return calibration.long()


def _prune_layers(model: nn.Module, method: LayerMethod, config: PruneConfig, calibration: torch.Tensor | None,
                  tokenizer: Any, options: _Options) -> PruneReport:
    """The head/channel driver: plan, capture layer 0's inputs, prune layer by layer, report."""
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    check_finite(model, "the input model")  # what is in memory; streamed layers are checked as they load
    loop = LayerLoop(torch.device(config.device), desc=f"{config.method} layers", progress=options.progress,
                     hooks=options.layer_hooks, stop_after_layer=options.stop_after_layer)
    reset_peak_memory(loop.device)
    schedule, calibration = _plan(model, adapter, method, config, calibration, tokenizer, loop)
    layer_data = calibration if method.needs_layer_inputs else None
    totals = RunTotals(decoder_params(model, adapter), total_params(model))
    dense_output_biases = _output_biases(model, adapter)
    checkpoint = Checkpoint(Path(options.checkpoint_dir)) if options.checkpoint_dir else None
    rows: list[LayerReport] = []
    hidden: torch.Tensor | None = None
    if checkpoint is not None:
        checkpoint.fingerprint = run_fingerprint(model, layers, layer_data)
    if checkpoint and options.resume and checkpoint.exists():
        rows, hidden = _resume(checkpoint, config, adapter, layers, loop)
    acts = _activations(model, adapter, config, layer_data, hidden, loop, first_layer=len(rows))
    run = LayerRun(adapter, schedule, acts, loop.device, loop.watch, options.compact, options.rerun_attention)

    def step(index: int, layer: nn.Module) -> LayerReport:
        row = method.prune_layer(index, layer, run)
        logger.info("layer %d: heads %d/%d, kv %d/%d, ffn %d/%d, o_proj err %s, down_proj err %s",
                    index, row.heads_kept, row.heads_total, row.kv_heads_kept, row.kv_heads_total, row.ffn_kept,
                    row.ffn_total, row.attn_error, row.ffn_error)
        return row

    def commit(index: int, layer: nn.Module, done: list[LayerReport]) -> None:
        assert checkpoint is not None and acts is not None
        state = {"config": config.to_dict(), "rows": [asdict(r) for r in done], "stage_seconds": loop.watch.seconds}
        checkpoint.save(index, layer, {"hidden": acts.hidden}, state)

    run_layers(layers, rows, loop, step, commit if checkpoint is not None and acts is not None else None)
    if options.compact and len(rows) == len(layers):
        _adopt_slim_config(model, adapter, dense_output_biases, method.stock_config)
    after = (decoder_params(model, adapter) if options.compact
             else totals.decoder_params_before - schedule.params_removed)
    summary = {"name": schedule.schedule, "high": schedule.high, "low": schedule.low,
               "planned_ratio": schedule.realised_ratio, "ratios": [p.ratio for p in schedule.layers],
               **schedule.details}
    report = assemble_report(model, method.name, config, rows, totals, after, summary, calibration, loop,
                             options.model_name)
    report.ratio_convention = method.ratio_convention(report)
    return report


def _plan(model: nn.Module, adapter: ModelAdapter, method: LayerMethod, config: PruneConfig,
          calibration: torch.Tensor | None, tokenizer: Any,
          loop: LayerLoop) -> tuple[SchedulePlan, torch.Tensor | None]:
    """The method's per-layer plan and the calibration windows it uses (None when it uses none).

    A plan that needs no data runs first, so an impossible ratio fails before the data is loaded; a plan
    that needs data runs on the dense model, before any checkpointed layer is restored.
    """
    schedule = None
    if not method.plan_needs_data:
        with loop.watch.stage("plan", loop.device):
            schedule = method.plan(model, adapter, None)
    if calibration is not None and not method.needs_data:
        logger.info("--method %s uses no calibration data; the calibration windows are not used", config.method)
        calibration = None
    if method.needs_data:
        calibration = resolve_calibration(config, calibration, tokenizer)
    if schedule is None:
        with loop.watch.stage("plan", loop.device):
            schedule = method.plan(model, adapter, calibration)
    logger.info("schedule %s: per-layer ratios %s; target %.2f%%, realised %.2f%% of decoder parameters",
                schedule.schedule, [round(p.ratio, 4) for p in schedule.layers], 100 * schedule.target_ratio,
                100 * schedule.realised_ratio)
    return schedule, calibration


def _resume(checkpoint: Checkpoint, config: PruneConfig, adapter: ModelAdapter, layers: Any,
            loop: LayerLoop) -> tuple[list[LayerReport], torch.Tensor]:
    """Restore the layers an interrupted run finished; returns their rows and the next layer's inputs."""
    state = checkpoint.resume_state({"config": config.to_dict()})
    rows = [LayerReport(**r) for r in state["rows"]]
    for row in rows:
        sizes = LayerSizes(row.heads_kept, row.kv_heads_kept, row.ffn_kept)
        checkpoint.restore_layer(row.layer, layers[row.layer], adapter, sizes)
    loop.watch.seconds = state["stage_seconds"]
    logger.info("resuming after layer %d from %s", len(rows) - 1, checkpoint.directory)
    store = torch.device("cpu") if config.offload else loop.device
    return rows, checkpoint.stream()["hidden"].to(store)


def _activations(model: nn.Module, adapter: ModelAdapter, config: PruneConfig, layer_data: torch.Tensor | None,
                 hidden: torch.Tensor | None, loop: LayerLoop, first_layer: int) -> Activations | None:
    """The activation store: layer 0's inputs (or the resumed layer's), with the layer kwargs."""
    kwargs_by_size: dict[int, dict[str, Any]] = {}
    if layer_data is not None and first_layer < len(adapter.decoder_layers(model)):
        store = torch.device("cpu") if config.offload else loop.device
        with loop.watch.stage("calibration_forward", loop.device):
            captured, kwargs_by_size = capture_layer_inputs(model, adapter, layer_data, config.batch_size,
                                                            loop.device, store)
        hidden = hidden if hidden is not None else captured
        del captured
    return Activations(hidden, kwargs_by_size, config.batch_size, loop.device) if hidden is not None else None


def _output_biases(model: Any, adapter: ModelAdapter) -> list[bool]:
    """Which o_proj / down_proj of each layer has a bias (two entries per layer)."""
    return [linear.bias is not None for layer in adapter.decoder_layers(model)
            for linear in (adapter.attn_output(layer), adapter.mlp_output(layer))]


def _adopt_slim_config(model: Any, adapter: ModelAdapter, dense_output_biases: list[bool], stock: bool = False) -> None:
    """Give the pruned model its per-layer config and the matching slim class (same forward).

    stock (the method's ``stock_config``): when every layer kept all its heads and the same FFN width, the
    stock config is kept with that width as its FFN size (a plain ``LlamaConfig`` describes the model).

    If the method added an output bias the family does not build (FLAP on LLaMA), the config says so
    (``layer_output_bias``) and every layer gets both biases, so the saved weights match what it builds.
    """
    old = model.config
    layers = adapter.decoder_layers(model)
    sizes = [adapter.layer_sizes(layer) for layer in layers]
    added = any(now and not before for now, before in zip(_output_biases(model, adapter), dense_output_biases,
                                                          strict=True))
    output_bias = added or bool(getattr(old, "layer_output_bias", False))
    heads = (old.num_attention_heads, getattr(old, "num_key_value_heads", None) or old.num_attention_heads)
    if stock and not output_bias and not old.model_type.startswith("slimgpt_") and len(set(sizes)) == 1 \
            and (sizes[0].n_heads, sizes[0].n_kv_heads) == heads:
        setattr(old, family_row(old.model_type).ffn_size_key, sizes[0].ffn_dim)
        return
    if output_bias:  # every layer gets both biases, so the saved weights match what the config builds
        for layer in layers:
            add_zero_bias(adapter.attn_output(layer))
            add_zero_bias(adapter.mlp_output(layer))
    adopt_slim_config(model, slim_config_from(old, sizes, output_bias=output_bias))
