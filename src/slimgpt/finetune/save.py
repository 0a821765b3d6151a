"""Saving the merged model with its fine-tuning provenance, next to what the pruning wrote."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from slimgpt._util.files import write_atomic_dir
from slimgpt.finetune.report import FinetuneReport

LOG_FILE = "finetune_log.json"
PROVENANCE_FILE = "slimgpt_finetune.json"


def finetune_card(report: FinetuneReport) -> str:
    """The model-card section that records the fine-tuning (appended to the pruned model's card)."""
    return (f"\n## Recovery fine-tuning (slimgpt finetune)\n\n{report.summary_line()}.\n\n"
            f"Options and provenance: `{PROVENANCE_FILE}`; loss, lr and tokens per step: `{LOG_FILE}`.\n")


def save_finetuned(model: Any, tokenizer: Any, report: FinetuneReport, output: str | Path, *,
                   source: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the merged model like ``save_pruned`` does (safetensors, config, tokenizer), atomically.

    From ``source`` (the pruned folder) the pruning report is copied and its model card extended with a
    fine-tuning section; ``slimgpt_finetune.json`` holds the options and provenance, ``finetune_log.json``
    the per-step log.
    """
    source_dir = Path(source) if source is not None and Path(source).is_dir() else None

    def fill(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        card = f"# {Path(report.model).name or 'model'} fine-tuned with slimgpt\n"
        if source_dir is not None:
            if (source_dir / "slimgpt_report.json").exists():
                shutil.copyfile(source_dir / "slimgpt_report.json", directory / "slimgpt_report.json")
            if (source_dir / "README.md").exists():
                card = (source_dir / "README.md").read_text()
        (directory / "README.md").write_text(card.rstrip("\n") + "\n" + finetune_card(report))
        provenance = report.to_dict(with_log=False) | {
            "source": str(source_dir.resolve()) if source_dir is not None else report.model}
        (directory / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        (directory / LOG_FILE).write_text(json.dumps([asdict(entry) for entry in report.log], indent=1) + "\n")

    return write_atomic_dir(output, fill, overwrite)
