"""``slimgpt finetune``: LoRA recovery of a pruned model. It only parses arguments and calls the library.

    slimgpt finetune pruned/ --data alpaca --output pruned-tuned/
    slimgpt finetune pruned/ --data builtin --output tuned/ --max-steps 200 --device cuda --bf16
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from slimgpt.cli import common
from slimgpt.errors import SlimGPTError
from slimgpt.finetune import LORA_ROLES, LR_SCHEDULES, FinetuneConfig
from slimgpt.models.gguf import load_gguf_tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(subparsers: common.Subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="LoRA recovery fine-tuning of a pruned model; merges the adapters and saves the model",
        description="Fine-tune a (pruned) model with LoRA, merge the adapters and save it in the same format. "
        "Defaults are the SlimGPT paper's recovery recipe: rank 8, alpha 16, dropout 0.05 on q,k,v,o,gate,up,"
        "down; lr 1e-4 cosine with 10 warm-up steps; batch 64; max length 256; one epoch; response-only loss.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = FinetuneConfig()
    p.add_argument("model", metavar="DIR", help="pruned model folder (from slimgpt prune), or any model slimgpt loads")
    p.add_argument("--data", default=d.data,
                   help="alpaca, gpt4-alpaca (instruction data), builtin (raw text: the stdlib corpus), or a local "
                        ".jsonl (instruction/input/output or text records), .txt file or directory (default "
                        "%(default)s)")
    common.add_saving(p, resume_help="continue from the last checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--lora-targets", type=common.csv, default=d.lora_targets, metavar="T,T",
                   help=f"roles ({','.join(LORA_ROLES)}) or module-name suffixes (default all roles)")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate (default %(default)s)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size,
                   help="examples per forward pass; the rest is gradient accumulation")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per example")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="train exactly N optimizer steps instead of --epochs")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    p.add_argument("--full-loss", action="store_true", help="instruction data: train on the prompt tokens too")
    p.add_argument("--seed", type=int, default=d.seed)
    common.add_device(p, default=d.device, help="cpu, cuda or cuda:N")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward and backward passes")
    common.add_dtype(p, [*DTYPES, "auto"], default="float32",
                     help="dtype of the frozen weights while training (default float32; auto: as saved); the "
                          "output is saved in the input's dtype")
    common.add_json(p, help="also write the report JSON (with the per-step log) here")
    common.add_trust_remote_code(p)


def config_from(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(
        data=args.data, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets, learning_rate=args.lr, lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        max_length=args.max_length, epochs=args.epochs, max_steps=args.max_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, response_only=not args.full_loss, seed=args.seed, device=args.device,
        bf16=args.bf16, checkpoint_every=args.checkpoint_every,
    )


def load_tokenizer(source: str, model: str, trust_remote_code: bool) -> Any:
    """The tokenizer alone (read before the weights), or a one-line error."""
    from transformers import AutoTokenizer

    try:
        if source.lower().endswith(".gguf"):  # a GGUF file carries its own tokenizer
            return load_gguf_tokenizer(source)
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise SlimGPTError(f"cannot load the tokenizer of {model!r} ({str(error).splitlines()[0]}): pass a "
                           "model folder with its tokenizer files") from None


def run(args: argparse.Namespace) -> int:
    from slimgpt.finetune import check_data_source, finetune, load_training_data, save_finetuned
    from slimgpt.models.slim import load_model, resolve_model_path
    from slimgpt.preflight import check_finetune

    config = config_from(args)  # validates every option before any work
    output, checkpoint, lock = check_finetune(args, config.device)  # every path check, then the output's lock
    check_data_source(config.data)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise SlimGPTError(f"--device {config.device} but no CUDA device is available: pass --device cpu")
    source = resolve_model_path(args.model)
    # The data is read and tokenized before the weights: an offline or malformed dataset fails in seconds.
    training_data = load_training_data(load_tokenizer(source, args.model, args.trust_remote_code), config)
    model, tokenizer = load_model(args.model, dtype=None, device="cpu", trust_remote_code=args.trust_remote_code)
    saved_dtype = next(model.parameters()).dtype
    if args.dtype != "auto":
        model.to(DTYPES[args.dtype])
    report = finetune(model, tokenizer, config, training_data=training_data, checkpoint_dir=checkpoint,
                      resume=args.resume, model_name=args.model)
    model.to(device="cpu", dtype=saved_dtype)
    save_finetuned(model, tokenizer, report, output, source=source, overwrite=args.overwrite)
    common.finish_saved(report, output, checkpoint, args.json, lock)
    return 0
