"""Pruning models larger than CPU RAM: one decoder layer in memory at a time.

The in-memory path (``load_model`` + ``prune_model`` + ``save_pruned``) holds the whole dense model in
CPU RAM. Pruning itself never needs that: the driver works on one decoder layer at a time. Streaming
keeps everything else on the ``meta`` device (shapes, no storage) and reads weights lazily from the
checkpoint's safetensors shards:

1. Build the model skeleton on ``meta`` from the config (``plan()`` and the parameter counts only need
   shapes).
2. Materialise only the decoder's non-layer modules (embeddings, final norm, rotary tables): the
   calibration capture runs them. ``lm_head`` is never materialised.
3. ``LayerHooks.before``: read decoder layer i from the shards; the driver prunes it;
   ``LayerHooks.after``: write it into its own output shard and send it back to ``meta``.
4. Copy the non-layer tensors (embeddings, final norm, lm_head) straight from the source shards into
   the output's first shard: pruning does not change them. Write ``model.safetensors.index.json``, the
   slim config, generation config, tokenizer, report and model card; the folder loads with
   ``AutoModelForCausalLM.from_pretrained`` (after ``import slimgpt``) and holds the same weights as the
   in-memory path's output.

Resume: the driver checkpoints every pruned layer (its weights, the next layer's inputs, the report
rows). The output folder is written atomically, so a crashed run leaves no partial output; on
``resume`` the already-pruned layers are copied from the checkpoint into the new output, one at a
time, and never recomputed.

CPU memory: the non-layer modules + one decoder layer + the calibration activations, instead of the
whole model + the calibration activations (docs/memory.md).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

import slimgpt.layerwise.distributed as distributed
from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError, SlimGPTError
from slimgpt.layerwise.checkpoint import Checkpoint
from slimgpt.layerwise.run import LayerHooks
from slimgpt.methods import get_method
from slimgpt.models.adapters import LayerSizes
from slimgpt.models.families import family_row, get_adapter
from slimgpt.models.lazy import INDEX_NAME, LazyModel, ShardedWeights, ShardWriter, resolve_checkpoint, stream_dtype
from slimgpt.models.slim import SLIM_CLASSES, slim_config_from
from slimgpt.prune import prune_model
from slimgpt.report import PruneReport
from slimgpt.saving import check_output, model_card, write_atomic_dir

logger = logging.getLogger(__name__)

__all__ = ["INDEX_NAME", "StreamResult", "StreamStats", "StreamingHooks", "stream_prune"]

# --- the hooks ---------------------------------------------------------------------------------------------

@dataclass
class StreamStats:
    """What streaming held in memory and how long the disk took; the tests assert on these."""

    layer_params_max: int = 0  # the largest dense decoder layer, in parameters
    peak_resident_layer_params: int = 0  # decoder-layer parameters materialised at once, at most
    resident_other_params: int = 0  # non-layer parameters materialised (embeddings, final norm)
    layers_streamed: list[int] = field(default_factory=list)  # pruned in this run
    layers_restored: list[int] = field(default_factory=list)  # copied from the checkpoint on resume
    read_seconds: float = 0.0
    write_seconds: float = 0.0


class StreamingHooks(LayerHooks):
    """Materialise layer i before the driver prunes it; write it to its shard and free it afterwards."""

    streams_weights = True

    def __init__(self, lazy: LazyModel, writer: ShardWriter, stats: StreamStats,
                 extra: LayerHooks | None = None) -> None:
        self.lazy = lazy
        self.writer = writer
        self.stats = stats
        self.extra = extra

    def before(self, index: int, layer: nn.Module) -> None:
        start = time.perf_counter()
        self.lazy.materialise(layer)
        self.stats.read_seconds += time.perf_counter() - start
        resident = self.lazy.resident_params(self.lazy.layers)
        self.stats.peak_resident_layer_params = max(self.stats.peak_resident_layer_params, resident)
        self.stats.layers_streamed.append(index)
        if self.extra is not None:
            self.extra.before(index, layer)

    def after(self, index: int, layer: nn.Module) -> None:
        if self.extra is not None:
            self.extra.after(index, layer)
        start = time.perf_counter()
        prefix = self.lazy.layer_prefixes[index]
        self.writer.write(index + 2, {prefix + k: v for k, v in layer.state_dict().items()})
        self.lazy.release(layer)
        self.stats.write_seconds += time.perf_counter() - start


# --- the entry point ----------------------------------------------------------------------------------------

@dataclass
class StreamResult:
    report: PruneReport
    output: Path
    stats: StreamStats


class _NoWriter(ShardWriter):
    """The writer of a rank other than 0: it writes nothing."""

    def __init__(self) -> None:
        super().__init__(Path(), 0)

    def write(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        """Nothing: rank 0 writes the output."""


def _load_tokenizer(directory: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as error:
        logger.info("no tokenizer in %s (%s); pass calibration token ids", directory, str(error).splitlines()[0])
        return None


def _generation_config(directory: Path, config: Any) -> Any:
    from transformers import GenerationConfig

    if (directory / "generation_config.json").exists():
        return GenerationConfig.from_pretrained(directory)
    return GenerationConfig.from_model_config(config)


def stream_prune(
    model: str | Path,
    config: PruneConfig,
    output: str | Path,
    calibration: torch.Tensor | None = None,
    tokenizer: Any = None,
    *,
    dtype: torch.dtype | str | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    model_name: str = "",
    progress: bool = True,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    layer_hooks: LayerHooks | None = None,
) -> StreamResult:
    """Prune the checkpoint ``model`` (folder, built-in name or Hub id) into ``output``, layer by layer.

    Never holds more than one decoder layer of weights in memory. ``output`` gets the same files as
    ``save_pruned`` (shards + index, slim config, tokenizer, report, model card), written atomically.
    tokenizer: defaults to the checkpoint's (needed only when ``calibration`` is None).
    checkpoint_dir / resume: the driver's per-layer checkpoint; resuming copies the layers it holds into
    the output instead of recomputing them.
    layer_hooks: extra callbacks, called while the layer is materialised (after loading, before writing).
    """
    output_path = check_output(output, overwrite)
    _check_streamable(config)
    if resume and checkpoint_dir is None:
        raise ConfigError("resuming needs the checkpoint of the earlier run: pass its --checkpoint-dir")
    directory, model_config, lazy = _open_source(model, dtype, attn_implementation, trust_remote_code)
    if tokenizer is None:
        tokenizer = _load_tokenizer(directory, trust_remote_code)
    checkpoint = Checkpoint(Path(checkpoint_dir)) if checkpoint_dir is not None else None
    stats = StreamStats(layer_params_max=max(sum(p.numel() for p in layer.parameters()) for layer in lazy.layers))
    reports: list[PruneReport] = []

    def fill(out: Path | None) -> None:  # None: a rank other than 0, which prunes its windows and writes nothing
        writer = ShardWriter(out, n_shards=len(lazy.layers) + 1) if out is not None else _NoWriter()
        if out is not None and checkpoint is not None and resume and checkpoint.exists():
            _copy_checkpointed_layers(lazy, checkpoint, writer, stats)
        others = lazy.decoder_others()
        for module in others:
            lazy.materialise(module)
        lazy.model.tie_weights()
        stats.resident_other_params = lazy.resident_params(others)
        hooks = StreamingHooks(lazy, writer, stats, layer_hooks)
        with warnings.catch_warnings():
            # On resume the driver loads the checkpointed layers into the meta skeleton: a no-op here,
            # on purpose (they are already in the output), which torch warns about once per tensor.
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            report = prune_model(lazy.model, config, calibration, tokenizer, checkpoint_dir=checkpoint_dir,
                                 resume=resume, model_name=model_name or str(model), progress=progress,
                                 layer_hooks=hooks)
        for module in others:
            lazy.release(module)
        reports.append(report)
        if out is None:
            return
        writer.write(1, _rest_of_model(lazy, writer))
        writer.finish()
        _write_metadata(out, lazy, model_config, directory, tokenizer, report)

    with distributed.joined():  # several ranks: only rank 0 writes the output (slimgpt.layerwise.distributed)
        if distributed.is_main():
            written = write_atomic_dir(output_path, fill, overwrite)
        else:
            fill(None)
            written = output_path
    logger.info("streamed %d layers (%d restored from the checkpoint); at most %d decoder-layer parameters in "
                "memory at once; reading %.1fs, writing %.1fs", len(stats.layers_streamed),
                len(stats.layers_restored), stats.peak_resident_layer_params, stats.read_seconds,
                stats.write_seconds)
    return StreamResult(reports[0], written, stats)


def _open_source(model: str | Path, dtype: torch.dtype | str | None, attn_implementation: str | None,
                 trust_remote_code: bool) -> tuple[Path, Any, LazyModel]:
    """The checkpoint's folder, its config and the model skeleton; unsupported families fail here."""
    from transformers import AutoConfig

    directory = resolve_checkpoint(model)
    source = ShardedWeights(directory)
    try:
        model_config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise SlimGPTError(f"cannot read config.json in {directory}: {str(error).splitlines()[0]}") from None
    get_adapter(model_config)  # unsupported families fail here, before any work
    target_dtype = stream_dtype(dtype, model_config, source)
    return directory, model_config, LazyModel(source, model_config, target_dtype, attn_implementation,
                                              trust_remote_code)


