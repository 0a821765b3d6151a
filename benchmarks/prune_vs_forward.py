"""End-to-end pruning time against the calibration forward passes alone.

Per pre-norm layer the driver runs each linear once over the calibration tokens: pass 1 the dense
attention half up to o_proj (o_proj's input Hessian; those inputs are kept); pass 2 o_proj's matmul on
the kept inputs plus the FFN half up to down_proj (down_proj's input Hessian; those inputs are kept where
they fit the memory budget); pass 3 (propagation) the pruned down_proj on the kept channels' inputs.
That is about one dense layer forward plus the Hessian products X^T X (post-norm OPT runs its attention
half in all three passes). The yardstick is one plain forward of the whole dense model over the same
N x S calibration tokens (no pruning, no hooks, lm_head included), in batches of 8 windows.
The target: pruning takes at most 1.5x that forward.

The machine this project runs on is shared, so its load moves during a run: the forward is timed before
the first ratio, between ratios and after the last, and each row is compared with the mean of the two
forward timings around it (all timings and the load averages are in the JSON).

For each ratio and solver the dense model is copied, pruned with ``prune_model``, and timed end to end;
the report's ``stage_seconds`` split it into calibration_forward (capturing layer 0's inputs), hessians,
solve and propagation; ``other`` is what none of them covers (moving layers, shrinking, bookkeeping).
``--batch-size 0`` (the default) lets the driver choose the batch size from the memory budget; the one it
chose is recorded.

    python benchmarks/prune_vs_forward.py                       # built-in tiny-mha
    python benchmarks/prune_vs_forward.py smollm2-135m --nsamples 128 --seqlen 512 \
        --json benchmarks/results/prune_vs_forward.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see slimgpt/__init__.py)

import torch

from slimgpt import PruneConfig, load_model, prune_model
from slimgpt.layerwise.memory import available_bytes, resolve_batch_size
from slimgpt.models.families import get_adapter

STAGES = ("calibration_forward", "hessians", "solve", "propagation")
TARGET = 1.5  # pruning time / one dense forward over the calibration tokens


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


def prune_seconds(dense: Any, ids: torch.Tensor, ratio: float, solver: str, batch_size: int,
                  args: argparse.Namespace) -> dict:
    model = copy.deepcopy(dense)  # outside the timed region
    config = PruneConfig(ratio=ratio, solver=solver, nsamples=ids.shape[0], seqlen=ids.shape[1],
                         batch_size=batch_size, device=args.device, offload=not args.no_offload)
    _sync(torch.device(args.device))
    start = time.perf_counter()
    report = prune_model(model, config, ids, progress=False)
    _sync(torch.device(args.device))
    seconds = time.perf_counter() - start
    stages = {name: report.stage_seconds.get(name, 0.0) for name in STAGES}
    stages["other"] = seconds - sum(stages.values())
    return {"ratio": ratio, "solver": solver, "prune_seconds": seconds, "stages": stages,
            "batch_size": report.config["batch_size"], "realised_ratio": report.realised_ratio,
            "peak_memory_bytes": report.peak_memory_bytes, "load_after": os.getloadavg()}


def markdown(result: dict) -> str:
    lines = [
        f"`{result['model']}` on {result['device']} ({result['threads']} threads), calibration "
        f"{result['nsamples']} x {result['seqlen']} tokens, batch {result['batch_size']} "
        f"({result['batch_choice']}); dense forward over them (batch {result['forward_batch_size']}): "
        + ", ".join(f"{t:.2f}" for t in result["forward_timings"]) + " s (before, between and after the rows); "
        f"load average {result['load_before'][0]:.1f} before, {result['load_after'][0]:.1f} after.",
        "",
        f"| ratio | solver | prune s | forward s | x forward | <= {TARGET}x | calibration_forward | hessians | solve | "
        "propagation | other |",
        "| ---: | --- | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        s = row["stages"]
        forward = row["forward_seconds"]
        lines.append(
            f"| {row['ratio']:.0%} | {row['solver']} | {row['prune_seconds']:.2f} | {forward:.2f} | "
            f"{row['prune_seconds'] / forward:.2f} | {'yes' if row['prune_seconds'] <= TARGET * forward else 'no'} | "
            + " | ".join(f"{s[name]:.2f}" for name in (*STAGES, "other")) + " |")
    return "\n".join(lines)


def chosen_batch_size(dense: Any, ids: torch.Tensor, args: argparse.Namespace) -> tuple[int, str]:
    """The batch size the driver uses (``--batch-size``, or its automatic choice) and how it was chosen."""
    if args.batch_size:
        return args.batch_size, "--batch-size"
    config = PruneConfig(nsamples=ids.shape[0], seqlen=ids.shape[1], device=args.device,
                         offload=not args.no_offload)
    size = resolve_batch_size(config, dense, get_adapter(dense.config), ids).batch_size
    return size, f"automatic, {available_bytes(torch.device(args.device)) / 2**30:.1f} GiB available"


def save(result: dict, path: Path) -> None:
    """Add ``result`` to the JSON list at ``path``, replacing an earlier run of the same model and shape."""
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    same = ("model", "nsamples", "seqlen", "device", "ratios")
    runs = [r for r in runs if any(r.get(k) != result[k] for k in same)] + [result]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="tiny-mha", help="built-in name, local folder or cached Hub id")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--solvers", default="fast")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=0, help="0: the driver's automatic choice")
    parser.add_argument("--forward-batch-size", type=int, default=8,
                        help="windows a forward of the yardstick (0: the pruning's batch size; its logits are "
                             "batch x seqlen x vocab floats)")
    parser.add_argument("--calib", default="random", help="random token ids, or a slimgpt.data source (builtin, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-offload", action="store_true", help="keep calibration activations on --device")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=1, help="forward timings at each point; the best is kept")
    parser.add_argument("--json", default=None, help="add the run to this JSON file (replacing the same model's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    ids = calibration_ids(args.calib, tokenizer, dense.config.vocab_size, args.nsamples, args.seqlen, args.seed)
    batch_size, choice = chosen_batch_size(dense, ids, args)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    forward_batch = args.forward_batch_size or batch_size
    timings = [forward_seconds(dense, ids, forward_batch, device, args.repeats)]
    rows = []
    for ratio in args.ratios.split(","):
        for solver in args.solvers.split(","):
            row = prune_seconds(dense, ids, float(ratio), solver, batch_size, args)
            timings.append(forward_seconds(dense, ids, forward_batch, device, args.repeats))
            row["forward_seconds"] = (timings[-2] + timings[-1]) / 2
            rows.append(row)
    result = {
        "model": args.model, "device": args.device, "threads": args.threads, "dtype": str(dense.dtype),
        "nsamples": args.nsamples, "seqlen": args.seqlen, "ratios": args.ratios, "batch_size": batch_size,
        "batch_choice": choice, "forward_batch_size": forward_batch,
        "calib": args.calib, "forward_timings": timings, "rows": rows, "target": TARGET,
        "load_before": load_before, "load_after": os.getloadavg(), "cpus": os.cpu_count(),
        "decoder_layers": dense.config.num_hidden_layers, "hidden_size": dense.config.hidden_size,
        "platform": platform.platform(), "torch": torch.__version__,
        "command": "python benchmarks/prune_vs_forward.py " + " ".join(sys.argv[1:]),
    }
    print(markdown(result))
    if args.json:
        save(result, Path(args.json))


if __name__ == "__main__":
    main()
