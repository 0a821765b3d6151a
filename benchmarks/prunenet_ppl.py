"""PruneNet against magnitude and SlimGPT at equal decoder-parameter count on the built-in models.

The protocol of ``ppl_sweep.py``: calibration 128 x 512 tokens of the built-in training split (seed 0;
PruneNet and magnitude use none), held-out perplexity at 128- and 512-token windows; ``--nsamples`` and
``--max-windows`` shorten it (the numbers then are not those of ``ppl_sweep.py``). Results are cached
in the JSON, so an interrupted run resumes; rows run cheapest first.

    python benchmarks/prunenet_ppl.py --out docs/results/prunenet
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

METHODS = ("prunenet", "magnitude", "slimgpt")
RATIOS = (0.2, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mha,tiny-gqa")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=Path("docs/results/prunenet"))
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows of 512 tokens (SlimGPT)")
    parser.add_argument("--max-windows", type=int, default=0, help="first N held-out windows of 128 tokens (and "
                        "N/4 of 512); 0: all")
    args = parser.parse_args()
    path = args.out.with_suffix(".json")
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    loaded = {name: load_model(name, dtype=torch.float32) for name in args.models.split(",")}
    for method in args.methods.split(","):
        for name, (dense, tokenizer) in loaded.items():
            short, full = eval_windows(tokenizer, "builtin", 128), eval_windows(tokenizer, "builtin", 512)
            if args.max_windows:
                short, full = short[:args.max_windows], full[:max(args.max_windows // 4, 1)]

            def evaluate(model: Any, short: torch.Tensor = short, full: torch.Tensor = full) -> dict[str, float]:
                return {"ppl128": perplexity(model, short, batch_size=16, progress=False),
                        "ppl512": perplexity(model, full, batch_size=4, progress=False)}

            if f"{name}|dense" not in results:
                results[f"{name}|dense"] = {"model": name, "method": "dense", "ratio": 0.0, "realised_ratio": 0.0,
                                            "params": sum(p.numel() for p in dense.parameters()), **evaluate(dense)}
            for ratio in RATIOS:
                key = f"{name}|{method}|{ratio}"
                if key in results:
                    continue
                calibration = calibration_windows(tokenizer, "builtin", args.nsamples, 512, seed=0)
                model = copy.deepcopy(dense)
                config = PruneConfig(method=method, ratio=ratio, calib="builtin", nsamples=args.nsamples, seqlen=512,
                                     batch_size=8)
                start = time.perf_counter()
                report = prune_model(model, config, calibration, tokenizer=tokenizer, progress=False)
                seconds = time.perf_counter() - start
                results[key] = {"model": name, "method": method, "ratio": ratio,
                                "realised_ratio": report.realised_ratio, "prune_seconds": round(seconds, 1),
                                "params": sum(p.numel() for p in model.parameters()),
                                "ffn_kept": report.layers[0].ffn_kept, **evaluate(model)}
                print(json.dumps({"key": key, **results[key]}), flush=True)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(render(results))


def render(results: dict[str, Any]) -> str:
    lines = ["| model | method | ratio | realised | params | FFN width (layer 0) | PPL 128 | PPL 512 | prune s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = {"dense": -1, **{m: i for i, m in enumerate(METHODS)}}
    for row in sorted(results.values(), key=lambda r: (r["model"], r["ratio"], order.get(r["method"], 9))):
        lines.append(f"| {row['model']} | {row['method']} | {row['ratio']:.0%} | {row['realised_ratio']:.2%} | "
                     f"{row['params']:,} | {row.get('ffn_kept', '')} | {row['ppl128']:.2f} | {row['ppl512']:.2f} | "
                     f"{row.get('prune_seconds', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