def _check_streamable(config: PruneConfig) -> None:
    """Fail before any download or read if the method must see every layer's weights before pruning one
    (the driver refuses the same, later, when it gets layer hooks)."""
    refusal = get_method(config).cannot_stream()
    if refusal:
        raise ConfigError(f"{refusal}: prune without --stream")


def _copy_checkpointed_layers(lazy: LazyModel, checkpoint: Checkpoint, writer: ShardWriter,
                              stats: StreamStats) -> None:
    """Write the layers an interrupted run already pruned from its checkpoint, one at a time."""
    done = len(checkpoint.load_state()["rows"])
    for index in range(done):
        start = time.perf_counter()
        tensors = load_file(str(checkpoint.layer_path(index)))
        prefix = lazy.layer_prefixes[index]
        writer.write(index + 2, {prefix + k: v for k, v in tensors.items()})
        del tensors
        stats.write_seconds += time.perf_counter() - start
        stats.layers_restored.append(index)
    logger.info("copied %d pruned layers from %s", done, checkpoint.directory)


def _rest_of_model(lazy: LazyModel, writer: ShardWriter) -> dict[str, torch.Tensor]:
    """Everything not yet written: the non-layer tensors, copied from the source (pruning leaves them
    unchanged, so they are never materialised), and the zero output biases the driver gives every layer
    once any layer got one (``layer_output_bias``) after earlier layers were already written."""
    final = lazy.model.state_dict()  # meta: the pruned shapes
    rest = lazy.non_layer_keys()
    tensors = lazy.read(rest, final)
    tied = set(getattr(lazy.model, "all_tied_weights_keys", None) or {})
    for key in final:
        if key in writer.weight_map or key in tensors or key in tied:
            continue
        if not key.endswith(".bias"):
            raise RuntimeError(f"{key} of the pruned model was never written")  # a bug, not user input
        tensors[key] = torch.zeros(final[key].shape, dtype=final[key].dtype)
    return tensors


def _write_metadata(out: Path, lazy: LazyModel, model_config: Any, source_dir: Path, tokenizer: Any,
                    report: PruneReport) -> None:
    """Config (slim, per-layer widths), generation config, tokenizer, report and model card."""
    if len(report.layers) != len(lazy.layers):
        raise RuntimeError(f"only {len(report.layers)} of {len(lazy.layers)} layers were pruned")
    sizes = [LayerSizes(r.heads_kept, r.kv_heads_kept, r.ffn_kept) for r in report.layers]
    output_bias = bool(getattr(lazy.model.config, "layer_output_bias", False))  # set by the driver
    slim = slim_config_from(model_config, sizes, output_bias=output_bias)
    slim.architectures = [SLIM_CLASSES[family_row(slim.model_type).model_type][1].__name__]
    slim.dtype = lazy.dtype
    slim.save_pretrained(out)
    _generation_config(source_dir, model_config).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "slimgpt_report.json").write_text(report.to_json(with_indices=True))
    (out / "README.md").write_text(model_card(report))
