"""The layer-by-layer driver shared by every method (method spec section 2).

1. Run the calibration windows through everything before the first decoder layer and keep layer 0's
   inputs together with the keyword arguments its forward needs (mask, rotary embeddings, ...).
2. For each layer, on the compute device, three passes over the calibration windows:
   a. the attention half up to o_proj: statistics of o_proj's inputs (the per-head attention outputs),
      which are also kept on the activation store. The method decides which heads go; the compensated
      o_proj is written.
   b. the attention half's new output, h + o_proj(kept inputs): removing heads leaves the kept heads'
      outputs unchanged, so no q/k/v or softmax runs again. It overwrites the layer's inputs; the FFN half
      runs up to down_proj for the statistics of down_proj's inputs. The method decides which channels
      go; down_proj is written and the layer shrunk physically.
   c. propagation: the pruned FFN half on (b)'s output gives the next layer's inputs.
   Every statistics pass stops at the hooked linear: nothing after it is needed. Post-norm layers
   (OPT-350m), where a LayerNorm follows the residual add, run the whole attention half in (b) and (c).
A method may plan before the loop (``method.plan``: the baselines' uniform ratios, FLAP's global
ranking, LLM-Pruner's gradients); SlimGPT uses ``plan_schedule``. Methods that need no data (magnitude)
skip every calibration pass.
Only the layer being pruned is on the compute device; the activations (layer inputs, o_proj inputs) can
stay on the CPU (``offload``).
Each finished layer can be checkpointed, and an interrupted run resumed bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from slimgpt.adapters import LayerSizes, ModelAdapter, get_adapter, head_columns
from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError, DataError
from slimgpt.methods import Decision, PruneJob, get_method
from slimgpt.modeling import add_zero_bias, adopt_slim_config, slim_config_from
from slimgpt.report import LayerReport, PruneReport, decoder_ratio_convention
from slimgpt.solver.hessian import InputStatistics
from slimgpt.solver.obs import reconstruction_error
from slimgpt.solver.schedule import LayerGeometry, SchedulePlan, plan_schedule

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the layer-0 hook to stop the model's forward once the inputs are captured."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.hidden = hidden
        self.kwargs = kwargs


class LayerHooks:
    """Callbacks around each layer of the driver; the default does nothing."""

    def before(self, index: int, layer: nn.Module) -> None:
        """Called before layer ``index`` moves to the compute device."""

    def after(self, index: int, layer: nn.Module) -> None:
        """Called after layer ``index`` is pruned and its outputs propagated."""


# --- geometry and parameter counting -----------------------------------------------------------------

def linear_params(linear: nn.Linear) -> int:
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


def layer_params(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


def decoder_params(model: nn.Module, adapter: ModelAdapter) -> int:
    return sum(layer_params(layer) for layer in adapter.decoder_layers(model))


def attention_units(
    adapter: ModelAdapter, sizes: LayerSizes, policy: str
) -> tuple[torch.Tensor, list[list[int]] | None, str]:
    """The removable attention units of a layer as groups of o_proj columns.

    MHA: one unit per head. GQA kv-group: one unit per KV group (all its query heads). GQA query-heads:
    one unit per query head, bucketed by KV group so every group loses the same number.
    Returns (units [n_units, g], buckets, kind).
    """
    hd = adapter.head_dim
    group = sizes.n_heads // sizes.n_kv_heads
    heads = torch.arange(sizes.n_heads)
    if group == 1:
        return head_columns(heads, hd).view(sizes.n_heads, hd), None, "head"
    if policy == "kv-group":
        return head_columns(heads, hd).view(sizes.n_kv_heads, group * hd), None, "kv-group"
    buckets = [list(range(g * group, (g + 1) * group)) for g in range(sizes.n_kv_heads)]
    return head_columns(heads, hd).view(sizes.n_heads, hd), buckets, "query-head"


def layer_geometry(adapter: ModelAdapter, layer: nn.Module, policy: str) -> LayerGeometry:
    """How many units a layer has and how many parameters each one removes."""
    sizes = adapter.layer_sizes(layer)
    hd, d = adapter.head_dim, adapter.hidden_size
    q, k, v = adapter.attn_inputs(layer)
    q_per_head = hd * (d + (q.bias is not None))
    kv_per_head = hd * (2 * d + (k.bias is not None) + (v.bias is not None))
    o_per_head = hd * d
    group = sizes.n_heads // sizes.n_kv_heads
    if group == 1:
        units, per_unit = sizes.n_heads, q_per_head + kv_per_head + o_per_head
    elif policy == "kv-group":
        units, per_unit = sizes.n_kv_heads, group * (q_per_head + o_per_head) + kv_per_head
    else:  # one query head from every group per unit
        units, per_unit = group, sizes.n_kv_heads * (q_per_head + o_per_head)
    per_channel = sum(m.in_features + (m.bias is not None) for m in adapter.mlp_inputs(layer))
    per_channel += adapter.mlp_output(layer).out_features
    return LayerGeometry(units, per_unit, sizes.ffn_dim, per_channel, layer_params(layer))


def plan(model: nn.Module, config: PruneConfig) -> SchedulePlan:
    """The per-layer schedule that removes ``config.ratio`` of the decoder parameters.

    This is SlimGPT's ratio schedule; a method with its own ``plan`` hook (the baselines) decides its
    per-layer counts inside ``prune_model`` instead.
    """
    adapter = get_adapter(model.config)
    geometries = [layer_geometry(adapter, layer, config.gqa_policy) for layer in adapter.decoder_layers(model)]
    return plan_schedule(geometries, config.ratio, config.schedule, config.first_ratio, config.first_fraction,
                         config.round_to)


# --- memory and timing --------------------------------------------------------------------------------

def peak_memory(device: torch.device) -> int:
    """Peak bytes: CUDA max allocated on a GPU, else this process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _Stopwatch:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, device: torch.device) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# --- capture ---------------------------------------------------------------------------------------------

