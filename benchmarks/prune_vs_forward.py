"""End-to-end pruning time against the calibration forward passes alone.

The pruning driver makes three passes over the calibration tokens per layer and solves two OBS problems.
Pass 1 runs the dense attention half up to o_proj (o_proj's input Hessian; those inputs are kept);
pass 2 is o_proj's matmul on the kept inputs plus the FFN half up to down_proj (down_proj's input
Hessian); pass 3 is the pruned FFN half (propagation). That is about 1.3-1.4 dense layer forwards plus
the Hessian products X^T X (post-norm OPT runs its attention half in all three passes). The yardstick is
one plain forward of the whole dense model over the same N x S calibration tokens (no pruning, no hooks,
lm_head included). The target: pruning takes at most 2x that forward.

For each ratio and solver the dense model is copied, pruned with ``prune_model``, and timed end to end;
the report's ``stage_seconds`` split it into calibration_forward (capturing layer 0's inputs), hessians,
solve and propagation; ``other`` is what none of them covers (moving layers, shrinking, bookkeeping).

    python benchmarks/prune_vs_forward.py                       # built-in tiny-mha
    python benchmarks/prune_vs_forward.py /path/to/model --nsamples 64 --seqlen 512 \
        --json benchmarks/results/prune_vs_forward.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from slimgpt import PruneConfig, load_model, prune_model

STAGES = ("calibration_forward", "hessians", "solve", "propagation")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibration_ids(source: str, tokenizer: Any, vocab_size: int, nsamples: int, seqlen: int,
                    seed: int) -> torch.Tensor:
    """``random`` token ids (timing does not depend on the text), or windows of a slimgpt.data source."""
    if source == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (nsamples, seqlen), generator=generator)
    from slimgpt.data import calibration_windows

    return calibration_windows(tokenizer, source, nsamples, seqlen, seed)


@torch.no_grad()
def forward_seconds(model: Any, ids: torch.Tensor, batch_size: int, device: torch.device, repeats: int) -> float:
    """Best of ``repeats`` timings of one full forward over ``ids`` (the model on ``device``)."""
    model.to(device)
    model(input_ids=ids[:batch_size].to(device), use_cache=False)  # warm-up: one-off kernel and allocator costs
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for first in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[first:first + batch_size].to(device), use_cache=False)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    model.to("cpu")
    return best


def prune_seconds(dense: Any, ids: torch.Tensor, ratio: float, solver: str, args: argparse.Namespace) -> dict:
    model = copy.deepcopy(dense)  # outside the timed region
    config = PruneConfig(ratio=ratio, solver=solver, nsamples=ids.shape[0], seqlen=ids.shape[1],
                         batch_size=args.batch_size, device=args.device, offload=not args.no_offload)
    _sync(torch.device(args.device))
    start = time.perf_counter()
    report = prune_model(model, config, ids, progress=False)
    _sync(torch.device(args.device))
    seconds = time.perf_counter() - start
    stages = {name: report.stage_seconds.get(name, 0.0) for name in STAGES}
    stages["other"] = seconds - sum(stages.values())
    return {"ratio": ratio, "solver": solver, "prune_seconds": seconds, "stages": stages,
            "realised_ratio": report.realised_ratio, "peak_memory_bytes": report.peak_memory_bytes}


def markdown(result: dict) -> str:
    forward = result["forward_seconds"]
    lines = [
        f"`{result['model']}` on {result['device']} ({result['threads']} threads), calibration "
        f"{result['nsamples']} x {result['seqlen']} tokens, batch {result['batch_size']}; one full forward of the "
        f"dense model over them: {forward:.2f} s.",
        "",
        "| ratio | solver | prune s | x forward | <= 2x | calibration_forward | hessians | solve | propagation | "
        "other |",
        "| ---: | --- | ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        s = row["stages"]
        times = forward * 2 >= row["prune_seconds"]
        lines.append(
            f"| {row['ratio']:.0%} | {row['solver']} | {row['prune_seconds']:.2f} | "
            f"{row['prune_seconds'] / forward:.2f} | {'yes' if times else 'no'} | "
            + " | ".join(f"{s[name]:.2f}" for name in (*STAGES, "other")) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="tiny-mha", help="built-in name, local folder or cached Hub id")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--solvers", default="fast,reference")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--calib", default="random", help="random token ids, or a slimgpt.data source (builtin, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-offload", action="store_true", help="keep calibration activations on --device")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2, help="forward timings; the best is kept")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    ids = calibration_ids(args.calib, tokenizer, dense.config.vocab_size, args.nsamples, args.seqlen, args.seed)
    forward = forward_seconds(dense, ids, args.batch_size, torch.device(args.device), args.repeats)
    rows = [prune_seconds(dense, ids, float(ratio), solver, args)
            for ratio in args.ratios.split(",") for solver in args.solvers.split(",")]
    result = {
        "model": args.model, "device": args.device, "threads": args.threads, "dtype": str(dense.dtype),
        "nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size, "calib": args.calib,
        "forward_seconds": forward, "rows": rows,
        "decoder_layers": dense.config.num_hidden_layers, "hidden_size": dense.config.hidden_size,
        "platform": platform.platform(), "torch": torch.__version__,
    }
    print(markdown(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
