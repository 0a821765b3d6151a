"""The ``slimgpt`` command line. It only parses arguments into configs and calls the library."""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimgpt.config import GQA_POLICIES, HEAD_SCORES, METHODS, SOLVERS, PruneConfig
from slimgpt.errors import SlimGPTError
from slimgpt.solver.schedule import SCHEDULES
from slimgpt.solver.structured import GROUP_SCHEDULES

logger = logging.getLogger("slimgpt")


def _add_prune_options(parser: argparse.ArgumentParser) -> None:
    d = PruneConfig()
    parser.add_argument("--method", choices=METHODS, default=d.method,
                        help="slimgpt, or a baseline: magnitude, wanda-sp, flap, llm-pruner (default %(default)s)")
    parser.add_argument("--ratio", type=float, default=d.ratio,
                        help="fraction of decoder-layer parameters to remove, in [0, 1) (default %(default)s)")
    parser.add_argument("--calib", default=d.calib,
                        help="calibration data: c4, wikitext2, ptb, alpaca, gpt4-alpaca, builtin, english, or a local "
                             ".txt/.jsonl file or directory (default %(default)s)")
    parser.add_argument("--nsamples", type=int, default=d.nsamples)
    parser.add_argument("--seqlen", type=int, default=d.seqlen)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    parser.add_argument("--first-ratio", type=float, default=None, help="ratio of layer 0 (default: last / 4)")
    parser.add_argument("--first-fraction", type=float, default=d.first_fraction)
    parser.add_argument("--percdamp", type=float, default=d.percdamp)
    parser.add_argument("--head-score", choices=HEAD_SCORES, default=d.head_score)
    parser.add_argument("--no-compensation", action="store_true", help="ablation: drop columns, no OBS update")
    parser.add_argument("--group-schedule", choices=GROUP_SCHEDULES, default=d.group_schedule)
    parser.add_argument("--group-start", type=int, default=d.group_start)
    parser.add_argument("--group-floor", type=int, default=d.group_floor)
    parser.add_argument("--group-fraction", type=float, default=d.group_fraction)
    parser.add_argument("--gqa-policy", choices=GQA_POLICIES, default=d.gqa_policy)
    parser.add_argument("--solver", choices=SOLVERS, default=d.solver)
    parser.add_argument("--round-to", type=int, default=d.round_to, help="keep FFN widths a multiple of N")
    parser.add_argument("--device", default=d.device, help="compute device for the layer being pruned")
    parser.add_argument("--no-offload", action="store_true", help="keep calibration activations on --device")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--taylor-samples", type=int, default=d.taylor_samples,
                        help="llm-pruner: calibration windows in its gradient pass (default %(default)s)")
    parser.add_argument("--taylor-seqlen", type=int, default=d.taylor_seqlen,
                        help="llm-pruner: tokens of each window in its gradient pass (default %(default)s)")


def _config_from(args: argparse.Namespace) -> PruneConfig:
    return PruneConfig(
        method=args.method, ratio=args.ratio, schedule=args.schedule, first_ratio=args.first_ratio,
        first_fraction=args.first_fraction, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
        seed=args.seed, percdamp=args.percdamp, head_score=args.head_score, compensate=not args.no_compensation,
        group_schedule=args.group_schedule, group_start=args.group_start, group_floor=args.group_floor,
        group_fraction=args.group_fraction, gqa_policy=args.gqa_policy, solver=args.solver, round_to=args.round_to,
        device=args.device, offload=not args.no_offload, batch_size=args.batch_size,
        taylor_samples=args.taylor_samples, taylor_seqlen=args.taylor_seqlen,
    )


def cmd_prune(args: argparse.Namespace) -> int:
    from slimgpt.io import check_checkpoint, check_output, save_pruned
    from slimgpt.modeling import load_model
    from slimgpt.prune import prune_model

    config = _config_from(args)  # validates every option before any work
    output = check_output(args.output, args.overwrite)
    checkpoint = check_checkpoint(output, args.checkpoint_dir, args.resume)
    if args.stream:  # one decoder layer in memory at a time (slimgpt.streaming)
        from slimgpt.streaming import stream_prune

        report = stream_prune(args.model, config, output, dtype=args.dtype, checkpoint_dir=checkpoint,
                              resume=args.resume, overwrite=args.overwrite, model_name=args.model,
                              trust_remote_code=args.trust_remote_code).report
    else:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu",
                                      trust_remote_code=args.trust_remote_code)
        report = prune_model(model, config, tokenizer=tokenizer, checkpoint_dir=checkpoint, resume=args.resume,
                             model_name=args.model)
        save_pruned(model, tokenizer, report, output, overwrite=args.overwrite)
    shutil.rmtree(checkpoint, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(report.to_json())
    print(report.to_markdown())
    print(f"\nsaved to {output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from slimgpt.demo import run_demo

    start = time.perf_counter()
    print(run_demo(model_name=args.model, ratios=args.ratios, nsamples=args.nsamples, seqlen=args.seqlen,
                   device=args.device))
    print(f"\nwall time {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimgpt", description="SlimGPT structured pruning for causal LMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model and save the smaller model")
    prune.add_argument("model", help="Hub id, local folder, GGUF file, or a built-in name (tiny-mha, tiny-gqa, "
                       "smollm2-135m)")
    prune.add_argument("--output", "-o", required=True)
    prune.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    prune.add_argument("--resume", action="store_true", help="continue from the per-layer checkpoint")
    prune.add_argument("--checkpoint-dir", default=None, help="default: OUTPUT.checkpoint")
    prune.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    prune.add_argument("--trust-remote-code", action="store_true")
    prune.add_argument("--json", default=None, help="also write the report JSON here")
    prune.add_argument("--stream", action="store_true",
                       help="for models larger than CPU RAM: read one decoder layer at a time from the safetensors "
                            "shards and write it out as soon as it is pruned (works with --resume)")
    _add_prune_options(prune)
    prune.set_defaults(func=cmd_prune)

    demo = sub.add_parser("demo", help="prune the built-in model at 20%% and 50%% and compare with dense")
    demo.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.5])
    demo.add_argument("--model", default="auto", help="auto (smollm2-135m if installed, else tiny-mha), "
                      "tiny-mha, tiny-gqa or smollm2-135m")  # issue 13
    demo.add_argument("--nsamples", type=int, default=None, help="default 64 (tiny), 32 (smollm2-135m)")
    demo.add_argument("--seqlen", type=int, default=None, help="default 512 (tiny), 256 (smollm2-135m)")
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(func=cmd_demo)

    from slimgpt.evaluation.cli import register as register_eval
    from slimgpt.export.cli import register as register_export
    from slimgpt.finetune_cli import register as register_finetune

    for register in (register_eval, register_finetune, register_export):
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result: Any = args.func(args)
    except SlimGPTError as error:
        print(f"slimgpt: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimgpt: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
