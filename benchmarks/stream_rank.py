"""How much of the residual stream's energy lies in its leading principal directions, layer by layer.

SliceGPT keeps the leading directions of each block's normalised input and drops the rest, so it loses
little where the stream is nearly low-rank. This script measures that on the reference models, with
SliceGPT's own statistic (slimgpt.solver.pca.Covariance: RMS-normalised signals), to explain Table 1.

    python benchmarks/stream_rank.py                          # tiny-mha and tiny-gqa
    python benchmarks/stream_rank.py --models /path/to/model --nsamples 32 --seqlen 2048

Writes docs/results/stream_rank.md (``--out``) and prints it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from slimgpt.data import calibration_windows
from slimgpt.evaluation.report import markdown_table, write_atomic
from slimgpt.models.slim import load_model
from slimgpt.solver.pca import Covariance

FRACTIONS = (0.125, 0.25, 0.45, 0.7)


@torch.no_grad()
def stream_energy(name: str, nsamples: int, seqlen: int) -> tuple[int, list[list[float]]]:
    """Hidden size and, per stream (embeddings, then each layer's output), the energy share of the top k%."""
    model, tokenizer = load_model(name, dtype=torch.float32)
    windows = calibration_windows(tokenizer, "builtin", nsamples, seqlen, seed=0)
    width = model.config.hidden_size
    covariances = [Covariance(width, torch.device("cpu")) for _ in range(model.config.num_hidden_layers + 1)]
    for start in range(0, len(windows), 4):
        states = model(windows[start:start + 4], output_hidden_states=True).hidden_states
        for cov, state in zip(covariances, states, strict=True):
            cov.add(state)
    shares = []
    for cov in covariances:
        values = torch.linalg.eigvalsh(cov.matrix).flip(0)
        cumulative = values.cumsum(0) / values.sum()
        shares.append([float(cumulative[max(1, round(f * width)) - 1]) for f in FRACTIONS])
    return width, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mha,tiny-gqa")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("docs/results/stream_rank.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    parts = [f"Share of the residual stream's energy (RMS-normalised, as SliceGPT's PCA sees it) in its leading "
             f"principal directions; {args.nsamples} x {args.seqlen} calibration tokens of the built-in corpus. "
             f"Produced by `python benchmarks/stream_rank.py`.", ""]
    for name in args.models.split(","):
        width, shares = stream_energy(name, args.nsamples, args.seqlen)
        header = ["stream", *[f"top {round(f * width)} of {width} ({f:.0%})" for f in FRACTIONS]]
        rows = [["embeddings" if i == 0 else f"after layer {i - 1}", *[f"{s:.2%}" for s in share]]
                for i, share in enumerate(shares)]
        parts += [f"### {name}", "", markdown_table(header, rows), ""]
    text = "\n".join(parts)
    write_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
