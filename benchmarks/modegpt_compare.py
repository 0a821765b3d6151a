"""MoDeGPT against SlimGPT and SliceGPT at equal decoder-parameter count on the built-in models.

Held-out perplexity (the built-in corpus's held-out split, 128-token and 512-token windows), prune time
and peak memory, with the calibration of benchmarks/ppl_sweep.py (128 x 512 tokens of the training
split, seed 0). Results accumulate in OUT.json; one method per invocation gives per-method peak memory:

    for m in slimgpt slicegpt modegpt; do python benchmarks/modegpt_compare.py --methods $m \
        --out docs/results/modegpt_compare; done
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
from slimgpt.evaluation.ppl import perplexity

METHODS = ("slimgpt", "slicegpt", "modegpt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mha,tiny-gqa")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="run one method per invocation for a per-method peak memory (the CPU peak is the "
                             "process's peak resident set, which only grows)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("docs/results/modegpt"))
    args = parser.parse_args()
    results_path = args.out.with_suffix(".json")
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    for model_name in args.models.split(","):
        dense, tokenizer = load_model(model_name, dtype=torch.float32)
        calibration = calibration_windows(tokenizer, "builtin", args.nsamples, args.seqlen, seed=0)
        short, full = eval_windows(tokenizer, "builtin", 128), eval_windows(tokenizer, "builtin", 512)

        def evaluate(model: Any, short: torch.Tensor = short, full: torch.Tensor = full) -> dict[str, float]:
            return {"ppl128": perplexity(model, short, batch_size=16, progress=False),
                    "ppl512": perplexity(model, full, batch_size=4, progress=False)}

        if f"{model_name}|dense" not in results:
            results[f"{model_name}|dense"] = {"model": model_name, "method": "dense", "ratio": 0.0,
                                              "params": sum(p.numel() for p in dense.parameters()), **evaluate(dense)}
        for ratio in (float(r) for r in args.ratios.split(",")):
            for method in args.methods.split(","):
                key = f"{model_name}|{method}|{ratio}"
                if key in results:
                    continue
                model = copy.deepcopy(dense)
                config = PruneConfig(method=method, ratio=ratio, calib="builtin", nsamples=args.nsamples,
                                     seqlen=args.seqlen, batch_size=8)
                start = time.perf_counter()
                report = prune_model(model, config, calibration, tokenizer=tokenizer, progress=False)
                seconds = time.perf_counter() - start
                results[key] = {"model": model_name, "method": method, "ratio": ratio,
                                "realised_ratio": report.realised_ratio,
                                "params": sum(p.numel() for p in model.parameters()), **evaluate(model),
                                "prune_seconds": round(seconds, 1), "peak_memory_bytes": report.peak_memory_bytes}
                print(json.dumps({"key": key, **results[key]}), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                results_path.write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".table.md").write_text(render(results))
    print(render(results))


def render(results: dict[str, Any]) -> str:
    lines = ["| model | method | ratio | realised | params | PPL 128 | PPL 512 | prune s | peak MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = {"dense": 0, **{m: i + 1 for i, m in enumerate(METHODS)}}
    for r in sorted(results.values(), key=lambda r: (r["model"], r["ratio"], order[r["method"]])):
        extra = (f"{r['prune_seconds']:.1f} | {r['peak_memory_bytes'] / 2**20:.0f}" if "prune_seconds" in r
                 else "- | -")
        lines.append(f"| {r['model']} | {r['method']} | {r['ratio']:.0%} | {r.get('realised_ratio', 0):.2%} | "
                     f"{r['params']:,} | {r['ppl128']:.2f} | {r['ppl512']:.2f} | {extra} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
