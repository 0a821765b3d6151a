"""One process against two: does ``slimgpt prune`` across ranks give the single-process model, and how long?

Runs ``python -m slimgpt prune`` once in one process and once in ``--ranks`` processes with the variables
torchrun and accelerate launch set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT: gloo on the
CPU), on the same model, options and calibration windows, then compares the two outputs: the kept heads
and FFN channels of every layer, and the largest weight difference relative to each tensor's scale.
The CPU cores are split between the ranks (OMP_NUM_THREADS), so both runs use the same cores.

    python benchmarks/distributed.py                                  # tiny-gqa and smollm2-135m
    python benchmarks/distributed.py --models tiny-gqa --nsamples 16 --seqlen 128 --ranks 2

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


def compare(ours: Path, reference: Path) -> tuple[bool, float]:
    """(same kept heads and channels in every layer, largest max|a - b| / max|b| over the weight tensors)."""
    reports = [json.loads((f / "slimgpt_report.json").read_text()) for f in (ours, reference)]
    same = all([r[k] for r in reports[0]["layers"]] == [r[k] for r in reports[1]["layers"]]
               for k in ("kept_heads", "kept_channels"))
    a, b = (dict(kv for file in sorted(f.glob("*.safetensors")) for kv in load_file(str(file)).items())
            for f in (ours, reference))
    worst = 0.0
    for name, tensor in b.items():
        if a[name].shape != tensor.shape:
            return False, float("inf")
        scale = tensor.float().abs().max().clamp_min(1e-12)
        worst = max(worst, float((a[name].float() - tensor.float()).abs().max() / scale))
    return same, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-gqa,smollm2-135m")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    options = ["--calib", "builtin", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--ratio",
               str(args.ratio), "--device", "cpu", "--batch-size", "4"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            single = prune(model, Path(tmp) / f"{model}-1", 1, options, args.cores)
            multi = prune(model, Path(tmp) / f"{model}-{args.ranks}", args.ranks, options, args.cores)
            same, worst = compare(Path(tmp) / f"{model}-{args.ranks}", Path(tmp) / f"{model}-1")
            stages = [json.loads((Path(tmp) / f"{model}-{r}" / "slimgpt_report.json").read_text())["stage_seconds"]
                      for r in (1, args.ranks)]
            totals = [sum(s.values()) for s in stages]
            rows.append(f"| {model} | {args.nsamples} x {args.seqlen} | {single:.1f} s ({totals[0]:.1f} s) "
                        f"| {multi:.1f} s ({totals[1]:.1f} s) | {'yes' if same else 'NO'} | {worst:.1e} |")
    print(f"torch {torch.__version__}, {args.cores} CPU cores, load average {os.getloadavg()[0]:.1f} at the end; "
          f"--ratio {args.ratio}, calibration builtin\n")
    print(f"| model | windows x tokens | 1 process: wall (stages) | {args.ranks} ranks: wall (rank 0's stages) "
          "| same kept sets | max weight difference / scale |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
