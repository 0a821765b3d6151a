"""Peak memory of the pruning driver: the formula of docs/memory.md, and a check against a measured peak.

    python benchmarks/peak_memory.py                      # the formula for LLaMA-7B / 13B / 70B, 256 x 2048
    python benchmarks/peak_memory.py --measure --json benchmarks/results/peak_memory.json
                                                          # formula vs peak RSS on a small CPU model

The measurement runs each case in a fresh subprocess and reads ``resource.getrusage`` (peak resident set
size, ru_maxrss) at the end, minus the resident set size right after the imports (/proc/self/status).
The child runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every buffer over 64 KiB with its
own mmap and unmaps it when freed, so RSS follows what is alive instead of what the heap once held.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """What the formula needs of a LLaMA-like model."""

    name: str
    hidden: int  # d
    ffn: int  # F
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        d, kv = self.hidden, self.kv_heads * self.head_dim
        return 2 * d * d + 2 * d * kv + 3 * d * self.ffn + 2 * d  # q, o; k, v; gate, up, down; 2 norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def model_params(self) -> int:
        lm_head = 0 if self.tied else self.embedding_params
        return self.layers * self.layer_params + self.embedding_params + lm_head + self.hidden


SHAPES = {
    "llama-7b": Shape("LLaMA-7B", 4096, 11008, 32, 32, 32, 32000),
    "llama-13b": Shape("LLaMA-13B", 5120, 13824, 40, 40, 40, 32000),
    "llama-70b": Shape("LLaMA-2-70B", 8192, 28672, 80, 64, 8, 32000),
}


# float32 F x F matrices alive at the peak of the FFN solve (down_proj's Hessian). Fast: counted in
# solver/obs.py (statistics, damped copy, Hinv, two temporaries of the downdate). Reference: measured
# (statistics, damped copy, Hinv, its permuted copy, the upper Cholesky factor, LAPACK temporaries).
HESSIAN_COPIES = {"fast": 5.0, "reference": 7.5}


def estimate(shape: Shape, nsamples: int, seqlen: int, dtype_bytes: int, batch_size: int = 1,
             group: int = 1024, offload: bool = False, device_is_cpu: bool = False,
             stream: bool = False, solver: str = "fast") -> dict[str, float]:
    """Peak bytes of ``prune_model``, term by term; see docs/memory.md for each term.

    device: the layer being pruned, its solver state, and the calibration activations unless offloaded.
    cpu: the model (all of it, or with ``stream`` the non-layer modules + one layer), plus the
    activations when offloaded. On a CPU-only run both are the same RAM and are summed once.
    """
    d, F, b = shape.hidden, shape.ffn, dtype_bytes
    tokens = nsamples * seqlen
    terms = {
        # Calibration activations: one [N, S, d] buffer, updated in place layer after layer, and o_proj's
        # inputs [N, S, heads * head_dim] of the layer being pruned (pre-norm layers), one buffer reused.
        "activations": tokens * d * b + tokens * shape.heads * shape.head_dim * b,
        # The layer being pruned, in the model's dtype.
        "layer_weights": shape.layer_params * b,
        # float32 Hessians during the FFN solve: X X^T of o_proj (d^2) kept for the error report; of
        # down_proj: the statistics, the damped copy, Hinv, and two d^2 temporaries of the Schur downdate.
        "hessians": 4 * (d * d + HESSIAN_COPIES[solver] * F * F),
        # float32 weight copies: W_o and its decision (2 d^2); W_down, the job's copy, the solver's and the
        # product W_P @ solved (4 dF); the group's columns / rows (d g + 2 g F).
        "weight_copies": 4 * (2 * d * d + 4 * d * F + d * group + 2 * group * F),
        # One batch through the layer (SDPA, no S^2 scores): hidden, norm, q/k/v, MLP gate/up/product and
        # the float32 copy of down_proj's input. Not at the same time as the solve: max() below.
        "batch_activations": batch_size * seqlen * ((10 * d + 4 * F) * b + 4 * F),
    }
    solve = terms["hessians"] + terms["weight_copies"]
    work = max(solve, terms["batch_activations"] + 4 * (d * d + F * F))
    non_layer = (shape.embedding_params + shape.hidden) * b  # embeddings + final norm (lm_head not loaded)
    model_ram = (non_layer + 2 * shape.layer_params * b) if stream else shape.model_params * b
    if device_is_cpu:  # everything in one RAM; the layer is part of the model already
        total = model_ram + terms["activations"] + work
        return {**terms, "work": work, "model_ram": model_ram, "device_peak": total, "cpu_peak": total}
    device = terms["layer_weights"] + work + (0 if offload else terms["activations"])
    cpu = model_ram + (terms["activations"] if offload else 0)
    return {**terms, "work": work, "model_ram": model_ram, "device_peak": device, "cpu_peak": cpu}


def formula_table(nsamples: int, seqlen: int) -> str:
    lines = [f"Calibration {nsamples} x {seqlen} tokens, bf16 weights and activations, fast solver, batch 1.", "",
             "| model | activations | layer | Hessians | f32 weights | device peak (no offload) | "
             "device peak (offload) | CPU RAM in memory (+ offload) | CPU RAM streaming (+ offload) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for shape in SHAPES.values():
        e = estimate(shape, nsamples, seqlen, 2)
        off = estimate(shape, nsamples, seqlen, 2, offload=True)
        streamed = estimate(shape, nsamples, seqlen, 2, offload=True, stream=True)
        lines.append(
            f"| {shape.name} | {e['activations'] / GIB:.2f} | {e['layer_weights'] / GIB:.2f} | "
            f"{e['hessians'] / GIB:.2f} | {e['weight_copies'] / GIB:.2f} | {e['device_peak'] / GIB:.2f} | "
            f"{off['device_peak'] / GIB:.2f} | {e['cpu_peak'] / GIB:.1f} ({off['cpu_peak'] / GIB:.1f}) | "
            f"{streamed['model_ram'] / GIB:.2f} ({streamed['cpu_peak'] / GIB:.2f}) |")
    lines.append("")
    lines.append("GiB. Device peak = activations (unless offloaded) + one layer + max(solve, one batch).")
    return "\n".join(lines)


# --- measurement --------------------------------------------------------------------------------------------

def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status: the measurement needs Linux")


def _llama_config(shape: Shape) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
                       tie_word_embeddings=shape.tied)


def child(args: dict) -> dict:
    """One measured run, in its own process (called through ``--child``)."""
    import torch
    from transformers import LlamaForCausalLM

    from slimgpt import PruneConfig, prune_model
    from slimgpt.streaming import stream_prune

    torch.set_num_threads(int(args["threads"]))
    shape = Shape(**args["shape"])
    config = PruneConfig(ratio=args["ratio"], nsamples=args["nsamples"], seqlen=args["seqlen"],
                         batch_size=args["batch_size"], device="cpu")
    calibration = torch.randint(0, shape.vocab, (args["nsamples"], args["seqlen"]),
                                generator=torch.Generator().manual_seed(0))
    if args["mode"] == "save":
        torch.manual_seed(0)
        LlamaForCausalLM(_llama_config(shape)).save_pretrained(args["folder"])
        return {}
    base = _current_rss()
    start = time.perf_counter()
    if args["mode"] == "memory":
        torch.manual_seed(0)
        model = LlamaForCausalLM(_llama_config(shape)).eval()
        after_build = _peak_rss()
        prune_model(model, config, calibration, progress=False)
    else:
        after_build = base
        with tempfile.TemporaryDirectory() as out:
            stream_prune(args["folder"], config, Path(out) / "pruned", calibration, progress=False)
    return {"base_rss": base, "after_build_rss": after_build, "peak_rss": _peak_rss(),
            "seconds": time.perf_counter() - start}


def _run_child(args: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args["threads"]), MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def first_group(shape: Shape, ratio: float) -> int:
    """The largest FFN removal group of the run: the first group of the layer that loses most channels."""
    import torch
    from transformers import LlamaForCausalLM

    from slimgpt import PruneConfig, plan
    from slimgpt.solver.structured import group_sizes

    with torch.device("meta"):
        model = LlamaForCausalLM(_llama_config(shape))
    schedule = plan(model, PruneConfig(ratio=ratio))
    sizes = group_sizes(max(layer.channels_removed for layer in schedule.layers))
    return sizes[0] if sizes else 0


def measure(shape: Shape, nsamples: int, seqlen: int, batch_size: int, ratio: float, threads: int) -> list[dict]:
    rows = []
    group = first_group(shape, ratio)
    with tempfile.TemporaryDirectory() as folder:
        base_args = {"shape": asdict(shape), "nsamples": nsamples, "seqlen": seqlen, "batch_size": batch_size,
                     "ratio": ratio, "threads": threads, "folder": folder}
        _run_child({**base_args, "mode": "save"})
        for mode, stream in (("memory", False), ("stream", True)):
            got = _run_child({**base_args, "mode": mode})
            predicted = estimate(shape, nsamples, seqlen, 4, batch_size, group, device_is_cpu=True, stream=stream)
            used = got["peak_rss"] - got["base_rss"]
            rows.append({"mode": mode, "measured_bytes": used, "predicted_bytes": predicted["cpu_peak"],
                         "relative_error": used / predicted["cpu_peak"] - 1, "terms": predicted, **got})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=256)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--measure", action="store_true", help="check the formula on a small float32 model")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--measure-nsamples", type=int, default=64)
    parser.add_argument("--measure-seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    result: dict = {"formula": {name: estimate(s, args.nsamples, args.seqlen, 2) for name, s in SHAPES.items()}}
    print(formula_table(args.nsamples, args.seqlen))
    if args.measure:
        shape = Shape("measured", args.hidden, args.ffn, args.layers, args.heads, args.heads, args.vocab)
        rows = measure(shape, args.measure_nsamples, args.measure_seqlen, args.batch_size, args.ratio, args.threads)
        result["measured"] = {"shape": asdict(shape), "nsamples": args.measure_nsamples,
                              "seqlen": args.measure_seqlen, "batch_size": args.batch_size, "rows": rows}
        print(f"\nMeasured on CPU, float32, {shape.layers} layers, d={shape.hidden}, F={shape.ffn}, "
              f"{args.measure_nsamples} x {args.measure_seqlen} tokens, batch {args.batch_size}, ratio {args.ratio}:\n")
        print("| run | predicted MiB | measured MiB (peak RSS - RSS after imports) | error | s |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for row in rows:
            print(f"| {row['mode']} | {row['predicted_bytes'] / 2**20:.0f} | {row['measured_bytes'] / 2**20:.0f} | "
                  f"{100 * row['relative_error']:+.1f}% | {row['seconds']:.1f} |")
        names = ("model_ram", "activations", "hessians", "weight_copies", "batch_activations", "work")
        for row in rows:
            print(f"\n{row['mode']} terms (MiB): " + ", ".join(f"{k} {row['terms'][k] / 2**20:.1f}" for k in names))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
