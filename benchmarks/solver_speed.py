"""Time the exact fast solver against the straightforward one over a grid of LLaMA-shaped layers.

Grid: d in {1024, 2048, 4096}; o_proj d x d with head_dim 128 (d/128 heads) and with 32 heads (head_dim
d/32; at d=1024 that is issue 17's quarter-scale shape, at 4096 both are LLaMA-7B's 32 heads of 128);
down_proj d x 2.6875d (LLaMA-7B's 4096 x 11008 at d=4096); 20% and 50%; the FFN under both group
schedules (``halving``, ``authors``). The Hessian is a random positive-definite matrix with a decaying
spectrum (H = B B^T / r + diagonal, B: d x r), float32. Both solvers must remove the same heads/channels
and give the same weights (relative differences reported).

Full-scale down_proj (d_in >= --cap-from) times the reference on its first --reference-rounds rounds only
(a reference round re-inverts the whole Hessian, so its cost hardly depends on the round) and estimates
its total as rounds x the median timed round; the fast solver is timed on all rounds, and the sets and
weights are compared after the timed rounds. --cap-from 0 runs every reference in full.

    python benchmarks/solver_speed.py --threads 1 --json benchmarks/results/solver_speed_grid.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (docs/benchmarks.md section 9)

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


class Clock:
    """Wall and CPU seconds since the last lap. With one thread the CPU time is the solver's work alone,
    which other jobs sharing the machine inflate far less than the wall time."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        lap = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return lap


def run_heads(solver: str, W: torch.Tensor, H: torch.Tensor, head_dim: int, ratio: float) -> dict[str, Any]:
    clock = Clock()
    s = make_solver(solver, W, H, compensate=True)
    n_heads = W.shape[1] // head_dim
    units = torch.arange(W.shape[1]).view(n_heads, head_dim)  # [n_heads, head_dim] column indices
    removed = greedy_remove_units(s, units, round(ratio * n_heads), score="gcd")
    weight = s.weight
    wall, cpu = clock.lap()
    return {"seconds": cpu, "wall_s": wall, "removed": removed, "weight": weight, "rounds": len(removed)}


def run_ffn(solver: str, W: torch.Tensor, H: torch.Tensor, sizes: list[int]) -> dict[str, Any]:
    """Run the given rounds, timing each (the first one includes the solver's set-up)."""
    laps, rounds = [], []
    clock = Clock()
    s = make_solver(solver, W, H, compensate=True)
    s.expect_removals(sum(sizes))  # as remove_channels(s, sizes) does; here a round at a time, to time each
    for size in sizes:
        rounds.append(sorted(remove_channels(s, [size])))
        laps.append(clock.lap())
    weight = s.weight
    wall, cpu = clock.lap()
    laps[-1] = (laps[-1][0] + wall, laps[-1][1] + cpu)
    return {"seconds": sum(c for _, c in laps), "wall_s": sum(w for w, _ in laps), "round_s": [c for _, c in laps],
            "round_wall_s": [w for w, _ in laps], "removed": sorted(c for r in rounds for c in r),
            "removed_rounds": rounds, "weight": weight, "rounds": len(sizes)}


def tie_check(W: torch.Tensor, H: torch.Tensor, ref: dict[str, Any], fast: dict[str, Any]) -> dict[str, Any]:
    """Where the channel sets part: the fast solver, made to remove the reference's channels each round, is
    compared with it at the end (weights), and at the first round whose set differs, the fast solver's own
    errors of the channels only one of them chose are put against each other: a relative gap below float32's
    resolution of these errors (about 1e-5 here) is a tie that either solver may break either way."""
    s = make_solver("fast", W, H, compensate=True)
    s.expect_removals(sum(len(r) for r in ref["removed_rounds"]))
    first, gap = None, None
    for i, (mine, theirs) in enumerate(zip(fast["removed_rounds"], ref["removed_rounds"], strict=True)):
        if first is None and mine != theirs:
            errors = s.channel_errors()
            only_fast, only_ref = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
            worst_ref, best_fast = errors[only_ref].max(), errors[only_fast].min() if only_fast else errors[0]
            first, gap = i, float((worst_ref - best_fast).abs() / worst_ref)
        s.remove(torch.tensor(theirs))
    delta = s.weight - ref["weight"]
    return {"first_differing_round": first, "boundary_rel_gap": gap,
            "weight_rel_diff_on_reference_sets": float(delta.norm() / ref["weight"].norm()),
            "weight_max_rel_diff_on_reference_sets": float(delta.abs().max() / ref["weight"].abs().max())}


