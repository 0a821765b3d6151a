"""SlimGPT's solver with another method's per-layer allocation: which part of a method wins a row?

Table 1 mixes two decisions: how many heads / channels each layer loses (the allocation) and which ones
go and how the rest are compensated (the selection). This script keeps SlimGPT's selection and OBS
compensation and swaps in the allocation of FLAP (global ranking over heads and channels of all layers)
or LLM-Pruner (uniform on the middle layers, first and last kept) or Wanda-sp / magnitude (uniform
over all layers, heads and channels), at equal parameter count, so a row
where a baseline beats SlimGPT can be traced to one of the two.

    python benchmarks/allocation_swap.py                      # tiny-mha, 20% and 50%
    python benchmarks/allocation_swap.py --model tiny-gqa --ratios 0.2 --donors flap,wanda-sp \
        --json docs/results/allocation_swap_gqa.json

Writes ``--json`` (default docs/results/allocation_swap.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from slimgpt import PruneConfig, load_model, prune_model
from slimgpt.data import calibration_windows, eval_windows
from slimgpt.evaluation import perplexity
from slimgpt.evaluation.report import markdown_table, write_atomic
from slimgpt.methods import METHODS
from slimgpt.methods.slimgpt import SlimGPTMethod


class SlimGPTWithAllocation(SlimGPTMethod):
    """SlimGPT's solver; the per-layer counts come from ``donor``'s plan."""

    def __init__(self, config: PruneConfig, donor: str) -> None:
        super().__init__(config)
        self.donor = METHODS[donor](config)
        self.plan_needs_data = self.donor.plan_needs_data  # type: ignore[misc]

    def plan(self, model: Any, adapter: Any, calibration: torch.Tensor | None) -> Any:
        return self.donor.plan(model, adapter, calibration)  # type: ignore[attr-defined]


def run(dense: Any, config: PruneConfig, calibration: torch.Tensor, windows: torch.Tensor,
        allocation: str | None) -> dict[str, Any]:
    model = copy.deepcopy(dense)
    method = SlimGPTWithAllocation(config, allocation) if allocation else None
    start = time.perf_counter()
    report = prune_model(model, config, calibration, progress=False, method=method)
    return {"realised": report.realised_ratio, "seconds": round(time.perf_counter() - start, 1),
            "ppl128": perplexity(model, windows, batch_size=16, progress=False),
            "heads": [r.heads_kept for r in report.layers], "ffn": [r.ffn_kept for r in report.layers]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-mha")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=160, help="128-token held-out windows, evenly spread")
    parser.add_argument("--donors", default="flap,llm-pruner",
                        help="methods whose allocation SlimGPT borrows (wanda-sp / magnitude: uniform)")
    parser.add_argument("--json", type=Path, default=Path("docs/results/allocation_swap.json"))
    args = parser.parse_args()
    dense, tokenizer = load_model(args.model, dtype=torch.float32)
    calibration = calibration_windows(tokenizer, "builtin", args.nsamples, args.seqlen, seed=0)
    windows = eval_windows(tokenizer, "builtin", 128)
    windows = windows[torch.linspace(0, len(windows) - 1, min(args.windows, len(windows))).long()]
    rows: list[dict[str, Any]] = [{"variant": "dense", "ratio": 0.0, "realised": 0.0,
                                   "ppl128": perplexity(dense, windows, batch_size=16, progress=False)}]
    for ratio in (float(r) for r in args.ratios.split(",")):
        donors = args.donors.split(",")
        variants = [("slimgpt", "slimgpt", None), *[(donor, donor, None) for donor in donors],
                    *[(f"SlimGPT solver + {donor} allocation", "slimgpt", donor) for donor in donors]]
        for label, method, allocation in variants:
            config = PruneConfig(method=method, ratio=ratio, calib="builtin", nsamples=args.nsamples,
                                 seqlen=args.seqlen, batch_size=8)
            row = {"variant": label, "ratio": ratio, **run(dense, config, calibration, windows, allocation)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_atomic(args.json, json.dumps({"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen,
                                        "windows": len(windows), "rows": rows}, indent=1) + "\n")
    table = markdown_table(["ratio", "variant", "realised", "PPL 128", "heads kept per layer", "FFN kept per layer"],
                           [[f"{r['ratio']:.0%}", r["variant"], f"{r['realised']:.2%}", f"{r['ppl128']:.2f}",
                             " ".join(map(str, r.get("heads", []))), " ".join(map(str, r.get("ffn", [])))]
                            for r in rows])
    print(table)


if __name__ == "__main__":
    main()