def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor, batch_size: int,
                         device: torch.device, store: torch.device) -> tuple[torch.Tensor, dict[int, dict[str, Any]]]:
    """Inputs of decoder layer 0 for every window, and the layer kwargs for each batch size.

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

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        raise _StopForward(hidden, kwargs)

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
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


@contextmanager
def _collect_inputs(linear: nn.Linear, stats: InputStatistics) -> Iterator[None]:
    handle = linear.register_forward_pre_hook(lambda _m, args: stats.add(args[0]))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def dense_input_statistics(model: nn.Module, adapter: ModelAdapter, calibration: torch.Tensor, config: PruneConfig,
                           full: bool = False) -> list[tuple[InputStatistics, InputStatistics]]:
    """Statistics of every layer's o_proj and down_proj inputs on the unpruned model, in one pass.

    For methods that rank all layers before pruning any (FLAP). Each layer visits the compute device
    in turn, as in the pruning loop; returns one (o_proj, down_proj) pair per layer.
    """
    device = torch.device(config.device)
    store = torch.device("cpu") if config.offload else device
    hidden, kwargs_by_size = capture_layer_inputs(model, adapter, calibration.long(), config.batch_size, device,
                                                  store)
    result = []
    for layer in adapter.decoder_layers(model):
        home = next(layer.parameters()).device
        layer.to(device)
        o_proj, down_proj = adapter.attn_output(layer), adapter.mlp_output(layer)
        attn = InputStatistics(o_proj.in_features, device, full=full)
        ffn = InputStatistics(down_proj.in_features, device, full=full)
        with _collect_inputs(o_proj, attn), _collect_inputs(down_proj, ffn):
            for part, h, kw in _run_batches(hidden, kwargs_by_size, config.batch_size, device):
                hidden[part] = adapter.mlp_block(layer, adapter.attention_block(layer, h, kw)).to(hidden.device)
        layer.to(home)
        result.append((attn, ffn))
    return result


# --- checkpoints ----------------------------------------------------------------------------------------

def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Checkpoint:
    """Per-layer progress on disk: the pruned layers so far, the next layer's inputs, the report rows."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def state_path(self) -> Path:
        return self.directory / "state.json"

    def exists(self) -> bool:
        return self.state_path.exists()

    def layer_path(self, index: int) -> Path:
        """The pruned weights of layer ``index`` (its state dict, keys relative to the layer)."""
        return self.directory / f"layer_{index}.safetensors"

    def save(self, layer_index: int, layer: nn.Module, hidden: torch.Tensor, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_save_tensors(layer.state_dict(), self.layer_path(layer_index))
        _atomic_save_tensors({"hidden": hidden}, self.directory / "hidden.safetensors")
        _atomic_write_text(json.dumps(state), self.state_path)  # last: it commits the layer

    def load_state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.state_path.read_text())
        return state

    def restore_layer(self, index: int, layer: nn.Module, adapter: ModelAdapter, sizes: LayerSizes) -> None:
        adapter.resize_layer(layer, sizes)
        state = load_file(str(self.layer_path(index)))
        for name, module in layer.named_modules():  # output biases a method added (FLAP)
            if isinstance(module, nn.Linear) and module.bias is None and f"{name}.bias" in state:
                add_zero_bias(module)
        layer.load_state_dict(state)

    def hidden(self) -> torch.Tensor:
        return load_file(str(self.directory / "hidden.safetensors"))["hidden"]


