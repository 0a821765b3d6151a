"""``slimgpt demo``: prune the built-in model and compare it with the dense one, offline, in ~1 minute.

Dense ``tiny-mha`` against SlimGPT at 20% and 50% of its decoder parameters: parameters, held-out
perplexity (the shipped held-out split of the built-in corpus) and generation speed.

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
from slimgpt.prune import prune_model
from slimgpt.report import PruneReport

logger = logging.getLogger(__name__)


def register(subparsers: common.Subparsers) -> None:
    parser = subparsers.add_parser("demo", help="prune the built-in model at 20%% and 50%% and compare with dense")
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.5])
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    common.add_device(parser, default="cpu")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    print(run_demo(ratios=args.ratios, nsamples=args.nsamples, seqlen=args.seqlen, device=args.device))
    print(f"\nwall time {time.perf_counter() - start:.1f} s")
    return 0


def run_demo(model_name: str = "tiny-mha", ratios: list[float] | None = None, nsamples: int = 64,
             seqlen: int = 512, eval_seqlen: int = 128, device: str = "cpu") -> str:
    """Prune ``model_name`` at each ratio; return a Markdown table dense vs pruned."""
    ratios = ratios if ratios is not None else [0.2, 0.5]
    dense, tokenizer = load_model(model_name, dtype=torch.float32, device=device)
    windows = eval_windows(tokenizer, "builtin", eval_seqlen)
    calibration = calibration_windows(tokenizer, "builtin", nsamples, seqlen, seed=0)

    rows = []
    models: list[tuple[str, Any, PruneReport | None]] = [("dense", dense, None)]
    for ratio in ratios:
        pruned = copy.deepcopy(dense)
        config = PruneConfig(ratio=ratio, calib="builtin", nsamples=nsamples, seqlen=seqlen, device=device,
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
        f"`{model_name}` on {device}; held-out perplexity of the built-in corpus ({windows.shape[0]} windows of "
        f"{eval_seqlen} tokens); calibration {nsamples} x {seqlen} tokens of the built-in corpus.",
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
