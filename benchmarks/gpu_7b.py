"""Pruning time and peak GPU memory on a LLaMA-7B-shaped model, against the paper's Table 3.

SlimGPT's Table 3 reports, for LLaMA-7B with 256 x 2048 C4 calibration tokens on one A100: 678 s at 20%,
1074 s at 50%, and a 7.4 GB peak. Time and memory do not depend on the weights' values, so this builds
the 7B shape with random weights (no download): LlamaConfig 4096 / 11008 / 32 layers / 32 heads, bf16,
kept on the CPU while each layer moves to the GPU to be pruned (as the authors' code does), with
256 x 2048 random calibration tokens held on the GPU (the authors' setting; --offload keeps them on the
CPU). It also times one full forward of the dense model over the same tokens, and prints the formula of
docs/memory.md next to the measured peak.

    python benchmarks/gpu_7b.py --json benchmarks/results/gpu_7b.json            # on a CUDA machine
    python benchmarks/gpu_7b.py --device cpu --layers 2 --hidden 256 --ffn 688 --heads 4 --vocab 1000 \
        --nsamples 8 --seqlen 128 --dtype float32                                   # a smoke test on CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from slimgpt import PruneConfig, prune_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from peak_memory import Shape, estimate
from prune_vs_forward import forward_seconds

PAPER_SOURCE = "SlimGPT (NeurIPS 2024) Table 3, LLaMA-7B, one A100"
PAPER_SECONDS = {0.2: 678.0, 0.5: 1074.0}
PAPER_PEAK_GB = 7.4
PAPER = {"source": PAPER_SOURCE, "seconds": PAPER_SECONDS, "peak_gb": PAPER_PEAK_GB}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_model(args: argparse.Namespace) -> Any:
    """A LLaMA-shaped model with random weights (transformers' own init), on the CPU, seeded."""
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                         vocab_size=args.vocab, max_position_embeddings=max(4096, args.seqlen))
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype]).eval()


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    ids = torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    shape = Shape("benchmark", args.hidden, args.ffn, args.layers, args.heads, args.kv_heads or args.heads,
                  args.vocab)
    formula = estimate(shape, args.nsamples, args.seqlen, torch.finfo(DTYPES[args.dtype]).bits // 8,
                       args.batch_size, offload=args.offload, device_is_cpu=device.type == "cpu")
    rows = []
    forward = None
    for ratio in (float(r) for r in args.ratios.split(",")):
        start = time.perf_counter()
        model = build_model(args)
        build = time.perf_counter() - start
        if forward is None and args.forward:
            forward = forward_seconds(model, ids, args.forward_batch_size, device, repeats=1)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        config = PruneConfig(ratio=ratio, solver=args.solver, nsamples=args.nsamples, seqlen=args.seqlen,
                             batch_size=args.batch_size, device=args.device, offload=args.offload)
        start = time.perf_counter()
        report = prune_model(model, config, ids, progress=args.progress)
        seconds = time.perf_counter() - start
        row = {"ratio": ratio, "prune_seconds": seconds, "build_seconds": build,
               "stage_seconds": report.stage_seconds, "peak_memory_bytes": report.peak_memory_bytes,
               "realised_ratio": report.realised_ratio,
               "paper_seconds": PAPER_SECONDS.get(ratio) if args.paper_shape else None}
        if device.type == "cuda":
            row["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        rows.append(row)
        del model
    return {
        "shape": {"hidden": args.hidden, "ffn": args.ffn, "layers": args.layers, "heads": args.heads,
                  "kv_heads": args.kv_heads or args.heads, "vocab": args.vocab, "dtype": args.dtype},
        "device": args.device, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(), "nsamples": args.nsamples, "seqlen": args.seqlen,
        "batch_size": args.batch_size, "offload": args.offload, "solver": args.solver,
        "forward_seconds": forward, "formula_peak_bytes": formula["device_peak"], "formula": formula,
        "paper": PAPER if args.paper_shape else None, "rows": rows, "torch": torch.__version__,
    }


def markdown(result: dict) -> str:
    s = result["shape"]
    lines = [f"LLaMA-shaped d={s['hidden']} F={s['ffn']} L={s['layers']} heads={s['heads']} {s['dtype']} on "
             f"{result['device_name']}; calibration {result['nsamples']} x {result['seqlen']} (batch "
             f"{result['batch_size']}, activations {'on the CPU' if result['offload'] else 'on the device'}); "
             f"solver {result['solver']}.",
             f"Full dense forward over the calibration tokens: {result['forward_seconds'] or float('nan'):.1f} s. "
             f"Formula peak (docs/memory.md): {result['formula_peak_bytes'] / 1e9:.2f} GB.", "",
             "| ratio | prune s | paper s | x forward | peak GB (measured) | paper peak GB | stages (s) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in result["rows"]:
        forward = result["forward_seconds"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stage_seconds"].items())
        paper = row["paper_seconds"]
        lines.append(f"| {row['ratio']:.0%} | {row['prune_seconds']:.1f} | {paper if paper else '-'} | "
                     f"{row['prune_seconds'] / forward if forward else float('nan'):.2f} | "
                     f"{row['peak_memory_bytes'] / 1e9:.2f} | "
                     f"{result['paper']['peak_gb'] if result['paper'] else '-'} | {stages} |")
    if result["device"] == "cpu":
        lines.append("\nOn the CPU the measured peak is the process's peak RSS (the whole model included).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA, as LLaMA-7B)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--nsamples", type=int, default=256)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1, help="calibration batch of the driver")
    parser.add_argument("--forward-batch-size", type=int, default=8)
    parser.add_argument("--no-forward", dest="forward", action="store_false", help="skip the dense forward timing")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--solver", default="fast", choices=["fast", "reference"])
    parser.add_argument("--offload", action="store_true", help="calibration activations on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("CUDA is not available here: pass --device cpu (with a small --layers/--hidden) to smoke-test")
    args.paper_shape = (args.hidden, args.ffn, args.layers, args.heads, args.nsamples, args.seqlen) == (
        4096, 11008, 32, 32, 256, 2048)
    result = run(args)
    print(markdown(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