def compare(fast: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    delta = fast["weight"] - ref["weight"]
    return {"same_removed_set": fast["removed"] == ref["removed"],
            "weight_rel_diff": float(delta.norm() / ref["weight"].norm()),
            "weight_max_rel_diff": float(delta.abs().max() / ref["weight"].abs().max())}


def best_of(repeats: int, run: Any) -> dict[str, Any]:
    results = [run() for _ in range(repeats)]
    return min(results, key=lambda r: r["seconds"])


def cached_reference(cache: str | None, key: str, run: Any) -> dict[str, Any]:
    """The reference's result for ``key``: from ``cache`` (a folder) if an earlier run left it there, else run
    and store it (the weight as safetensors, the rest as JSON, with the time and load it was measured at).
    The reference does not change between fast-solver versions, so a full-scale reference (minutes) runs once."""
    if cache is None:
        return run()
    from safetensors.torch import load_file, save_file
    stem = os.path.join(cache, key.replace(" ", "_").replace("(", "").replace(")", ""))
    if os.path.exists(stem + ".json"):
        with open(stem + ".json") as handle:
            ref: dict[str, Any] = json.load(handle)
        ref["weight"] = load_file(stem + ".safetensors")["weight"]
        return ref
    load_before = os.getloadavg()
    ref = run()
    os.makedirs(cache, exist_ok=True)
    save_file({"weight": ref["weight"].contiguous()}, stem + ".safetensors")
    meta = {k: v for k, v in ref.items() if k != "weight"}
    meta["measured"] = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load_before": load_before,
                        "load_after": os.getloadavg()}
    with open(stem + ".json", "w") as handle:
        json.dump(meta, handle)
    ref["measured"] = meta["measured"]
    return ref


def heads_row(d: int, head_dim: int, ratio: float, repeats: int, rank: int, cache: str | None) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(d, d, generator=g) / d**0.5
    H = prepare_hessian(random_hessian(d, min(rank, d), seed=2), W, 0.01)
    fast = best_of(repeats, lambda: run_heads("fast", W, H, head_dim, ratio))
    ref = cached_reference(cache, f"heads_{d}_{head_dim}_{ratio}",
                           lambda: best_of(repeats, lambda: run_heads("reference", W, H, head_dim, ratio)))
    return {"layer": f"o_proj {d}x{d} ({d // head_dim} heads of {head_dim})", "kind": "heads", "d": d,
            "ratio": ratio, "schedule": "-", "rounds": fast["rounds"], "reference_s": ref["seconds"],
            "reference_wall_s": ref["wall_s"], "reference_rounds_timed": ref["rounds"], "fast_s": fast["seconds"],
            "fast_wall_s": fast["wall_s"], "reference_measured": ref.get("measured"), **compare(fast, ref)}


def reference_floor(H: torch.Tensor) -> tuple[float, float]:
    """CPU and wall seconds of what every reference round does at least: a Cholesky factorisation and
    ``cholesky_inverse`` of the (decoupled) d x d Hessian. rounds x this is a lower bound on the reference."""
    clock = Clock()
    torch.cholesky_inverse(torch.linalg.cholesky_ex(H.clone())[0])
    wall, cpu = clock.lap()
    return cpu, wall


