"""FASP next to SlimGPT and Wanda-sp at equal decoder-parameter count on the built-in models: held-out
perplexity (512-token windows of the built-in eval split) and prune time. ``fasp-ridge`` is FASP with the
ridge form of the restoration (damping H[M, M] only, slimgpt.solver.restore), for the choice docs/method.md
explains.

    python benchmarks/fasp_ppl.py --nsamples 32 --max-windows 40 --out docs/results/fasp.json
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
from slimgpt.methods import Decision, PruneJob
from slimgpt.methods.fasp import FASPMethod, fasp_scores
from slimgpt.solver.restore import restore_least_squares
from slimgpt.solver.scores import lowest_units


class RidgeFASP(FASPMethod):
    """FASP with W'[:, M] = W H[:, M] (H[M, M] + lam I)^-1 (the survivors pulled towards zero)."""

    def _decide(self, job: PruneJob, buckets: list[list[int]] | None) -> Decision:
        if job.rounds == 0:
            return Decision([], job.weight)
        assert job.stats is not None
        units = job.units.to(job.weight.device)
        scores = fasp_scores(job.weight, job.stats.diagonal, job.stats.tokens, units)
        removed = lowest_units(scores, job.rounds, buckets)
        keep = torch.ones(job.weight.shape[1], dtype=torch.bool)
        keep[units[removed].flatten()] = False
        return Decision(removed, restore_least_squares(job.weight, job.stats.hessian, keep, self.config.percdamp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mha,tiny-gqa")
    parser.add_argument("--methods", default="fasp,slimgpt,wanda-sp,fasp-ridge")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40, help="held-out 512-token windows (171 in all)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/fasp.json"))
    args = parser.parse_args()
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    for model_name in args.models.split(","):
        dense, tokenizer = load_model(model_name, dtype=torch.float32)
        calibration = calibration_windows(tokenizer, "builtin", args.nsamples, args.seqlen, seed=0)
        held_out = eval_windows(tokenizer, "builtin", 512, args.max_windows)
        if f"{model_name}|dense" not in results:
            results[f"{model_name}|dense"] = {"params": sum(p.numel() for p in dense.parameters()),
                                              "ppl512": perplexity(dense, held_out, batch_size=4, progress=False)}
        for ratio in (float(r) for r in args.ratios.split(",")):
            for name in args.methods.split(","):
                key = f"{model_name}|{name}|{ratio}"
                if key in results:
                    continue
                model = copy.deepcopy(dense)
                config = PruneConfig(method="fasp" if name == "fasp-ridge" else name, ratio=ratio, calib="builtin",
                                     nsamples=args.nsamples, seqlen=args.seqlen, batch_size=8)
                start = time.perf_counter()
                method = RidgeFASP(config) if name == "fasp-ridge" else None
                report = prune_model(model, config, calibration, tokenizer=tokenizer, progress=False, method=method)
                seconds = time.perf_counter() - start
                results[key] = {"params": sum(p.numel() for p in model.parameters()),
                                "realised_ratio": report.realised_ratio, "prune_seconds": round(seconds, 1),
                                "ppl512": perplexity(model, held_out, batch_size=4, progress=False)}
                print(json.dumps({"key": key, **results[key]}), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
