"""SlimGPT with ``--schedule auto`` against log-increase and every baseline, at equal size.

For each model and ratio: held-out perplexity (evenly spread 128-token windows of the builtin corpus),
zero-shot accuracy on the local code tasks (benchmarks/tasks.py, the first ``--task-limit`` items of each,
as benchmarks/paper_tables.py evaluates them) and pruning time, with the same calibration windows for every
method. Times are compared with SlimGPT log-increase's in the same run (the same process), so a run that
leaves log-increase out gets no time ratio. Writes ``--json`` and a markdown table, and the kept-ratio
plots (paper Fig. 4 analog) of auto and log-increase at each ratio.

    python benchmarks/auto_schedule.py --models tiny-mha,tiny-gqa --ratios 0.2,0.33,0.5 \
        --nsamples 32 --seqlen 256 --out docs/results
    python benchmarks/auto_schedule.py --table docs/results/auto_schedule_tiny-mha.json,...   # table only
    --methods "slimgpt auto,slimgpt log-increase"   # a subset (labels as in VARIANTS)
    --calib-seed 1 --plan-fraction 1 --sensitivity-tokens 1024   # the auto plan's quality/speed settings
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see slimgpt/__init__.py)
import torch

import slimgpt.methods.auto_schedule as auto_schedule
from slimgpt import PruneConfig, load_model, prune_model
from slimgpt.data import calibration_windows, eval_windows
from slimgpt.evaluation import TaskSuite, load_tasks, perplexity, plot_kept_ratio, zero_shot
from slimgpt.evaluation.report import markdown_table, write_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import tasks as code_tasks

VARIANTS = [("slimgpt auto", "slimgpt", "auto"), ("slimgpt log-increase", "slimgpt", "log-increase"),
            ("magnitude", "magnitude", None), ("wanda-sp", "wanda-sp", None), ("flap", "flap", None),
            ("llm-pruner", "llm-pruner", None), ("slicegpt", "slicegpt", None)]


def scores(model: Any, tokenizer: Any, suite: TaskSuite | None, limit: int) -> dict[str, Any]:
    """Zero-shot accuracy per code task (acc_norm where reported) and their mean; {} without tasks."""
    if suite is None:
        return {}
    result = zero_shot(model, tokenizer, suite, batch_size=16, limit=limit)
    return {"tasks": {t.name: t.headline for t in result.tasks}, "average": result.average}


def run_one(dense: Any, config: PruneConfig, calibration: torch.Tensor, windows: torch.Tensor,
            tokenizer: Any = None, suite: TaskSuite | None = None, limit: int = 100) -> dict[str, Any]:
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    report = prune_model(model, config, calibration, progress=False)
    seconds = time.perf_counter() - start
    row = {"realised": report.realised_ratio, "seconds": round(seconds, 2),
           "ppl128": perplexity(model, windows, batch_size=16, progress=False),
           "zero_shot": scores(model, tokenizer, suite, limit),
           "layers": [{"layer": r.layer, "heads_kept": r.heads_kept, "heads_total": r.heads_total,
                       "ffn_kept": r.ffn_kept, "ffn_total": r.ffn_total} for r in report.layers]}
    if config.schedule == "auto":
        row["plan_seconds"] = round(report.stage_seconds.get("plan", 0.0), 2)
        row["schedule"] = {k: v for k, v in report.schedule.items() if k != "ratios"}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mha,tiny-gqa")
    parser.add_argument("--ratios", default="0.2,0.33,0.5")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--windows", type=int, default=80, help="128-token held-out windows, evenly spread")
    parser.add_argument("--methods", default=",".join(v[0] for v in VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="folder of the plots")
    parser.add_argument("--json", type=Path, default=Path("docs/results/auto_schedule.json"))
    parser.add_argument("--task-limit", type=int, default=100, help="items of each code task (0: no zero-shot)")
    parser.add_argument("--table", default="", help="print the table of these JSON files and stop")
    parser.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration windows")
    parser.add_argument("--plan-fraction", type=float, default=auto_schedule.PLAN_FRACTION,
                        help="auto: fraction of the calibration windows in the planning pass")
    parser.add_argument("--sensitivity-tokens", type=int, default=auto_schedule.SENSITIVITY_TOKENS,
                        help="auto: calibration tokens of the sensitivity probes")
    args = parser.parse_args()
    auto_schedule.PLAN_FRACTION, auto_schedule.SENSITIVITY_TOKENS = args.plan_fraction, args.sensitivity_tokens
    if args.table:
        print(table([{**row, "run": path} for path in args.table.split(",")
                     for row in json.loads(Path(path).read_text())["rows"]]))
        return
    wanted = args.methods.split(",")
    suite = None
    if args.task_limit:
        folder = Path(tempfile.mkdtemp(prefix="auto_schedule_tasks_"))
        suite = load_tasks(list(code_tasks.TASK_NAMES), code_tasks.write_task_yamls(folder))
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        dense, tokenizer = load_model(name, dtype=torch.float32)
        calibration = calibration_windows(tokenizer, "builtin", args.nsamples, args.seqlen, seed=args.calib_seed)
        windows = eval_windows(tokenizer, "builtin", 128)
        windows = windows[torch.linspace(0, len(windows) - 1, min(args.windows, len(windows))).long()]
        rows.append({"model": name, "variant": "dense", "ratio": 0.0, "realised": 0.0, "seconds": 0.0,
                     "ppl128": perplexity(dense, windows, batch_size=16, progress=False),
                     "zero_shot": scores(dense, tokenizer, suite, args.task_limit)})
        for ratio in (float(r) for r in args.ratios.split(",")):
            for label, method, schedule in VARIANTS:
                if label not in wanted:
                    continue
                config = PruneConfig(method=method, ratio=ratio, schedule=schedule or "log-increase", calib="builtin",
                                     nsamples=args.nsamples, seqlen=args.seqlen, batch_size=8)
                row = {"model": name, "variant": label, "ratio": ratio,
                       **run_one(dense, config, calibration, windows, tokenizer, suite, args.task_limit)}
                rows.append(row)
                write_atomic(args.json, json.dumps({"nsamples": args.nsamples, "seqlen": args.seqlen,
                                                    "windows": args.windows, "task_limit": args.task_limit,
                                                    "calib_seed": args.calib_seed,
                                                    "plan_fraction": args.plan_fraction,
                                                    "sensitivity_tokens": args.sensitivity_tokens,
                                                    "rows": rows}, indent=1) + "\n")  # after every row
                print(json.dumps({k: v for k, v in row.items() if k not in ("layers", "schedule")}), flush=True)
                if schedule is not None and row.get("layers"):
                    plot_kept_ratio(row["layers"], args.out / f"auto_schedule_kept_{name}_{ratio:.0%}_{schedule}.png",
                                    title=f"{name} {ratio:.0%}: SlimGPT {schedule}")
    print(table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    """PPL and zero-shot per (model, ratio) and variant; time relative to SlimGPT log-increase of the same
    run (``run``: the JSON file a row came from) on the same model and ratio."""
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r.get("run", ""), r["model"], r["ratio"]

    base = {key(r): r["seconds"] for r in rows if r["variant"] == "slimgpt log-increase"}
    names = list(code_tasks.TASK_NAMES)

    def zs(r: dict[str, Any], name: str) -> str:
        value = r.get("zero_shot", {}).get("tasks", {}).get(name) if name else r.get("zero_shot", {}).get("average")
        return f"{value:.1%}" if value is not None else ""

    return markdown_table(
        ["model", "ratio", "variant", "realised", "PPL 128", *names, "zero-shot avg", "prune s",
         "x log-increase time", "heads kept", "FFN kept"],
        [[r["model"], f"{r['ratio']:.0%}", r["variant"], f"{r['realised']:.2%}", f"{r['ppl128']:.2f}",
          *(zs(r, n) for n in names), zs(r, ""), f"{r['seconds']:.1f}",
          f"{r['seconds'] / base[key(r)]:.2f}" if key(r) in base and r["variant"] != "dense" else "",
          " ".join(str(x["heads_kept"]) for x in r.get("layers", [])),
          " ".join(str(x["ffn_kept"]) for x in r.get("layers", []))] for r in rows])


if __name__ == "__main__":
    main()
