"""Held-out perplexity for many pruning variants at once: the fast, perplexity-only view of the paper's
tables (Table 1 methods, Table 5 ablations, Table 6 schedules, the GQA policy) on the built-in models.

``paper_tables.py`` adds zero-shot accuracy and more tables but costs ~1-2 minutes a row on 2 cores;
this sweep costs ~15-30 s a row. Same calibration (128 x 512 tokens of the built-in training split,
seed 0) and the same held-out split.

    python benchmarks/ppl_sweep.py --out docs/results/ppl_sweep
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

METHODS = ("slimgpt", "magnitude", "wanda-sp", "flap", "llm-pruner")
ABLATIONS: dict[str, dict[str, Any]] = {
    "SlimGPT": {},
    "-GCD (diag head score)": {"head_score": "diag"},
    "-DGS (one FFN group)": {"group_schedule": "fixed"},
    "-compensation": {"compensate": False},
}
SCHEDULES = ("log-increase", "linear-increase", "uniform", "log-decrease", "linear-decrease")


def rows_to_run(model: str, gqa: bool) -> list[tuple[str, str, float, dict[str, Any]]]:
    rows: list[tuple[str, str, float, dict[str, Any]]] = []
    for ratio in (0.2, 0.5):
        rows += [("table1", m, ratio, {"method": m}) for m in METHODS]
        rows += [("table5", name, ratio, overrides) for name, overrides in ABLATIONS.items() if overrides]
    rows += [("table6", s, 0.5, {"schedule": s}) for s in SCHEDULES if s != "log-increase"]
    if gqa:
        policies = ("kv-group", "query-heads")
        rows += [("gqa", policy, r, {"gqa_policy": policy}) for r in (0.2, 0.5) for policy in policies]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mha,tiny-gqa")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--tables", default="table1,table5,table6,gqa", help="which rows to run")
    parser.add_argument("--out", type=Path, default=Path("docs/results/ppl_sweep"))
    args = parser.parse_args()
    results_path = args.out.with_suffix(".json")
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    start_all = time.perf_counter()
    for model_name in args.models.split(","):
        dense, tokenizer = load_model(model_name, dtype=torch.float32)
        calibration = calibration_windows(tokenizer, "builtin", args.nsamples, args.seqlen, seed=0)
        short, full = eval_windows(tokenizer, "builtin", 128), eval_windows(tokenizer, "builtin", 512)
        gqa = dense.config.num_key_value_heads < dense.config.num_attention_heads

        def evaluate(model: Any, short: torch.Tensor = short, full: torch.Tensor = full) -> dict[str, float]:
            return {"ppl128": perplexity(model, short, batch_size=16, progress=False),
                    "ppl512": perplexity(model, full, batch_size=4, progress=False)}

        key = f"{model_name}|dense"
        if key not in results:
            results[key] = {"model": model_name, "table": "dense", "variant": "dense", "ratio": 0.0,
                            "params": sum(p.numel() for p in dense.parameters()), **evaluate(dense)}
        for table, variant, ratio, overrides in rows_to_run(model_name, gqa):
            if table not in args.tables.split(","):
                continue
            key = f"{model_name}|{table}|{variant}|{ratio}"
            if key in results:
                continue
            start = time.perf_counter()
            model = copy.deepcopy(dense)
            config = PruneConfig(ratio=ratio, calib="builtin", nsamples=args.nsamples, seqlen=args.seqlen,
                                 batch_size=8, **overrides)
            report = prune_model(model, config, calibration, tokenizer=tokenizer, progress=False)
            results[key] = {"model": model_name, "table": table, "variant": variant, "ratio": ratio,
                            "params": sum(p.numel() for p in model.parameters()),
                            "realised_ratio": report.realised_ratio, **evaluate(model),
                            "seconds": round(time.perf_counter() - start, 1)}
            print(json.dumps({"key": key, **results[key]}), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(results, indent=1))
    print(f"total {time.perf_counter() - start_all:.0f} s")
    args.out.with_suffix(".md").write_text(render(results))
    print(render(results))


def render(results: dict[str, Any]) -> str:
    lines = ["Held-out perplexity of the built-in corpus (128-token windows / 512-token windows = model context); "
             "calibration 128 x 512 tokens of the training split, seed 0. Produced by `benchmarks/ppl_sweep.py`.", ""]
    for table, title in (("table1", "Table 1: methods at equal decoder-parameter count"),
                         ("table5", "Table 5: ablations (full SlimGPT is the `slimgpt` row of Table 1)"),
                         ("table6", "Table 6: schedules at 50% (log-increase is the `slimgpt` 50% row of Table 1)"),
                         ("gqa", "GQA policy on tiny-gqa (SlimGPT, log-increase)")):
        models = {r["model"] for r in results.values() if r["table"] == table}
        if not models:
            continue
        rows = [r for r in results.values() if r["table"] == table or (r["table"] == "dense" and r["model"] in models)]
        lines += [f"### {title}", "", "| model | variant | ratio | realised | params | PPL 128 | PPL 512 |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted(rows, key=lambda r: (r["model"], r["ratio"], r["variant"] != "slimgpt", r["variant"])):
            lines.append(f"| {r['model']} | {r['variant']} | {r['ratio']:.0%} | {r.get('realised_ratio', 0):.2%} | "
                         f"{r['params']:,} | {r['ppl128']:.2f} | {r['ppl512']:.2f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
