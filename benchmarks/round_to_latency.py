"""Latency of pruned models with and without hardware-friendly FFN widths (``--round-to``).

Prunes the reference model at the given ratio with ``--round-to N`` for each N, then times prefill and
decode with ``slimgpt.evaluation.speed.measure_speed`` (greedy, fixed token counts, mean of runs after a
warm-up). Widths that are multiples of 8/64/128 suit SIMD and tensor-core kernels; on a CPU with a tiny
model the effect is small, so the table also records the widths and the realised ratio.

    python benchmarks/round_to_latency.py --model tiny-mha --ratio 0.5 --json benchmarks/results/round_to.json
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from slimgpt import PruneConfig, load_model, prune_model
from slimgpt.data import calibration_windows
from slimgpt.evaluation.speed import measure_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-mha")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--round-to", default="1,8,64,128")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    dense, tokenizer = load_model(args.model, dtype=torch.float32, device=args.device)
    calibration = calibration_windows(tokenizer, "builtin", args.nsamples, args.seqlen, seed=0)
    rows = []
    candidates = [("dense", dense, None)]
    for n in (int(x) for x in args.round_to.split(",")):
        model = copy.deepcopy(dense)
        config = PruneConfig(ratio=args.ratio, calib="builtin", nsamples=args.nsamples, seqlen=args.seqlen,
                             round_to=n, device=args.device, batch_size=8)
        report = prune_model(model, config, calibration, progress=False)
        candidates.append((f"round-to {n}", model, report))
    for label, model, report in candidates:
        speed = measure_speed(model, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, runs=args.runs,
                              warmup=1, batch_size=args.batch_size, device=args.device, progress=False)
        widths = [r.ffn_kept for r in report.layers] if report else None
        rows.append({"model": label, "ffn_widths": widths,
                     "realised_ratio": report.realised_ratio if report else 0.0,
                     "parameters": speed.n_parameters, "prefill_tokens_per_s": speed.prefill_tokens_per_s,
                     "decode_tokens_per_s": speed.decode_tokens_per_s,
                     "decode_tokens_per_s_std": speed.decode_tokens_per_s_std,
                     "generate_seconds": speed.generate_seconds})
    print(f"{args.model} at {args.ratio:.0%}, {args.device}, batch {args.batch_size}, prompt {args.prompt_tokens}, "
          f"generate {args.gen_tokens}, mean of {args.runs} runs\n")
    print("| model | FFN widths per layer | realised ratio | prefill tok/s | decode tok/s | generate (s) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        widths = "dense" if r["ffn_widths"] is None else ", ".join(map(str, r["ffn_widths"]))
        print(f"| {r['model']} | {widths} | {r['realised_ratio']:.2%} | {r['prefill_tokens_per_s']:,.0f} | "
              f"{r['decode_tokens_per_s']:,.0f} ± {r['decode_tokens_per_s_std']:,.0f} | {r['generate_seconds']:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
