"""``slimgpt prune``: parse the options into a ``PruneConfig``, prune (in memory or streamed), save, print."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimgpt.cli import common
from slimgpt.config import GQA_POLICIES, HEAD_SCORES, SOLVERS, PruneConfig
from slimgpt.config import METHODS as METHOD_NAMES
from slimgpt.methods import METHODS
from slimgpt.solver.schedule import ALL_SCHEDULES
from slimgpt.solver.structured import GROUP_SCHEDULES

DTYPES = ("auto", "float32", "bfloat16", "float16")


def method_names() -> list[str]:
    """The registered methods, in the order of ``slimgpt.config.METHODS`` (any others after, by name)."""
    order = {name: index for index, name in enumerate(METHOD_NAMES)}
    return sorted(METHODS, key=lambda name: (order.get(name, len(order)), name))


def method_help() -> str:
    """``--method``'s help: one line per registered method, from its ``help`` attribute."""
    lines = ["pruning method (default %(default)s):"]
    lines += [f"{name}: {METHODS[name].help}" for name in method_names()]
    return "\n".join(line.replace("%", "%%") if index else line for index, line in enumerate(lines))


def register(subparsers: common.Subparsers) -> None:
    parser = subparsers.add_parser("prune", help="prune a model and save the smaller model",
                                   formatter_class=common.LineHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hub id, local folder, GGUF file, or a built-in name (tiny-mha, tiny-gqa, "
                        "smollm2-135m)")
    common.add_saving(parser, resume_help="continue from the per-layer checkpoint")
    common.add_dtype(parser, DTYPES, default="auto")
    common.add_trust_remote_code(parser)
    common.add_json(parser, help="also write the report JSON here")
    parser.add_argument("--stream", action="store_true",
                        help="for models larger than CPU RAM: read one decoder layer at a time from the safetensors "
                             "shards and write it out as soon as it is pruned (works with --resume)")
    parser.add_argument("--dist-timeout", type=common.positive_int, default=1800,
                        help="under torchrun / accelerate launch: seconds a rank waits for the others before it fails "
                             "(default %(default)s)")
    add_prune_options(parser)


def add_prune_options(parser: argparse.ArgumentParser) -> None:
    """Every ``PruneConfig`` field, with its default."""
    d = PruneConfig()
    parser.add_argument("--method", choices=method_names(), default=d.method, help=method_help())
    parser.add_argument("--ratio", type=float, default=d.ratio,
                        help="fraction of decoder-layer parameters to remove, in [0, 1) (default %(default)s)")
    parser.add_argument("--calib", default=d.calib,
                        help="calibration data: c4, wikitext2, ptb, alpaca, gpt4-alpaca, builtin, english, or a local "
                             ".txt/.jsonl file or directory (default %(default)s)")
    parser.add_argument("--nsamples", type=int, default=d.nsamples)
    parser.add_argument("--seqlen", type=int, default=d.seqlen)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--schedule", choices=ALL_SCHEDULES, default=d.schedule,
                        help="per-layer ratios; auto: SlimGPT's counts from measured costs (default %(default)s)")
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
    common.add_device(parser, default=d.device, help="compute device for the layer being pruned")
    parser.add_argument("--no-offload", action="store_true", help="keep calibration activations on --device")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                        help="calibration windows a pass (default 0: the largest that half the free memory holds)")
    parser.add_argument("--taylor-samples", type=int, default=d.taylor_samples,
                        help="llm-pruner: calibration windows in its gradient pass (default %(default)s)")
    parser.add_argument("--taylor-seqlen", type=int, default=d.taylor_seqlen,
                        help="llm-pruner: tokens of each window in its gradient pass (default %(default)s)")
    parser.add_argument("--spread", type=float, default=None,
                        help="dynamic-slicing: share of the mean slice that follows layer redundancy, in [0, 1] "
                             "(default 0.25; 0 is SliceGPT's constant width)")
    parser.add_argument("--eps", type=float, default=None,
                        help="modegpt: smoothing eps of the per-layer budget softmax(-block importance / eps), > 0 "
                             "(default 0.15)")


def config_from(args: argparse.Namespace) -> PruneConfig:
    return PruneConfig(
        method=args.method, ratio=args.ratio, schedule=args.schedule, first_ratio=args.first_ratio,
        first_fraction=args.first_fraction, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
        seed=args.seed, percdamp=args.percdamp, head_score=args.head_score, compensate=not args.no_compensation,
        group_schedule=args.group_schedule, group_start=args.group_start, group_floor=args.group_floor,
        group_fraction=args.group_fraction, gqa_policy=args.gqa_policy, solver=args.solver, round_to=args.round_to,
        device=args.device, offload=not args.no_offload, batch_size=args.batch_size,
        taylor_samples=args.taylor_samples, taylor_seqlen=args.taylor_seqlen, spread=args.spread, eps=args.eps,
    )


def run(args: argparse.Namespace) -> int:
    import slimgpt.layerwise.distributed as distributed
    from slimgpt.errors import ConfigError
    from slimgpt.methods import get_method
    from slimgpt.models.slim import load_model
    from slimgpt.preflight import RunPaths, check_prune
    from slimgpt.prune import cannot_distribute, prune_model
    from slimgpt.saving import save_pruned

    config = config_from(args)  # validates every option before any work
    # torchrun / accelerate launch (WORLD_SIZE > 1): join the ranks; rank 0 alone checks, locks and writes
    with distributed.launched(config.device, args.dist_timeout) as group:
        if group is not None and cannot_distribute(get_method(config)):
            raise ConfigError(cannot_distribute(get_method(config)))
        held: list[RunPaths] = []

        def preflight() -> tuple[Path, Path]:
            held.append(check_prune(args, config))  # every check, then the output's lock
            return held[0].output, held[0].checkpoint

        output, checkpoint = distributed.from_main(preflight)
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
            distributed.from_main(lambda: save_pruned(model, tokenizer, report, output, overwrite=args.overwrite))
        if held:  # rank 0
            common.finish_saved(report, output, checkpoint, args.json, held[0].lock)
    return 0
