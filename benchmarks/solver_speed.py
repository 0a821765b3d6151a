"""Time the exact fast solver against the straightforward one on LLaMA-7B-shaped layers (issue 6).

o_proj: 4096 x 4096 with 32 heads of 128; down_proj: 4096 x 11008. The Hessian is a random
positive-definite matrix with a decaying spectrum (H = B B^T / r + damping, B: d x r), float32.
Both solvers must remove the same heads/channels and give the same weights (relative error reported).

    python benchmarks/solver_speed.py --json benchmarks/results/solver_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from slimgpt.solver.hessian import prepare_hessian
from slimgpt.solver.obs import make_solver
from slimgpt.solver.structured import greedy_remove_units, group_sizes, remove_channels


def random_hessian(d: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d, rank, generator=g) * torch.linspace(1.0, 0.05, rank)[None, :]
    H = B @ B.t() / rank
    H += torch.diag(torch.rand(d, generator=g) * 0.1)
    return H


def run_case(kind: str, ratio: float, solver: str, W: torch.Tensor, H: torch.Tensor, head_dim: int) -> dict:
    start = time.perf_counter()
    s = make_solver(solver, W, H, compensate=True)
    if kind == "heads":
        n_heads = W.shape[1] // head_dim
        units = torch.arange(W.shape[1]).view(n_heads, head_dim)
        removed = greedy_remove_units(s, units, round(ratio * n_heads), score="gcd")
        rounds = len(removed)
    else:
        sizes = group_sizes(round(ratio * W.shape[1]))
        removed = sorted(remove_channels(s, sizes))
        rounds = len(sizes)
    return {"seconds": time.perf_counter() - start, "removed": removed, "weight": s.weight, "rounds": rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--d-ff", type=int, default=11008)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--kinds", default="heads,ffn")
    parser.add_argument("--rank", type=int, default=1024, help="rank of the random Hessian's main part")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # Warm-up: first calls of the LAPACK paths pay one-off costs that are not the solvers'.
    warm = torch.randn(64, 256)
    for solver in ("fast", "reference"):
        run_case("heads", 0.5, solver, warm, prepare_hessian(random_hessian(256, 64, 0), warm.clone(), 0.01), 32)
    rows = []
    for kind in args.kinds.split(","):
        d_in = args.d_model if kind == "heads" else args.d_ff
        g = torch.Generator().manual_seed(1)
        W = torch.randn(args.d_model, d_in, generator=g) / d_in**0.5
        H = prepare_hessian(random_hessian(d_in, args.rank, seed=2), W, 0.01)
        for ratio in (float(r) for r in args.ratios.split(",")):
            fast = run_case(kind, ratio, "fast", W, H, args.head_dim)
            ref = run_case(kind, ratio, "reference", W, H, args.head_dim)
            rel = float((fast["weight"] - ref["weight"]).norm() / ref["weight"].norm())
            name = f"o_proj {args.d_model}x{d_in} ({d_in // args.head_dim} heads)" if kind == "heads" \
                else f"down_proj {args.d_model}x{d_in}"
            row = {"layer": name,
                   "ratio": ratio, "rounds": fast["rounds"], "reference_s": round(ref["seconds"], 2),
                   "fast_s": round(fast["seconds"], 2), "speedup": round(ref["seconds"] / fast["seconds"], 2),
                   "same_removed_set": fast["removed"] == ref["removed"] if kind == "heads"
                   else sorted(fast["removed"]) == sorted(ref["removed"]),
                   "weight_rel_diff": rel}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| layer | ratio | rounds | reference (s) | fast (s) | speed-up | same set | weight rel. diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        print(f"| {r['layer']} | {r['ratio']:.0%} | {r['rounds']} | {r['reference_s']} | {r['fast_s']} | "
              f"{r['speedup']}x | {r['same_removed_set']} | {r['weight_rel_diff']:.1e} |")
    if args.json:
        meta = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                "command": "python benchmarks/solver_speed.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                          vars(args).items() if k != "json")}
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
