"""``slimgpt eval``: parse arguments, evaluate a model with slimgpt.evaluation, print Markdown.

Every argument is checked, and task data is loaded, before the model is: a typo or an offline dataset
should not cost a model load.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from slimgpt.cli import common
from slimgpt.errors import ConfigError
from slimgpt.evaluation.harness import DEFAULT_TASKS

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers: common.Subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="perplexity, zero-shot accuracy and speed of a dense or pruned model",
        description="Evaluate a model and print a Markdown report. Nothing is run unless asked "
        "(--ppl, --tasks, --speed).",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default_tasks = ",".join(DEFAULT_TASKS)
    parser.add_argument("model", metavar="MODEL_OR_DIR",
                        help="built-in name (tiny-mha, smollm2-135m), Hub id, local folder or GGUF file")
    parser.add_argument("--ppl", type=common.names, default=[], metavar="DATASETS",
                        help="perplexity datasets, comma-separated: wikitext2, c4, ptb, builtin, english or a "
                             "local path")
    parser.add_argument("--seqlens", type=window_lengths, default=[128, 2048], metavar="N,N",
                        help="perplexity window lengths (default 128,2048: both protocols of the literature; "
                        "clipped to the model's context)")
    parser.add_argument("--max-windows", type=common.positive_int, default=None, metavar="N",
                        help="evaluate at most N windows per dataset (quick checks only)")
    parser.add_argument("--tasks", type=common.names, nargs="?", const=list(DEFAULT_TASKS), default=None,
                        metavar="TASKS",
                        help=f"lm-eval tasks, comma-separated (bare --tasks: {default_tasks}; mmlu is 5-shot)")
    parser.add_argument("--tasks-dir", type=Path, default=None, metavar="DIR",
                        help="read task YAMLs (with local data files) from DIR instead of lm-eval's stock tasks, "
                        "which need the Hugging Face Hub; implies --tasks if not given")
    parser.add_argument("--limit", type=common.positive_int, default=None, metavar="N",
                        help="first N documents per task only (quick checks; not comparable with papers)")
    parser.add_argument("--speed", action="store_true", help="measure prefill / decode speed and peak memory")
    parser.add_argument("--gen-tokens", type=common.positive_int, default=512, metavar="N",
                        help="new tokens per timed generation (default 512)")
    parser.add_argument("--prompt-tokens", type=common.positive_int, default=128, metavar="P",
                        help="prompt length for the prefill timing (default 128)")
    parser.add_argument("--runs", type=common.positive_int, default=3, metavar="N", help="timed runs (default 3)")
    parser.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed warm-up runs (default 1)")
    common.add_device(parser, default=None, help="cpu or cuda (default: cuda when available)")
    common.add_dtype(parser, DTYPES, default=None, help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=common.positive_int, default=1, metavar="N",
                        help="sequences per forward pass for perplexity and zero-shot (default 1)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json", help="also save the report as JSON")
    parser.add_argument("--plots", type=Path, default=None, metavar="DIR", help="write figures (PNG) to DIR")


def window_lengths(text: str) -> list[int]:
    """Comma-separated perplexity window lengths, each at least 2 tokens."""
    try:
        values = [int(item) for item in common.names(text)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if any(value < 2 for value in values):
        raise argparse.ArgumentTypeError("window lengths must be at least 2 tokens")
    return values


def resolve_device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    if not (requested == "cpu" or requested.startswith("cuda")):
        raise ConfigError(f"--device must be cpu or cuda (or cuda:N), got {requested!r}")
    return requested


def checked_tasks(args: argparse.Namespace) -> list[str] | None:
    """Check the options that need no model; the tasks to run (None: no zero-shot)."""
    tasks = args.tasks
    if tasks is None and args.tasks_dir is not None:
        tasks = list(DEFAULT_TASKS)
    if not args.ppl and not tasks and not args.speed:
        raise ConfigError("nothing to evaluate: pass --ppl DATASETS, --tasks [TASKS] and/or --speed")
    if args.speed and args.gen_tokens < 2:
        raise ConfigError("--gen-tokens must be at least 2 (decode speed needs a step after the first token)")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if args.json is not None:
        common.check_output_file(args.json, "--json")
    return tasks


@contextlib.contextmanager
def decoded_model(name: str) -> Iterator[str]:
    """``name`` itself, or for a bits-back export (``slimgpt export --format bits-back``) a decoded copy."""
    from slimgpt.export.bitsback import decode_to_folder, is_bits_back

    if not is_bits_back(name):
        yield name
        return
    with tempfile.TemporaryDirectory(prefix="slimgpt-bitsback-") as tmp:
        logger.info("decoding the bits-back export %s", name)
        yield str(decode_to_folder(name, Path(tmp) / "model"))


def run(args: argparse.Namespace) -> int:
    """Load the model, run what was asked, print the report; write JSON and plots if asked."""
    from slimgpt.evaluation.evaluate import evaluate_model, report_plots
    from slimgpt.evaluation.harness import load_tasks
    from slimgpt.models.slim import load_model
    from slimgpt.preflight import check_eval_sources

    tasks = checked_tasks(args)
    check_eval_sources(args.ppl)  # a missing dataset fails before the model is loaded
    device = resolve_device(args.device)
    suite = load_tasks(tasks, args.tasks_dir) if tasks else None

    logger.info("loading %s (%s, %s)", args.model, args.dtype or "checkpoint dtype", device)
    with decoded_model(args.model) as folder:
        model, tokenizer = load_model(folder, dtype=args.dtype, device=device, trust_remote_code=False)
    report = evaluate_model(
        model, tokenizer, name=args.model, ppl_datasets=args.ppl, seqlens=args.seqlens, tasks=suite or (),
        limit=args.limit, max_windows=args.max_windows, speed=args.speed, gen_tokens=args.gen_tokens,
        prompt_tokens=args.prompt_tokens, runs=args.runs, warmup=args.warmup, batch_size=args.batch_size,
        device=device,
    )
    if args.json is not None:
        report.save(args.json)
        logger.info("report written to %s", args.json)
    if args.plots is not None:
        for path in report_plots([report], args.plots):
            logger.info("plot written to %s", path)
    print(report.to_markdown())
    return 0
