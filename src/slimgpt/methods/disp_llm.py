"""DISP-LLM (Gao et al., NeurIPS 2024) as a slimgpt method: ``--method disp-llm``.

Dimension-independent structural pruning: every decoder block reads and writes its own subset of the
residual dimensions (S1 attention input, S2 attention output, S3 MLP input, S5 MLP output) and keeps its own
FFN channels (S4); heads, head_dim, the embeddings and the residual width are untouched. The subsets are
learned end to end:

1. A hypernetwork (fixed random inputs, a bi-GRU, LayerNorm, GELU, one linear head per structure;
   slimgpt.methods.disp_llm_parts) gives logits l for every entry of the 5 L structures; the gates are
   z = round(sigmoid((l + 3 + g) / 0.4)), g logistic noise (Gumbel-sigmoid), straight-through.
2. The LLM is frozen; masks at the five insertion points of each block turn the dense model into the
   pruned one. The loss is CE on the calibration windows + 16 |log(P(z) / target)|, P(z) the decoder's
   parameter count under the gates, target = (1 - ``--ratio``) of the dense count; AdamW, lr 1e-3 constant
   (slimgpt.methods.disp_llm_train). One step per calibration window (``--nsamples`` windows of
   ``--seqlen`` tokens, ``--batch-size`` per step), one epoch: the paper's 10,000 x 2048 is
   ``--nsamples 10000 --seqlen 2048``.
3. Export: the final masks are the hypernetwork's argmax (``l + 3 > 0``; or one seeded draw), adjusted to
   the size target: entries are kept in descending score until the decoder's count is closest to the target
   (within half of one entry's cost), each set keeping at least one entry. No weight update. The model gets
   the gather/scatter format of slimgpt.models.disp.
LLaMA-like families only; no ``--stream`` (it backpropagates through the whole model).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimgpt._util.timing import reset_peak_memory
from slimgpt.config import PruneConfig
from slimgpt.errors import ConfigError
from slimgpt.layerwise.checkpoint import run_fingerprint
from slimgpt.layerwise.run import LayerLoop, RunTotals, assemble_report
from slimgpt.methods.base import ModelMethod, ModelRun, register
from slimgpt.methods.disp_llm_parts import (
    BlockCost,
    FinalSets,
    block_cost,
    check_model,
    final_sets,
    index_sets,
    logistic_noise,
)
from slimgpt.methods.disp_llm_train import TrainCheckpoint, TrainSettings, settings_dict, train_hypernetwork
from slimgpt.models.disp import export_disp
from slimgpt.models.families import get_adapter
from slimgpt.models.geometry import decoder_params, layer_params, total_params
from slimgpt.report import LayerReport, PruneReport

logger = logging.getLogger(__name__)

LOSS_LOG = "disp_llm_loss.jsonl"
FINAL_MASKS = ("argmax", "seeded")


@register
class DispLLMMethod(ModelMethod):
    """DISP-LLM: per-block residual index sets learned by a hypernetwork on a frozen model."""

    name = "disp-llm"
    summary = ("DISP-LLM (Gao et al., NeurIPS 2024; peer): each block reads and writes its own subset of the "
               "residual\ndimensions and keeps its own FFN channels, learned by a hypernetwork (Gumbel-sigmoid, "
               "straight-through)\non the frozen model with CE + a parameter-budget penalty; no weight update; "
               "gather/scatter format.")
    help = "peer: dimension-independent structural pruning (DISP-LLM): learned per-block residual index sets"
    streaming_refusal = "backpropagates through the whole model to train its hypernetwork, which needs it in memory"

    def __init__(self, config: PruneConfig, final_mask: str = "argmax", epochs: int = 1, save_every: int = 50,
                 stop_after_step: int | None = None, **train: Any) -> None:
        super().__init__(config)
        if final_mask not in FINAL_MASKS:
            raise ConfigError(f"final mask {final_mask!r} is not one of: {', '.join(FINAL_MASKS)}")
        if epochs < 1:
            raise ConfigError(f"epochs {epochs} must be a positive integer")
        self.final_mask, self.epochs, self.save_every = final_mask, epochs, save_every
        self.stop_after_step = stop_after_step
        self.train_options = train  # lr, penalty, temperature, offset (TrainSettings)
        try:
            TrainSettings(steps=0, batch_size=1, seed=0, **train)
        except TypeError:
            raise ConfigError(f"unknown disp-llm training options {sorted(train)}: use lr, penalty, temperature, "
                              "offset") from None
        self.final: FinalSets | None = None
        self.log: list[dict[str, float]] = []
        self.hypernetwork: nn.Module | None = None

    def settings(self, calibration: torch.Tensor) -> TrainSettings:
        c = self.config
        steps = self.epochs * max(calibration.shape[0] // c.batch_size, 1)
        return TrainSettings(steps=steps, batch_size=c.batch_size, seed=c.seed, save_every=self.save_every,
                             **self.train_options)

    def card_options(self, config: dict[str, Any]) -> str:
        s = TrainSettings(steps=0, batch_size=1, seed=0, **self.train_options)
        return (f"hypernetwork steps {len(self.log)} (batch {config.get('batch_size')}), AdamW lr {s.lr}, penalty "
                f"lambda {s.penalty}, Gumbel-sigmoid T {s.temperature}, offset {s.offset}, final mask "
                f"{self.final_mask}, seed {config.get('seed')}")

    def run(self, model: nn.Module, calibration: torch.Tensor, run: ModelRun) -> PruneReport:
        """Train the hypernetwork, export its masks as gather/scatter index sets; returns the report."""
        config = self.config
        adapter = check_model(model)
        if config.round_to != 1:
            raise ConfigError("--method disp-llm keeps single residual dims and FFN channels: drop --round-to")
        layers = list(adapter.decoder_layers(model))
        costs = [block_cost(adapter, layer) for layer in layers]
        before = decoder_params(model, adapter)
        target = round(before * (1 - config.ratio))
        smallest = sum(c.params([1] * 5) for c in costs)
        if target < smallest:
            raise ConfigError(f"--ratio {config.ratio} leaves fewer decoder parameters than one dim per set "
                              f"({smallest:,}): use a smaller ratio")
        loop = LayerLoop(torch.device(config.device), desc="disp-llm", progress=run.progress)
        reset_peak_memory(loop.device)
        totals = RunTotals(before, total_params(model))
        settings = self.settings(calibration)
        scores: list[torch.Tensor]
        if config.ratio == 0:  # nothing to learn: every set keeps every dim
            scores = [torch.ones(size) for cost in costs for size in cost.sizes]
        else:
            model.to(loop.device)
            checkpoint = None
            if run.checkpoint_dir:
                fingerprint = {"run": run_fingerprint(model, layers, calibration), "config": config.to_dict(),
                               "settings": settings_dict(settings), "final_mask": self.final_mask}
                checkpoint = TrainCheckpoint(Path(run.checkpoint_dir), fingerprint)
            with loop.watch.stage("hypernetwork", loop.device):
                result = train_hypernetwork(model, adapter, calibration, costs, target, settings, checkpoint,
                                            run.resume, run.progress, self.stop_after_step)
            self.log, self.hypernetwork = result.log, result.hypernetwork
            if not result.finished:  # stopped on purpose (tests of resuming): the model is unchanged
                return self._report(model, calibration, loop, totals, before, costs, run, settings)
            scores = self.scores(result.hypernetwork, settings)
        with loop.watch.stage("export", loop.device):
            self.final = final_sets(scores, costs, target)
            export_disp(model, index_sets(self.final.masks))
        return self._report(model, calibration, loop, totals, decoder_params(model, adapter), costs, run, settings)

    @torch.no_grad()
    def scores(self, hypernetwork: nn.Module, settings: TrainSettings) -> list[torch.Tensor]:
        """l + offset (argmax), or plus one draw of the noise seeded by ``--seed`` (seeded); > 0 keeps."""
        logits = [logit.detach().float().cpu() for logit in hypernetwork()]
        if self.final_mask == "argmax":
            return [logit + settings.offset for logit in logits]
        generator = torch.Generator().manual_seed(settings.seed)
        return [logit + settings.offset + logistic_noise(logit.shape, generator) for logit in logits]

    def _report(self, model: nn.Module, calibration: torch.Tensor, loop: LayerLoop, totals: RunTotals, after: int,
                costs: list[BlockCost], run: ModelRun, settings: TrainSettings) -> PruneReport:
        config: Any = model.config
        rows = []
        widths: list[list[int]] = []
        if self.final is not None:
            index = index_sets(self.final.masks)
            layers = list(get_adapter(config).decoder_layers(model))
            for i, (sets, cost) in enumerate(zip(index, costs, strict=True)):
                widths.append([len(v) for v in sets.values()])
                params_before = cost.params(cost.sizes)
                rows.append(LayerReport(
                    layer=i, ratio=1 - layer_params(layers[i]) / params_before,
                    heads_kept=int(config.num_attention_heads), heads_total=int(config.num_attention_heads),
                    kv_heads_kept=int(config.num_key_value_heads), kv_heads_total=int(config.num_key_value_heads),
                    ffn_kept=len(sets["mlp_mid"]), ffn_total=cost.ffn, params_before=params_before,
                    params_after=layer_params(layers[i]), kept_channels=sets["mlp_mid"]))
        schedule = self._schedule(rows, widths, costs, totals, settings)
        report = assemble_report(model, self.name, self.config, rows, totals, after, schedule, calibration, loop,
                                 run.model_name)
        report.ratio_convention = self._convention(report, costs)
        report.artifacts = {LOSS_LOG: "".join(json.dumps(entry) + "\n" for entry in self.log)}
        return report

    def _schedule(self, rows: list[LayerReport], widths: list[list[int]], costs: list[BlockCost], totals: RunTotals,
                  settings: TrainSettings) -> dict[str, Any]:
        ratios = [r.ratio for r in rows]
        final = self.final
        return {"name": "learned (hypernetwork)", "high": max(ratios, default=0.0), "low": min(ratios, default=0.0),
                "planned_ratio": 1 - final.params / totals.decoder_params_before if final else 0.0, "ratios": ratios,
                "widths": widths, "width_names": ["attn_in", "attn_out", "mlp_in", "mlp_mid", "mlp_out"],
                "steps": len(self.log), "planned_steps": settings.steps, "final_mask": self.final_mask,
                "ratio_at_zero_threshold": 1 - final.params_at_zero / totals.decoder_params_before if final else None,
                "threshold": None if final is None or math.isnan(final.threshold) else final.threshold,
                "granularity": max(c.largest_entry for c in costs),
                "final_loss": self.log[-1] if self.log else None}

    def _convention(self, report: PruneReport, costs: list[BlockCost]) -> str:
        half = max(c.largest_entry for c in costs) // 2
        at_zero = report.schedule.get("ratio_at_zero_threshold")
        own = f"; the hypernetwork's own masks (score > 0) remove {at_zero:.2%}" if at_zero is not None else ""
        return (f"ratio = fraction of decoder-layer parameters removed (embeddings, lm_head and the full-width "
                f"residual stream excluded), as DISP-LLM's P(z)/P0 counts it: {report.realised_ratio:.2%} of decoder "
                f"parameters, {report.realised_total_ratio:.2%} of all parameters; the exported count is within "
                f"{half:,} parameters (half of one index entry) of (1 - ratio) x dense{own}")
