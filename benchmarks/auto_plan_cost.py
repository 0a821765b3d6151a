"""What ``--schedule auto``'s plan costs and buys: its settings against log-increase, one process.

Each variant prunes a copy of the model and is timed end to end, with the plan's share; PPL on the paper
tables' held-out 128-token windows (100, evenly spread); the JSON gets every row and the allocation.
Variants: ``li`` (log-increase), or ``auto[:tokens][:exact][:all]``: the sensitivity on ``tokens`` tokens
(default the shipped SENSITIVITY_TOKENS), ``exact`` the whole head per probe instead of the top-token KL,
``all`` every calibration window in the planning pass (no PLAN_TOKENS_PER_INPUT cap). ``m:METHOD`` prunes
with another method (``flap``, ``slicegpt``, ...: its defaults) on the same windows, to the same ratio of
decoder parameters, for a baseline at the same calibration.
``--kl-accuracy K1,K2`` instead compares the top-token KL at those K with the exact one on the plan's own
probes (at the first ratio).

    python benchmarks/auto_plan_cost.py smollm2-135m --ratios 0.2,0.5 --variants li,auto,auto:exact,auto:256
    python benchmarks/auto_plan_cost.py smollm2-135m --nsamples 128 --seqlen 512 --ratios 0.2 \
        --variants li,auto,auto:all
    python benchmarks/auto_plan_cost.py smollm2-135m --ratios 0.2 --kl-accuracy 64,256,1024
    python benchmarks/auto_plan_cost.py smollm2-135m --nsamples 128 --seqlen 512 --ratios 0.2,0.5 \
        --variants li,m:flap,m:slicegpt --long
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see slimgpt/__init__.py)
import torch
from paper_bench import spread

import slimgpt.methods.auto_divergence as divergence
import slimgpt.methods.auto_schedule as auto
import slimgpt.methods.auto_sensitivity as sensitivity
from slimgpt import PruneConfig, load_model, prune_model
from slimgpt.data import calibration_windows, eval_windows
from slimgpt.evaluation.ppl import perplexity
from slimgpt.models.families import get_adapter

SHIPPED = (auto.SENSITIVITY_TOKENS, auto.PLAN_TOKENS_PER_INPUT, sensitivity.linear_head)


def _set(variant: str) -> str:
    """Set the plan's module constants for ``variant``; its schedule's name."""
    parts = variant.split(":")
    tokens = next((int(p) for p in parts[1:] if p.isdigit()), SHIPPED[0])
    auto.SENSITIVITY_TOKENS = tokens
    auto.PLAN_TOKENS_PER_INPUT = 10**9 if "all" in parts else SHIPPED[1]
    sensitivity.linear_head = (lambda *_: None) if "exact" in parts else SHIPPED[2]  # type: ignore[assignment]
    return "log-increase" if parts[0] == "li" else "auto"


def run_variant(model: Any, calibration: torch.Tensor, held_out: torch.Tensor, ratio: float, variant: str,
                long_windows: torch.Tensor | None = None) -> dict:
    if variant.startswith("m:"):
        _set("li")  # the shipped plan settings; the method's own defaults otherwise
        config = PruneConfig(method=variant[2:], ratio=ratio)
    else:
        config = PruneConfig(ratio=ratio, schedule=_set(variant))
    pruned = copy.deepcopy(model)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    report = prune_model(pruned, config, calibration, progress=False)
    seconds = time.perf_counter() - start
    schedule = report.schedule
    return {"ratio": ratio, "variant": variant, "prune_s": round(seconds, 2),
            "plan_s": round(report.stage_seconds.get("plan", 0.0), 2),
            "ppl128": round(perplexity(pruned, held_out, batch_size=8, progress=False), 3),
            "ppl512": None if long_windows is None else round(perplexity(pruned, long_windows, batch_size=4,
                                                                         progress=False), 3),
            "decoder_parameters": report.decoder_params_after, "realised_ratio": round(report.realised_ratio, 5),
            "planning_windows": schedule.get("planning_windows"), "load": [load, os.getloadavg()[0]],
            "channels_removed": schedule.get("channels_removed"),
            "attn_units_removed": schedule.get("attn_units_removed")}


def kl_accuracy(model: Any, calibration: torch.Tensor, ratio: float, tops: list[int]) -> list[dict]:
    """The top-token KL at each K against the whole head's, on the plan's own probes."""
    captured: dict[str, Any] = {}
    exact_fn = sensitivity._divergences

    def capture(model: Any, windows: torch.Tensor, reference: torch.Tensor, streams: list) -> list[float]:
        captured.update(windows=windows, reference=reference, streams=streams)
        return [1.0] * len(streams)

    sensitivity._divergences = capture  # type: ignore[assignment]
    with torch.no_grad():
        config = PruneConfig(ratio=ratio, schedule="auto", batch_size=8)
        auto.plan_auto(model, get_adapter(model.config), calibration, config)
    sensitivity._divergences = exact_fn  # type: ignore[assignment]
    args = (model, captured["windows"], captured["reference"], captured["streams"])
    rows = []
    with torch.no_grad():
        sensitivity.linear_head = lambda *_: None  # type: ignore[assignment]
        start = time.perf_counter()
        exact = torch.tensor(exact_fn(*args))
        rows.append({"top_k": "exact", "seconds": round(time.perf_counter() - start, 2)})
        sensitivity.linear_head = SHIPPED[2]  # type: ignore[assignment]
        for k in tops:
            divergence.TopKDivergence.__init__.__defaults__ = (k,)
            start = time.perf_counter()
            rel = (torch.tensor(exact_fn(*args)) - exact) / exact
            rows.append({"top_k": k, "seconds": round(time.perf_counter() - start, 2), "mean_rel": float(rel.mean()),
                         "min_rel": float(rel.min()), "max_rel": float(rel.max())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--variants", default="li,auto,auto:exact")
    parser.add_argument("--calib", default="english")
    parser.add_argument("--ppl", default="english")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default=None, help="load the model in this dtype (default: the checkpoint's)")
    parser.add_argument("--kl-accuracy", default="", help="top-token counts to compare with the exact KL")
    parser.add_argument("--long", action="store_true",
                        help="also the PPL on the paper tables' 512-token windows (25, evenly spread)")
    parser.add_argument("--json", type=Path, default=Path("auto_plan_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    calibration = calibration_windows(tokenizer, args.calib, args.nsamples, args.seqlen, seed=0)
    ratios = [float(r) for r in args.ratios.split(",")]
    meta = {"model": args.model, "calibration": f"{args.nsamples} x {args.seqlen} {args.calib}",
            "threads": args.threads, "dtype": str(model.dtype)}
    if args.kl_accuracy:
        rows = kl_accuracy(model, calibration, ratios[0], [int(k) for k in args.kl_accuracy.split(",")])
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print("\n".join(json.dumps(row) for row in rows))
        return
    held_out = spread(eval_windows(tokenizer, args.ppl, 128), 100)
    long_windows = spread(eval_windows(tokenizer, args.ppl, 512), 25) if args.long else None
    rows = []
    for ratio in ratios:
        for variant in args.variants.split(","):
            rows.append(run_variant(model, calibration, held_out, ratio, variant, long_windows))
            args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # after every row
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
