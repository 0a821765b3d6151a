"""SliceGPT and the calibration window length: the same tokens in shorter or longer windows, and which
positions' signals feed its covariances (docs/results/findings.md, section 5).

Each variant prunes a copy of the model with ``--method slicegpt`` and measures the paper tables' held-out
perplexity (100 windows of 128 tokens and 25 of 512, evenly spread). ``NxL[:seed]`` calibrates on N windows
of L tokens; ``NxL@A-B`` does the same but lets only positions A..B-1 of each window into the covariances
(the other positions still run through the layers).

    python benchmarks/slicegpt_windows.py smollm2-135m --variants 64x128,32x256,28x300,24x384,16x512
    python benchmarks/slicegpt_windows.py smollm2-135m --variants 16x512@0-256,16x512@256-512,16x512@1-512
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see slimgpt/__init__.py)
import torch
from paper_bench import spread

import slimgpt.solver.pca as pca
from slimgpt import PruneConfig, load_model, prune_model
from slimgpt.data import calibration_windows, eval_windows
from slimgpt.evaluation.ppl import perplexity

VARIANT = re.compile(r"^(\d+)x(\d+)(?::(\d+))?(?:@(\d+)-(\d+))?$")


def run_variant(model: Any, tokenizer: Any, variant: str, args: argparse.Namespace,
                held: dict[int, torch.Tensor]) -> dict[str, Any]:
    match = VARIANT.match(variant)
    if match is None:
        raise SystemExit(f"variant {variant!r}: write NxL, NxL:seed or NxL@A-B")
    n, seqlen, seed = int(match[1]), int(match[2]), int(match[3] or 0)
    calibration = calibration_windows(tokenizer, args.calib, n, seqlen, seed=seed)
    add = pca.Covariance.add
    if match[4] is not None:
        lo, hi = int(match[4]), int(match[5])
        pca.Covariance.add = lambda self, signal: add(self, signal[:, lo:hi] if signal.dim() == 3 else signal)
    try:
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        prune_model(pruned, PruneConfig(method="slicegpt", ratio=args.ratio), calibration, progress=False)
        seconds = time.perf_counter() - start
    finally:
        pca.Covariance.add = add  # type: ignore[method-assign]
    return {"variant": variant, "ratio": args.ratio, "prune_s": round(seconds, 1),
            **{f"ppl{k}": round(perplexity(pruned, w, batch_size=4, progress=False), 3) for k, w in held.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--variants", default="64x128,32x256,16x512")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--calib", default="english")
    parser.add_argument("--ppl", default="english")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("slicegpt_windows.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    held = {128: spread(eval_windows(tokenizer, args.ppl, 128), 100),
            512: spread(eval_windows(tokenizer, args.ppl, 512), 25)}
    rows = []
    for variant in args.variants.split(","):
        rows.append(run_variant(model, tokenizer, variant, args, held))
        args.json.write_text(json.dumps({"model": args.model, "calib": args.calib, "rows": rows}, indent=1))
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
