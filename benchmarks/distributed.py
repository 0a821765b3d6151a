"""One process against two: does ``slimgpt prune`` across ranks give the single-process model, and how long?

Runs ``python -m slimgpt prune`` once in one process and once in ``--ranks`` processes with the variables
torchrun and accelerate launch set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: gloo on the
CPU), on the same model, options and calibration windows, then compares the two outputs: the kept heads
and FFN channels of every layer, and the largest weight difference relative to each tensor's scale.
The CPU cores are split between the ranks (OMP_NUM_THREADS), so both runs use the same cores.

    python benchmarks/distributed.py                                  # tiny-gqa, 16 x 256 tokens
    python benchmarks/distributed.py --models tiny-gqa,smollm2-135m --nsamples 8 --seqlen 128

A third run, one process with another --batch-size (the same sums, rounded in another order), is the
control: it shows how far float rounding alone moves the result.

Prints a markdown table (docs/benchmarks.md, "Pruning across processes").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prune(model: str, output: Path, ranks: int, options: list[str], cores: int) -> float:
    """Wall-clock seconds of ``slimgpt prune`` in ``ranks`` processes (start-up included)."""
    port, procs = _free_port(), []
    start = time.perf_counter()
    for rank in range(ranks):
        env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS=str(max(1, cores // ranks)))
        if ranks > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ranks),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, "-m", "slimgpt", "-q", "prune", model, "-o", str(output), *options]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for rank, proc in enumerate(procs):
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"rank {rank} of {ranks} failed:\n{err[-3000:]}")
    return time.perf_counter() - start


def compare(ours: Path, reference: Path) -> tuple[str, float | None]:
    """The kept heads and channels against the reference ("same", or where they first differ and by how many),
    and, when they are the same, the largest max|a - b| / max|b| over the weight tensors."""
    reports = [json.loads((f / "slimgpt_report.json").read_text()) for f in (ours, reference)]
    for mine, theirs in zip(reports[0]["layers"], reports[1]["layers"], strict=True):
        heads = len(set(mine["kept_heads"]) ^ set(theirs["kept_heads"])) // 2
        channels = len(set(mine["kept_channels"]) ^ set(theirs["kept_channels"])) // 2
        if heads or channels:
            return (f"from layer {mine['layer']}: {heads} of {theirs['heads_total']} heads, {channels} of "
                    f"{theirs['ffn_total']} channels swapped"), None
    a, b = (dict(kv for file in sorted(f.glob("*.safetensors")) for kv in load_file(str(file)).items())
            for f in (ours, reference))
    worst = 0.0
    for name, tensor in b.items():
        scale = tensor.float().abs().max().clamp_min(1e-12)
        worst = max(worst, float((a[name].float() - tensor.float()).abs().max() / scale))
    return "same", worst


def errors(folder: Path) -> list[float]:
    """Each layer's o_proj and down_proj reconstruction errors (compensated) from the report."""
    layers = json.loads((folder / "slimgpt_report.json").read_text())["layers"]
    return [e for r in layers for e in (r["attn_error"], r["ffn_error"]) if e is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-gqa")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    options = ["--calib", "builtin", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--ratio",
               str(args.ratio), "--device", "cpu", "--batch-size", "4"]  # a later --batch-size wins (the control)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            runs = {"1 process": (1, options), f"{args.ranks} ranks": (args.ranks, options),
                    "1 process, --batch-size 2 (control)": (1, [*options, "--batch-size", "2"])}
            folders: dict[str, Path] = {}
            for label, (ranks, opts) in runs.items():
                folders[label] = Path(tmp) / f"{model}-{len(folders)}"
                wall = prune(model, folders[label], ranks, opts, args.cores)
                stages = sum(json.loads((folders[label] / "slimgpt_report.json").read_text())["stage_seconds"].values())
                kept, worst = compare(folders[label], folders["1 process"])
                ref, mine = errors(folders["1 process"]), errors(folders[label])
                gap = max(abs(m - r) / max(abs(r), 1e-30) for m, r in zip(mine, ref, strict=True))
                rows.append(f"| {model} | {label} | {wall:.1f} s ({stages:.1f} s) | {kept} | "
                            f"{'-' if worst is None else f'{worst:.1e}'} | {gap:.1e} |")
    print(f"torch {torch.__version__}, {args.cores} CPU cores, load average {os.getloadavg()[0]:.1f} at the end; "
          f"--ratio {args.ratio}, calibration builtin, {args.nsamples} x {args.seqlen} tokens, --batch-size 4\n")
    print("| model | run | wall, start-up included (rank 0's stages) | kept heads / channels vs 1 process "
          "| max weight difference / scale | max relative difference of the layer errors |")
    print("| --- | --- | ---: | --- | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
