"""``slimgpt eval`` and ``slimgpt compare``: parse arguments, call the library, print Markdown.

Handlers return an exit code and raise ``SlimGPTError`` subclasses for user errors, which the top-level
CLI prints as one line. Every argument is checked, and task data is loaded, before the model is: a typo
or an offline dataset should not cost a model load.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slimgpt.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` and ``compare`` subcommands; each sets ``func`` to its handler."""
    from slimgpt.evaluation.harness import DEFAULT_TASKS

    default_tasks = ",".join(DEFAULT_TASKS)
    ev = subparsers.add_parser(
        "eval",
        help="perplexity, zero-shot accuracy and speed of a dense or pruned model",
        description="Evaluate a model and print a Markdown report. Nothing is run unless asked "
        "(--ppl, --tasks, --speed).",
    )
    ev.add_argument("model", metavar="MODEL_OR_DIR",
                    help="built-in name (tiny-mha, smollm2-135m), Hub id, local folder or GGUF file")
    ev.add_argument(
        "--ppl",
        type=_names,
        default=[],
        metavar="DATASETS",
        help="perplexity datasets, comma-separated: wikitext2, c4, ptb, builtin, english or a local path",
    )
    ev.add_argument(
        "--seqlens",
        type=_ints,
        default=[128, 2048],
        metavar="N,N",
        help="perplexity window lengths (default 128,2048: both protocols of the literature; "
        "clipped to the model's context)",
    )
    ev.add_argument(
        "--max-windows",
        type=_positive_int,
        default=None,
        metavar="N",
        help="evaluate at most N windows per dataset (quick checks only)",
    )
    ev.add_argument(
        "--tasks",
        type=_names,
        nargs="?",
        const=list(DEFAULT_TASKS),
        default=None,
        metavar="TASKS",
        help=f"lm-eval tasks, comma-separated (bare --tasks: {default_tasks}; mmlu is 5-shot)",
    )
    ev.add_argument(
        "--tasks-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="read task YAMLs (with local data files) from DIR instead of lm-eval's stock tasks, "
        "which need the Hugging Face Hub; implies --tasks if not given",
    )
    ev.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        metavar="N",
        help="first N documents per task only (quick checks; not comparable with papers)",
    )
    ev.add_argument("--speed", action="store_true", help="measure prefill / decode speed and peak memory")
    ev.add_argument(
        "--gen-tokens",
        type=_positive_int,
        default=512,
        metavar="N",
        help="new tokens per timed generation (default 512)",
    )
    ev.add_argument(
        "--prompt-tokens",
        type=_positive_int,
        default=128,
        metavar="P",
        help="prompt length for the prefill timing (default 128)",
    )
    ev.add_argument("--runs", type=_positive_int, default=3, metavar="N", help="timed runs (default 3)")
    ev.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed warm-up runs (default 1)")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: the checkpoint's)")
    ev.add_argument(
        "--batch-size",
        type=_positive_int,
        default=1,
        metavar="N",
        help="sequences per forward pass for perplexity and zero-shot (default 1)",
    )
    ev.add_argument(
        "--json", type=Path, default=None, metavar="OUT.json", help="also save the report as JSON"
    )
    ev.add_argument("--plots", type=Path, default=None, metavar="DIR", help="write figures (PNG) to DIR")
    ev.set_defaults(func=run_eval)

    cmp = subparsers.add_parser(
        "compare",
        help="put saved evaluation reports side by side",
        description="Print a Markdown table with one column per report (put the dense model first).",
    )
    cmp.add_argument(
        "reports", nargs="+", type=Path, metavar="REPORT.json", help="files written by eval --json"
    )
    cmp.add_argument("--out", type=Path, default=None, metavar="report.md", help="also write the table here")
    cmp.add_argument("--plots", type=Path, default=None, metavar="DIR", help="write figures (PNG) to DIR")
    cmp.set_defaults(func=run_compare)


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return names


def _ints(text: str) -> list[int]:
    try:
        values = [int(item) for item in _names(text)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if any(value < 2 for value in values):
        raise argparse.ArgumentTypeError("window lengths must be at least 2 tokens")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _resolve_device(requested: str | None) -> str:
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: CUDA is not available on this machine; use --device cpu")
    if not (requested == "cpu" or requested.startswith("cuda")):
        raise ConfigError(f"--device must be cpu or cuda (or cuda:N), got {requested!r}")
    return requested


def _check_output_path(path: Path, flag: str) -> None:
    if path.exists() and path.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory; give a file name")


def run_eval(args: argparse.Namespace) -> int:
    """Load the model, run what was asked, print the report; write JSON and plots if asked."""
    from slimgpt.evaluation.evaluate import evaluate_model, report_plots
    from slimgpt.evaluation.harness import DEFAULT_TASKS, load_tasks

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
        _check_output_path(args.json, "--json")
    device = _resolve_device(args.device)
    suite = load_tasks(tasks, args.tasks_dir) if tasks else None

    from slimgpt.modeling import load_model

    logger.info("loading %s (%s, %s)", args.model, args.dtype or "checkpoint dtype", device)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, trust_remote_code=False)
    report = evaluate_model(
        model,
        tokenizer,
        name=args.model,
        ppl_datasets=args.ppl,
        seqlens=args.seqlens,
        tasks=suite or (),
        limit=args.limit,
        max_windows=args.max_windows,
        speed=args.speed,
        gen_tokens=args.gen_tokens,
        prompt_tokens=args.prompt_tokens,
        runs=args.runs,
        warmup=args.warmup,
        batch_size=args.batch_size,
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


def run_compare(args: argparse.Namespace) -> int:
    """Print (and optionally write) the side-by-side table of saved reports."""
    from slimgpt.evaluation.evaluate import report_plots
    from slimgpt.evaluation.report import EvalReport, compare, write_atomic

    if args.out is not None:
        _check_output_path(args.out, "--out")
    reports = [EvalReport.load(path) for path in args.reports]
    table = compare(reports)
    if args.out is not None:
        write_atomic(args.out, table)
        logger.info("table written to %s", args.out)
    if args.plots is not None:
        for path in report_plots(reports, args.plots):
            logger.info("plot written to %s", path)
    print(table)
    return 0
