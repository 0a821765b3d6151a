"""Saving pruned models: atomic, safetensors only, with a JSON report and a model card."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from slimgpt.errors import OutputExistsError
from slimgpt.report import PruneReport


def check_output(output: str | Path, overwrite: bool) -> Path:
    """Fail before any work if ``output`` exists and overwriting was not asked for."""
    path = Path(output)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} already exists: pass --overwrite to replace it, or another --output")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output {path} exists and is not a directory: choose another --output")
    return path


def check_checkpoint(output: Path, checkpoint_dir: str | None, resume: bool) -> Path:
    """The per-step checkpoint folder of a long run (default ``OUTPUT.checkpoint``).

    A leftover checkpoint means an earlier run stopped part-way: refuse to start over silently.
    """
    checkpoint = Path(checkpoint_dir) if checkpoint_dir else output.with_name(output.name + ".checkpoint")
    if checkpoint.exists() and not resume:
        raise OutputExistsError(f"a checkpoint of an earlier run is at {checkpoint}: pass --resume to continue it, "
                                "or delete it to start over")
    return checkpoint


def write_atomic_dir(output: str | Path, fill: Any, overwrite: bool) -> Path:
    """Create ``output`` by filling a temporary sibling directory, then renaming it into place.

    A crash leaves either the old directory or the complete new one, never a half-written output.
    """
    path = check_output(output, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


METHOD_SUMMARIES = {
    "slimgpt": "Structured pruning: whole attention heads and FFN channels removed, surviving weights "
               "OBS-compensated\n(SlimGPT, Ling et al., NeurIPS 2024).",
    "magnitude": "Structured magnitude pruning (baseline): the heads and FFN channels with the smallest weight "
                 "norm removed,\nuniform per-layer ratio, no data, no compensation.",
    "wanda-sp": "Structured Wanda (Wanda-sp, as in FLAP's code; baseline): heads and FFN channels ranked by "
                "|W| * ||X||,\nuniform per-layer ratio, no compensation.",
    "flap": "FLAP (An et al., AAAI 2024; baseline): fluctuation-ranked heads and FFN channels, global adaptive "
            "per-layer ratios,\nremoved channels compensated by an output bias of o_proj / down_proj.",
    "llm-pruner": "LLM-Pruner (Ma et al., NeurIPS 2023; baseline): coupled groups ranked by first-order Taylor "
                  "importance |w * dL/dw|,\nuniform ratio on the middle layers, first and last layers kept, "
                  "no compensation (no LoRA tuning).",
    "slicegpt": "SliceGPT (Ashkboos et al., ICLR 2024; baseline): norms folded, each block's residual stream rotated "
                "into the\nprincipal directions of its calibration signal and sliced to a narrower width, with "
                "shortcut matrices\n(heads and FFN channels kept).",
}


def _options(report: PruneReport) -> str:
    cfg = report.config
    if report.method != "slimgpt":  # SlimGPT's solver options do not apply to the baselines
        taylor = (f", gradient pass on at most {cfg.get('taylor_samples')} windows x {cfg.get('taylor_seqlen')} tokens"
                  if report.method == "llm-pruner" else "")
        return f"GQA policy {cfg.get('gqa_policy')}, round-to {cfg.get('round_to')}{taylor}"
    return (f"head score {cfg.get('head_score')}, compensation {cfg.get('compensate')},\n"
            f"  FFN groups {cfg.get('group_schedule')}, GQA policy {cfg.get('gqa_policy')},\n"
            f"  damping {cfg.get('percdamp')}, round-to {cfg.get('round_to')}")


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

{METHOD_SUMMARIES.get(report.method, f"Structured pruning with {report.method}.")}
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

    def fill(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        (directory / "slimgpt_report.json").write_text(report.to_json(with_indices=True))
        (directory / "README.md").write_text(model_card(report))

    return write_atomic_dir(output, fill, overwrite)


def load_report(directory: str | Path) -> PruneReport:
    return PruneReport.from_dict(json.loads((Path(directory) / "slimgpt_report.json").read_text()))
