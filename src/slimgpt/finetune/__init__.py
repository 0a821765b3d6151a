"""LoRA recovery fine-tuning of a pruned model, merged back into a plain (pruned) checkpoint.

Pruning leaves a model that has lost some of what it knew; the SlimGPT paper recovers part of it with a
short LoRA run: rank 8, alpha 16, dropout 0.05 on the q, k, v, o, gate, up and down projections, one
epoch of Alpaca-cleaned, lr 1e-4 with a cosine schedule and 10 warm-up steps, effective batch 64, max
length 256, loss on the responses only; the adapters are merged after. ``FinetuneConfig`` holds that
recipe as its defaults, every value overridable.

- ``config.py``: ``FinetuneConfig`` and its checks.
- ``data.py``: instruction records and raw text turned into training examples.
- ``schedule.py``: run length, learning rate per step, batch order, LoRA target modules.
- ``train.py``: the loop (``finetune``); ``checkpoint.py``: resumable state; ``report.py``: the report.
- ``save.py``: the merged model with its provenance (``save_finetuned``).
"""

from slimgpt.finetune.checkpoint import TrainingCheckpoint
from slimgpt.finetune.config import (
    FINETUNE_CONFIG_VERSION,
    LORA_ROLES,
    LR_SCHEDULES,
    RESUME_FREE_OPTIONS,
    FinetuneConfig,
)
from slimgpt.finetune.data import (
    IGNORE_INDEX,
    INSTRUCTION_FIELDS,
    Example,
    TrainingData,
    alpaca_prompt,
    check_data_source,
    collate,
    instruction_example,
    load_training_data,
    split_record,
    text_examples,
)
from slimgpt.finetune.report import FinetuneReport, StepLog
from slimgpt.finetune.save import LOG_FILE, PROVENANCE_FILE, finetune_card, save_finetuned
from slimgpt.finetune.schedule import BatchOrder, learning_rate_at, lora_target_modules, total_examples, total_steps
from slimgpt.finetune.train import finetune

__all__ = [
    "FINETUNE_CONFIG_VERSION",
    "IGNORE_INDEX",
    "INSTRUCTION_FIELDS",
    "LOG_FILE",
    "LORA_ROLES",
    "LR_SCHEDULES",
    "PROVENANCE_FILE",
    "RESUME_FREE_OPTIONS",
    "BatchOrder",
    "Example",
    "FinetuneConfig",
    "FinetuneReport",
    "StepLog",
    "TrainingCheckpoint",
    "TrainingData",
    "alpaca_prompt",
    "check_data_source",
    "collate",
    "finetune",
    "finetune_card",
    "instruction_example",
    "learning_rate_at",
    "load_training_data",
    "lora_target_modules",
    "save_finetuned",
    "split_record",
    "text_examples",
    "total_examples",
    "total_steps",
]