def floor_row(d: int, d_ff: int, ratio: float, schedule: str, rank: int) -> dict[str, Any]:
    """The fast solver in full against a lower bound on the reference (rounds x reference_floor)."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(d, d_ff, generator=g) / d_ff**0.5
    H = prepare_hessian(random_hessian(d_ff, min(rank, d_ff), seed=2), W, 0.01)
    sizes = group_sizes(round(ratio * d_ff), schedule)
    fast = run_ffn("fast", W, H, sizes)
    cpu, wall = reference_floor(H)
    return {"layer": f"down_proj {d}x{d_ff}", "kind": "ffn", "d": d, "ratio": ratio, "schedule": schedule,
            "rounds": len(sizes), "reference_s": len(sizes) * cpu, "reference_wall_s": len(sizes) * wall,
            "reference_rounds_timed": 0, "reference_floor_s": cpu, "fast_s": fast["seconds"],
            "fast_wall_s": fast["wall_s"], "same_removed_set": None, "weight_rel_diff": None,
            "weight_max_rel_diff": None}


def ffn_row(d: int, d_ff: int, ratio: float, schedule: str, repeats: int, rank: int,
            cap: int | None, cache: str | None) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(d, d_ff, generator=g) / d_ff**0.5
    H = prepare_hessian(random_hessian(d_ff, min(rank, d_ff), seed=2), W, 0.01)
    sizes = group_sizes(round(ratio * d_ff), schedule)
    fast = best_of(repeats, lambda: run_ffn("fast", W, H, sizes))
    timed = sizes if cap is None else sizes[:cap]
    ref = cached_reference(cache, f"ffn_{d}_{d_ff}_{ratio}_{schedule}_{len(timed)}",
                           lambda: best_of(repeats, lambda: run_ffn("reference", W, H, timed)))
    check = fast if cap is None else run_ffn("fast", W, H, timed)
    scale = 1.0 if cap is None else len(sizes) * statistics.median(ref["round_s"]) / ref["seconds"]
    return {"layer": f"down_proj {d}x{d_ff}", "kind": "ffn", "d": d, "ratio": ratio, "schedule": schedule,
            "rounds": len(sizes), "reference_s": ref["seconds"] * scale, "reference_wall_s": ref["wall_s"] * scale,
            "reference_rounds_timed": len(timed), "fast_s": fast["seconds"], "fast_wall_s": fast["wall_s"],
            "reference_measured": ref.get("measured"), **compare(check, ref),
            **({} if check["removed"] == ref["removed"] else tie_check(W, H, ref, check))}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| layer | ratio | schedule | rounds | reference CPU (s) | fast CPU (s) | speed-up CPU | speed-up wall | "
             "same set | weight rel. diff (Frobenius / max) |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        estimated = r["reference_rounds_timed"] < r["rounds"]
        ref = f"{r['reference_s']:.2f}" + (f" (est., {r['reference_rounds_timed']} rounds timed)" if estimated else "")
        if "reference_floor_s" in r:
            ref = f">= {r['reference_s']:.1f} (rounds x {r['reference_floor_s']:.1f} s floor)"
        same = "-" if r["same_removed_set"] is None else str(r["same_removed_set"])
        diffs = "-" if r["weight_rel_diff"] is None else f"{r['weight_rel_diff']:.1e} / {r['weight_max_rel_diff']:.1e}"
        if r.get("first_differing_round") is not None:  # a tie: the weights compared on the reference's sets
            same = f"False: tie in round {r['first_differing_round']} (gap {r['boundary_rel_gap']:.1e})"
            diffs = (f"{r['weight_rel_diff_on_reference_sets']:.1e} / {r['weight_max_rel_diff_on_reference_sets']:.1e}"
                     " on the reference's sets")
        speedup = (">= " if "reference_floor_s" in r else "") + f"{r['speedup']:.1f}x"
        lines.append(f"| {r['layer']} | {r['ratio']:.0%} | {r['schedule']} | {r['rounds']} | {ref} | "
                     f"{r['fast_s']:.3f} | **{speedup}** | {r['speedup_wall']:.1f}x | {same} | {diffs} |")
    return "\n".join(lines)


def merge(paths: list[str], out: str | None) -> None:
    """One grid from parts: rows in grid order (d, ratio, heads before FFN), each part's meta kept."""
    parts = []
    for path in paths:
        with open(path) as handle:
            parts.append(json.load(handle))
    order = {"heads": 0, "ffn": 1}
    rows = sorted((row for part in parts for row in part["rows"]),
                  key=lambda r: (r["d"], r["ratio"], order[r["kind"]], r["layer"], r["schedule"]))
    print(table(rows))
    if out:
        with open(out, "w") as handle:
            json.dump({"meta": {"parts": [part["meta"] for part in parts]}, "rows": rows}, handle, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-models", default="1024,2048,4096")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--kinds", default="heads,ffn")
    parser.add_argument("--schedules", default="halving,authors")
    parser.add_argument("--head-dims", default=None, help="head_dims to time (default: 128 and d/32)")
    parser.add_argument("--rank", type=int, default=1024, help="rank of the random Hessian's main part")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="best-of repeats (both solvers) for d <= 1024")
    parser.add_argument("--cap-from", type=int, default=11008, help="d_in from which the reference is capped")
    parser.add_argument("--reference-rounds", type=int, default=6)
    parser.add_argument("--json", default=None)
    parser.add_argument("--reference-floor", action="store_true",
                        help="FFN rows: no reference run; a lower bound on it (rounds x one Cholesky + inverse)")
    parser.add_argument("--reference-cache", default=None, metavar="DIR",
                        help="reuse (or store) each row's reference result in DIR instead of rerunning it")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="only combine the rows of earlier --json outputs (parts of the grid run side by side) "
                             "into --json and print the table")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.json)
        return
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()

    # Warm-up: first calls of the LAPACK paths pay one-off costs that are not the solvers'.
    warm = torch.randn(64, 512)
    for solver in ("fast", "reference"):
        run_heads(solver, warm, prepare_hessian(random_hessian(512, 64, 0), warm.clone(), 0.01), 32, 0.5)
    rows = []
    for d in (int(x) for x in args.d_models.split(",")):
        repeats = args.repeats if d <= 1024 else 1
        d_ff = d * 43 // 16  # LLaMA-7B's 11008 / 4096
        cap = args.reference_rounds if 0 < args.cap_from <= d_ff else None
        for ratio in (float(r) for r in args.ratios.split(",")):
            specs: list[tuple[str, Any]] = []
            if "heads" in args.kinds:
                dims = {128, d // 32} if args.head_dims is None else {int(x) for x in args.head_dims.split(",")}
                specs += [("heads", hd) for hd in sorted(dims)]
            if "ffn" in args.kinds:
                specs += [("ffn", schedule) for schedule in args.schedules.split(",")]
            for kind, what in specs:
                row = heads_row(d, what, ratio, repeats, args.rank, args.reference_cache) if kind == "heads" \
                    else floor_row(d, d_ff, ratio, what, args.rank) if args.reference_floor \
                    else ffn_row(d, d_ff, ratio, what, repeats, args.rank, cap, args.reference_cache)
                row["speedup"] = row["reference_s"] / row["fast_s"]
                row["speedup_wall"] = row["reference_wall_s"] / row["fast_wall_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n" + table(rows))
    if args.json:
        meta = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                "clock": "speedup: process CPU time (1 thread: the solver's own work); speedup_wall: wall time",
                "load": f"load average (1, 5, 15 min) at start {load_start}, at end {os.getloadavg()}",
                "command": "python benchmarks/solver_speed.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                          vars(args).items() if k != "json")}
        with open(args.json, "w") as handle:
            json.dump({"meta": meta, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
