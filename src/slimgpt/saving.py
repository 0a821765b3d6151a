"""Saving pruned models: atomic, safetensors only, with a JSON report and a model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from slimgpt._util.files import check_output, is_checkpoint_dir, remove_checkpoint, write_atomic_dir
from slimgpt.errors import NumericalError, OutputExistsError
from slimgpt.report import PruneReport

__all__ = ["check_checkpoint", "check_output", "load_report", "model_card", "remove_checkpoint", "save_pruned",
           "write_atomic_dir"]


def check_checkpoint(output: Path, checkpoint_dir: str | None, resume: bool) -> Path:
    """The per-step checkpoint folder of a long run (default ``OUTPUT.checkpoint``).

    A leftover checkpoint means an earlier run stopped part-way: refuse to start over silently.
    """
    checkpoint = Path(checkpoint_dir) if checkpoint_dir else output.with_name(output.name + ".checkpoint")
    if checkpoint.exists() and not checkpoint.is_dir():
        raise OutputExistsError(f"--checkpoint-dir {checkpoint} is a file: pass a folder path")
    if checkpoint.exists() and any(checkpoint.iterdir()) and not is_checkpoint_dir(checkpoint):
        raise OutputExistsError(f"{checkpoint} is not a slimgpt checkpoint folder (it holds other files, which a "
                                "finished run would delete): pass a new --checkpoint-dir")
    if checkpoint.exists() and not resume:
        raise OutputExistsError(f"a checkpoint of an earlier run is at {checkpoint}: pass --resume to continue it, "
                                "or delete it to start over")
    return checkpoint


def _options(report: PruneReport) -> str:
    cfg = report.config
    return report.method_options or f"GQA policy {cfg.get('gqa_policy')}, round-to {cfg.get('round_to')}"


def model_card(report: PruneReport) -> str:
    calib = report.calibration
    ratios = ", ".join(f"{r:.3f}" for r in report.schedule["ratios"])
    sliced = any(r.widths for r in report.layers)
    widths = "\n".join(
        f"| {r.layer} | {r.heads_kept}/{r.heads_total} | {r.kv_heads_kept}/{r.kv_heads_total} | "
        f"{r.ffn_kept}/{r.ffn_total} |" + (f" {' / '.join(map(str, r.widths))} |" if sliced else "")
        for r in report.layers
    )
    header = "| layer | heads | kv heads | ffn |" + (" stream width (in / mid / out) |" if sliced else "")
    rule = "| ---: | ---: | ---: | ---: |" + (" ---: |" if sliced else "")
    versions = ", ".join(f"{k} {v}" for k, v in report.versions.items())
    return f"""---
library_name: transformers
tags: [slimgpt, pruned, structured-pruning]
---
# {Path(report.model).name or report.model} pruned with slimgpt ({report.method})

{report.method_summary or f"Structured pruning with {report.method}."}
Physically smaller: every layer has its own width.

- Source model: `{report.model}`
- Method: {report.method}; target {report.target_ratio:.1%} of decoder parameters,
  realised {report.realised_ratio:.2%}
- Ratio convention: {report.ratio_convention or "fraction of decoder-layer parameters"}
- Decoder parameters: {report.decoder_params_before:,} -> {report.decoder_params_after:,};
  all parameters: {report.total_params_before:,} -> {report.total_params_after:,}
- Schedule: {report.schedule["name"]}; per-layer ratios: {ratios}
- Calibration: {calib["source"]}, {calib["nsamples"]} x {calib["seqlen"]} tokens, seed {calib["seed"]}
- Options: {_options(report)}
- Versions: {versions}

{header}
{rule}
{widths}

## Loading
```python
import slimgpt  # registers the slimgpt_* model types
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("PATH")
```
The full report is in `slimgpt_report.json`.
"""


def save_pruned(model: Any, tokenizer: Any, report: PruneReport, output: str | Path, overwrite: bool = False) -> Path:
    """Write the pruned model (safetensors), tokenizer, report JSON and model card, atomically."""

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NumericalError(f"the pruned model has non-finite values in {name}: nothing was saved; use more "
                                 "calibration data (--nsamples) or a larger --percdamp")

    def fill(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        (directory / "slimgpt_report.json").write_text(report.to_json(with_indices=True))
        (directory / "README.md").write_text(model_card(report))
        for name, text in report.artifacts.items():  # a method's extra files (DISP-LLM's loss log)
            (directory / name).write_text(text)

    return write_atomic_dir(output, fill, overwrite)


def load_report(directory: str | Path) -> PruneReport:
    return PruneReport.from_dict(json.loads((Path(directory) / "slimgpt_report.json").read_text()))
