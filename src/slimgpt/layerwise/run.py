"""The layer loop every layer-by-layer method runs, and the report fields every run fills the same way."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimgpt._util.timing import Stopwatch, peak_memory
from slimgpt._util.versions import versions
from slimgpt.config import PruneConfig
from slimgpt.errors import NumericalError
from slimgpt.layerwise.distributed import world_size
from slimgpt.models.geometry import total_params
from slimgpt.report import LayerReport, PruneReport

logger = logging.getLogger(__name__)


class LayerHooks:
    """Callbacks around each layer of the driver; the default does nothing.

    streams_weights: the hooks load each layer's weights just before it is pruned and free them after
    (slimgpt.streaming), so a method cannot read every layer's weights up front.
    """

    streams_weights = False

    def before(self, index: int, layer: nn.Module) -> None:
        """Called before layer ``index`` moves to the compute device."""

    def after(self, index: int, layer: nn.Module) -> None:
        """Called after layer ``index`` is pruned and its outputs propagated."""


@dataclass
class LayerLoop:
    """How the loop runs: where, with which stopwatch, hooks and progress bar, and where it stops early.

    stop_after_layer: stop after that layer (tests use it to simulate a crash).
    """

    device: torch.device
    watch: Stopwatch = field(default_factory=Stopwatch)
    desc: str = "layers"
    progress: bool = True
    hooks: LayerHooks | None = None
    stop_after_layer: int | None = None


def run_layers(layers: Sequence[nn.Module] | nn.ModuleList, rows: list[LayerReport], loop: LayerLoop,
               step: Callable[[int, nn.Module], LayerReport],
               commit: Callable[[int, nn.Module, list[LayerReport]], None] | None = None) -> list[LayerReport]:
    """Run ``step`` on every layer after the ``len(rows)`` already done, each on ``loop.device``.

    ``commit(index, layer, rows)`` checkpoints a finished layer; hooks run around each layer.
    """
    for index in tqdm(range(len(rows), len(layers)), desc=loop.desc, disable=not loop.progress):
        start = time.perf_counter()
        layer = layers[index]
        if loop.hooks is not None:
            loop.hooks.before(index, layer)
        check_finite(layer, f"layer {index} of the input model")
        home = next(layer.parameters()).device
        layer.to(loop.device)
        row = step(index, layer)
        layer.to(home)
        check_finite(layer, f"layer {index} after pruning", after=True)
        row.seconds = time.perf_counter() - start
        row.peak_memory_bytes = peak_memory(loop.device)
        rows.append(row)
        if commit is not None:
            commit(index, layer, rows)
        if loop.hooks is not None:
            loop.hooks.after(index, layer)
        if loop.stop_after_layer is not None and index >= loop.stop_after_layer:
            break
    return rows


def check_finite(module: nn.Module, what: str, after: bool = False) -> None:
    """Refuse NaN / inf weights (in memory; ``meta`` tensors are skipped) with their own message."""
    for name, tensor in module.state_dict().items():
        if tensor.device.type != "meta" and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            if after:
                raise NumericalError(f"pruning produced non-finite values in {name} of {what}: nothing was saved; "
                                     "use more calibration data (--nsamples) or a larger --percdamp")
            raise NumericalError(f"{what} has non-finite weights (NaN or inf) in {name}: the model is damaged; "
                                 "use an intact copy of it")


def runtime_versions() -> dict[str, str]:
    """The versions a pruning report records."""
    return versions("torch", "transformers")


def calibration_summary(config: PruneConfig, calibration: torch.Tensor | None) -> dict[str, Any]:
    return {"source": config.calib, "nsamples": int(calibration.shape[0]) if calibration is not None else 0,
            "seqlen": int(calibration.shape[1]) if calibration is not None else 0, "seed": config.seed,
            "world_size": world_size()}


@dataclass
class RunTotals:
    """The parameter counts of the dense model, taken before the run."""

    decoder_params_before: int
    total_params_before: int


def assemble_report(model: nn.Module, method: str, config: PruneConfig, rows: list[LayerReport], totals: RunTotals,
                    decoder_params_after: int, schedule: dict[str, Any], calibration: torch.Tensor | None,
                    loop: LayerLoop, model_name: str = "") -> PruneReport:
    """The report of a finished (or stopped) run, with the fields every method fills the same way."""
    return PruneReport(
        model=model_name or str(getattr(model.config, "_name_or_path", "")),
        method=method,
        config=config.to_dict(),
        layers=rows,
        decoder_params_before=totals.decoder_params_before,
        decoder_params_after=decoder_params_after,
        total_params_before=totals.total_params_before,
        total_params_after=total_params(model),
        target_ratio=config.ratio,
        schedule=schedule,
        calibration=calibration_summary(config, calibration),
        stage_seconds=dict(loop.watch.seconds),
        peak_memory_bytes=peak_memory(loop.device),
        device=str(loop.device),
        versions=runtime_versions(),
    )