# --- the driver --------------------------------------------------------------------------------------------

def _versions() -> dict[str, str]:
    import transformers

    from slimgpt import __version__

    return {"slimgpt": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def _units_to_heads(removed_units: list[int], unit_kind: str, sizes: LayerSizes) -> set[int]:
    group = sizes.n_heads // sizes.n_kv_heads
    if unit_kind == "kv-group":
        return {u * group + j for u in removed_units for j in range(group)}
    return set(removed_units)


def _write_weight(linear: nn.Linear, decision: Decision) -> None:
    linear.weight.data.copy_(decision.weight.to(linear.weight.dtype))
    if decision.bias_delta is not None:
        add_zero_bias(linear)  # LLaMA-like layers have none; the slim config records it (layer_output_bias)
        assert linear.bias is not None
        linear.bias.data.add_(decision.bias_delta.to(linear.bias.dtype))


@torch.no_grad()
def prune_model(
    model: nn.Module,
    config: PruneConfig,
    calibration: torch.Tensor | None = None,
    tokenizer: Any = None,
    *,
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
    ``tokenizer``. compact=False leaves removed heads/channels zero-masked at full shape (for checks).
    stop_after_layer: stop after pruning that layer (tests use it to simulate a crash).
    layer_hooks: called before a layer is pruned (e.g. to materialise its weights from disk) and after
    (e.g. to write it out and free it); see slimgpt.streaming.
    _rerun_attention: run every layer's attention half in all three passes instead of reusing o_proj's
    inputs (the straightforward path; tests compare the two).
    """
    adapter = get_adapter(model.config)
    if config.method == "slicegpt":
        return _slice(model, config, calibration, tokenizer, checkpoint_dir=checkpoint_dir, resume=resume,
                      model_name=model_name, progress=progress, stop_after_layer=stop_after_layer,
                      layer_hooks=layer_hooks)
    method = get_method(config)
    device = torch.device(config.device)
    store = torch.device("cpu") if config.offload else device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    method_plan = getattr(method, "plan", None)
    if method_plan is not None and layer_hooks is not None and getattr(method, "plan_reads_weights", False):
        raise ConfigError(f"--method {config.method} ranks every layer before pruning any, which needs the whole "
                          "model in memory: load it without layer streaming")
    schedule = plan(model, config) if method_plan is None else None  # fails fast on impossible ratios
    layers = adapter.decoder_layers(model)
    watch = _Stopwatch()

    if calibration is not None and not method.needs_data:
        logger.info("--method %s uses no calibration data; the calibration windows are not used", config.method)
        calibration = None
    if method.needs_data:
        calibration = _calibration(config, calibration, tokenizer)
    if method_plan is not None:  # on the dense model, before any checkpointed layer is restored
        with watch.stage("plan", device):
            schedule = method_plan(model, adapter, calibration, config)
    assert schedule is not None
    # Methods whose data serves only their plan (LLM-Pruner's gradients) skip the layer-by-layer passes.
    layer_data = calibration if getattr(method, "needs_layer_inputs", method.needs_data) else None

    params_before = decoder_params(model, adapter)
    dense_output_biases = _output_biases(model, adapter)
    total_before = sum(p.numel() for p in model.parameters())
    logger.info("schedule %s: per-layer ratios %s; target %.2f%%, realised %.2f%% of decoder parameters",
                schedule.schedule, [round(p.ratio, 4) for p in schedule.layers], 100 * schedule.target_ratio,
                100 * schedule.realised_ratio)

    checkpoint = Checkpoint(Path(checkpoint_dir)) if checkpoint_dir else None
    rows: list[LayerReport] = []
    first_layer = 0
    hidden: torch.Tensor | None = None
    if checkpoint and resume and checkpoint.exists():
        state = checkpoint.load_state()
        if state["config"] != config.to_dict():
            raise ConfigError(f"the checkpoint in {checkpoint.directory} was made with other options: "
                              "resume with the same options, or remove it to start over")
        rows = [LayerReport(**r) for r in state["rows"]]
        for row in rows:
            sizes = LayerSizes(row.heads_kept, row.kv_heads_kept, row.ffn_kept)
            checkpoint.restore_layer(row.layer, layers[row.layer], adapter, sizes)
        watch.seconds = state["stage_seconds"]
        first_layer = len(rows)
        hidden = checkpoint.hidden().to(store)
        logger.info("resuming after layer %d from %s", first_layer - 1, checkpoint.directory)

    kwargs_by_size: dict[int, dict[str, Any]] = {}
    if layer_data is not None and first_layer < len(layers):
        with watch.stage("calibration_forward", device):
            captured, kwargs_by_size = capture_layer_inputs(model, adapter, layer_data, config.batch_size,
                                                            device, store)
        hidden = hidden if hidden is not None else captured
        del captured
    acts = _Activations(hidden, kwargs_by_size, config.batch_size, device) if hidden is not None else None

    bar = tqdm(range(first_layer, len(layers)), desc=f"{config.method} layers", disable=not progress)
    for index in bar:
        start = time.perf_counter()
        layer = layers[index]
        if layer_hooks is not None:
            layer_hooks.before(index, layer)
        home = next(layer.parameters()).device
        layer.to(device)
        row = _prune_layer(index, layer, adapter, method, config, schedule, acts, device, watch, compact,
                           _rerun_attention)
        layer.to(home)
        row.seconds = time.perf_counter() - start
        row.peak_memory_bytes = peak_memory(device)
        rows.append(row)
        logger.info("layer %d: heads %d/%d, kv %d/%d, ffn %d/%d, o_proj err %s, down_proj err %s",
                    index, row.heads_kept, row.heads_total, row.kv_heads_kept, row.kv_heads_total, row.ffn_kept,
                    row.ffn_total, row.attn_error, row.ffn_error)
        if checkpoint is not None and acts is not None:
            state = {"config": config.to_dict(), "rows": [asdict(r) for r in rows], "stage_seconds": watch.seconds}
            checkpoint.save(index, layer, acts.hidden, state)
        if layer_hooks is not None:
            layer_hooks.after(index, layer)
        if stop_after_layer is not None and index >= stop_after_layer:
            break

    if compact and len(rows) == len(layers):
        _adopt_slim_config(model, adapter, dense_output_biases)
    report = PruneReport(
        model=model_name or str(getattr(model.config, "_name_or_path", "")),
        method=config.method,
        config=config.to_dict(),
        layers=rows,
        decoder_params_before=params_before,
        decoder_params_after=decoder_params(model, adapter) if compact
        else params_before - schedule.params_removed,
        total_params_before=total_before,
        total_params_after=sum(p.numel() for p in model.parameters()),
        target_ratio=config.ratio,
        schedule={"name": schedule.schedule, "high": schedule.high, "low": schedule.low,
                  "planned_ratio": schedule.realised_ratio, "ratios": [p.ratio for p in schedule.layers]},
        calibration={"source": config.calib, "nsamples": int(calibration.shape[0]) if calibration is not None else 0,
                     "seqlen": int(calibration.shape[1]) if calibration is not None else 0, "seed": config.seed},
        stage_seconds=dict(watch.seconds),
        peak_memory_bytes=peak_memory(device),
        device=str(device),
        versions=_versions(),
    )
    describe = getattr(method, "ratio_convention", None)
    report.ratio_convention = describe(report) if describe is not None else decoder_ratio_convention(report)
    return report


def _calibration(config: PruneConfig, calibration: torch.Tensor | None, tokenizer: Any) -> torch.Tensor:
    """The calibration token ids: as given, or drawn from ``config.calib`` with ``tokenizer``."""
    if calibration is None:
        if tokenizer is None:
            raise ConfigError("calibration data is needed: pass calibration token ids or a tokenizer")
        from slimgpt.data import calibration_windows

        calibration = calibration_windows(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed)
    if calibration.ndim != 2 or calibration.shape[0] < 1:
        raise DataError(f"calibration ids must be [nsamples, seqlen], got shape {tuple(calibration.shape)}")
    return calibration.long()


def _slice(model: nn.Module, config: PruneConfig, calibration: torch.Tensor | None, tokenizer: Any,
           layer_hooks: LayerHooks | None, **kwargs: Any) -> PruneReport:
    """``--method slicegpt``: rotate and slice the residual stream (slimgpt.slicegpt)."""
    from slimgpt.slicegpt import slice_model

    if layer_hooks is not None:
        raise ConfigError("--method slicegpt rotates the embeddings before the first layer, which needs the whole "
                          "model in memory: load it without layer streaming")
    return slice_model(model, config, _calibration(config, calibration, tokenizer), **kwargs)


def _run_batches(hidden: torch.Tensor, kwargs_by_size: dict[int, dict[str, Any]], batch_size: int,
                 device: torch.device) -> Iterator[tuple[slice, torch.Tensor, dict[str, Any]]]:
    for start in range(0, hidden.shape[0], batch_size):
        part = slice(start, min(start + batch_size, hidden.shape[0]))
        h = hidden[part].to(device)
        yield part, h, {k: _to(v, device) for k, v in kwargs_by_size[h.shape[0]].items()}


@dataclass
class _Activations:
    """The calibration activations the layer passes read and write, on the store (CPU with offload).

    hidden: [N, S, d], the current layer's inputs; the passes overwrite them with the layer's outputs.
    inner: [N, S, heads * head_dim], o_proj's inputs in the current layer (pre-norm layers only), so the
    attention half with a new o_proj is one matmul. Allocated once and reused by every layer.
    """

    hidden: torch.Tensor
    kwargs_by_size: dict[int, dict[str, Any]]
    batch_size: int
    device: torch.device
    inner: torch.Tensor | None = None

    def batches(self) -> Iterator[tuple[slice, torch.Tensor, dict[str, Any]]]:
        """(windows, layer inputs on the device, layer kwargs on the device) for each batch."""
        return _run_batches(self.hidden, self.kwargs_by_size, self.batch_size, self.device)

    def keep_inner(self, part: slice, x: torch.Tensor) -> None:
        """Store o_proj's input ``x`` [B, S, heads * head_dim] of the windows ``part``."""
        if self.inner is None or self.inner.shape[-1] != x.shape[-1] or self.inner.dtype != x.dtype:
            self.inner = torch.empty((*self.hidden.shape[:2], x.shape[-1]), dtype=x.dtype, device=self.hidden.device)
        self.inner[part] = x.to(self.inner.device)


class _StopAtInput(Exception):
    """Raised by a forward pre-hook once the hooked linear's input is known."""

    def __init__(self, inputs: torch.Tensor) -> None:
        super().__init__()
        self.inputs = inputs


def _input_of(linear: nn.Linear, forward: Callable[[], object]) -> torch.Tensor:
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


def _attention_pass(layer: nn.Module, adapter: ModelAdapter, acts: _Activations, stats: InputStatistics | None,
                    keep: bool) -> None:
    """Run the dense attention half up to o_proj: o_proj's input statistics, and (``keep``) its inputs."""
    o_proj = adapter.attn_output(layer)
    for part, h, kw in acts.batches():
        x = _input_of(o_proj, partial(adapter.attention_block, layer, h, kw))
        if stats is not None:
            stats.add(x)
        if keep:
            acts.keep_inner(part, x)


def _ffn_pass(layer: nn.Module, adapter: ModelAdapter, acts: _Activations, stats: InputStatistics | None,
              rebuild_attention: bool) -> None:
    """Run the layer up to down_proj with the pruned o_proj in place: down_proj's input statistics.

    rebuild_attention: the attention half's output is h + o_proj(kept inputs) (pre-norm layers; removing
    heads leaves the kept heads' outputs unchanged); it is written to ``acts.hidden`` so that propagation
    runs only the FFN half.
    """
    o_proj, down_proj = adapter.attn_output(layer), adapter.mlp_output(layer)
    for part, h, kw in acts.batches():
        if rebuild_attention:
            assert acts.inner is not None
            mid = h + o_proj(acts.inner[part].to(acts.device))  # [B, S, d]
            acts.hidden[part] = mid.to(acts.hidden.device)
        else:
            mid = adapter.attention_block(layer, h, kw)
        if stats is not None:
            stats.add(_input_of(down_proj, partial(adapter.mlp_block, layer, mid)))


def _propagate(layer: nn.Module, adapter: ModelAdapter, acts: _Activations, attention: bool) -> None:
    """Overwrite ``acts.hidden`` with the pruned layer's outputs; ``attention=False``: it already holds the
    attention half's outputs, only the FFN half runs."""
    for part, h, kw in acts.batches():
        mid = adapter.attention_block(layer, h, kw) if attention else h
        acts.hidden[part] = adapter.mlp_block(layer, mid).to(acts.hidden.device)


def _prune_layer(index: int, layer: nn.Module, adapter: ModelAdapter, method: Any, config: PruneConfig,
                 schedule: SchedulePlan, acts: _Activations | None, device: torch.device, watch: _Stopwatch,
                 compact: bool, rerun_attention: bool = False) -> LayerReport:
    """Prune one layer on ``device``: attention, then FFN, then propagate the calibration activations.

    Pre-norm layers (``adapter.attention_is_residual``) take three passes over the calibration windows:
    the dense attention half up to o_proj (keeping o_proj's inputs), o_proj + the FFN half up to
    down_proj (writing the attention half's outputs), the pruned FFN half. Post-norm layers, and
    ``rerun_attention`` (the straightforward path, for tests), run the attention half in all three.
    """
    sizes = adapter.layer_sizes(layer)
    layer_plan = schedule.layers[index]
    params_before = layer_params(layer)
    o_proj, down_proj = adapter.attn_output(layer), adapter.mlp_output(layer)
    prepare = getattr(method, "prepare_layer", None)
    if prepare is not None:  # per-layer scores from the dense layer's weights (magnitude)
        prepare(index, layer, adapter, config)
    reuse = acts is not None and not rerun_attention and adapter.attention_is_residual(layer)

    # Attention: statistics of o_proj's inputs, then the method's decision.
    attn_stats = InputStatistics(o_proj.in_features, device, full=method.needs_hessian) if acts else None
    if acts is not None and (reuse or layer_plan.attn_units_removed):
        with watch.stage("hessians", device):
            _attention_pass(layer, adapter, acts, attn_stats if layer_plan.attn_units_removed else None, reuse)
    units, buckets, unit_kind = attention_units(adapter, sizes, config.gqa_policy)
    W_o = o_proj.weight.detach().to(torch.float32, copy=True)
    with watch.stage("solve", device):
        attn = method.prune_attention(PruneJob(W_o.clone(), attn_stats, units, layer_plan.attn_units_removed,
                                               buckets, layer=index))
    _write_weight(o_proj, attn)
    removed_heads = _units_to_heads(attn.removed_units, unit_kind, sizes)
    keep_heads = torch.tensor([h for h in range(sizes.n_heads) if h not in removed_heads], dtype=torch.long)

    # FFN: statistics of down_proj's inputs with the pruned attention in place.
    ffn_stats = InputStatistics(down_proj.in_features, device, full=method.needs_hessian) if acts else None
    if acts is not None and (reuse or layer_plan.channels_removed):
        with watch.stage("hessians" if layer_plan.channels_removed else "propagation", device):
            _ffn_pass(layer, adapter, acts, ffn_stats if layer_plan.channels_removed else None, reuse)
    W_down = down_proj.weight.detach().to(torch.float32, copy=True)
    channel_units = torch.arange(sizes.ffn_dim).view(-1, 1)
    with watch.stage("solve", device):
        ffn = method.prune_ffn(PruneJob(W_down.clone(), ffn_stats, channel_units, layer_plan.channels_removed,
                                        layer=index))
    _write_weight(down_proj, ffn)
    removed_channels = set(ffn.removed_units)
    keep_channels = torch.tensor([c for c in range(sizes.ffn_dim) if c not in removed_channels], dtype=torch.long)

    row = LayerReport(
        layer=index, ratio=layer_plan.ratio, heads_kept=len(keep_heads), heads_total=sizes.n_heads,
        kv_heads_kept=len((keep_heads // (sizes.n_heads // sizes.n_kv_heads)).unique()),
        kv_heads_total=sizes.n_kv_heads, ffn_kept=len(keep_channels), ffn_total=sizes.ffn_dim,
        params_before=params_before, params_after=params_before - layer_plan.params_removed,
        kept_heads=keep_heads.tolist(), kept_channels=keep_channels.tolist(),
    )
    _record_errors(row, W_o, attn, attn_stats, units, W_down, ffn, ffn_stats)

    if compact:
        adapter.shrink_layer(layer, keep_heads, keep_channels)
        row.params_after = layer_params(layer)
    if acts is not None:
        with watch.stage("propagation", device):
            _propagate(layer, adapter, acts, attention=not reuse)
    return row


def _record_errors(row: LayerReport, W_o: torch.Tensor, attn: Decision, attn_stats: InputStatistics | None,
                   units: torch.Tensor, W_down: torch.Tensor, ffn: Decision, ffn_stats: InputStatistics | None) -> None:
    """Layer-wise output error of o_proj and down_proj, with the method's weights and with plain dropping.

    Needs the full H; methods that keep only per-feature statistics get no error columns.
    """
    if attn_stats is not None and attn_stats.full and attn_stats.tokens and attn.removed_units:
        dropped = W_o.clone()
        dropped[:, units[attn.removed_units].flatten()] = 0
        row.attn_error = reconstruction_error(W_o, attn.weight, attn_stats.hessian)
        row.attn_error_uncompensated = reconstruction_error(W_o, dropped, attn_stats.hessian)
    if ffn_stats is not None and ffn_stats.full and ffn_stats.tokens and ffn.removed_units:
        dropped = W_down.clone()
        dropped[:, ffn.removed_units] = 0
        row.ffn_error = reconstruction_error(W_down, ffn.weight, ffn_stats.hessian)
        row.ffn_error_uncompensated = reconstruction_error(W_down, dropped, ffn_stats.hessian)


def _output_biases(model: Any, adapter: ModelAdapter) -> list[bool]:
    """Which o_proj / down_proj of each layer has a bias (two entries per layer)."""
    return [linear.bias is not None for layer in adapter.decoder_layers(model)
            for linear in (adapter.attn_output(layer), adapter.mlp_output(layer))]


def _adopt_slim_config(model: Any, adapter: ModelAdapter, dense_output_biases: list[bool]) -> None:
    """Give the pruned model its per-layer config and the matching slim class (same forward).

    If the method added an output bias the family does not build (FLAP on LLaMA), the config says so
    (``layer_output_bias``) and every layer gets both biases, so the saved weights match what it builds.
    """
    old = model.config
    layers = adapter.decoder_layers(model)
    sizes = [adapter.layer_sizes(layer) for layer in layers]
    added = any(now and not before for now, before in zip(_output_biases(model, adapter), dense_output_biases,
                                                          strict=True))
    output_bias = added or bool(getattr(old, "layer_output_bias", False))
    if output_bias:  # every layer gets both biases, so the saved weights match what the config builds
        for layer in layers:
            add_zero_bias(adapter.attn_output(layer))
            add_zero_bias(adapter.mlp_output(layer))
    adopt_slim_config(model, slim_config_from(old, sizes, output_bias=output_bias))
