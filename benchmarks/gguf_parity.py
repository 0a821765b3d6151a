"""Does llama.cpp run a slimgpt GGUF export like PyTorch runs the pruned model?

Exports MODEL (a folder written by `slimgpt prune`, or a dense folder / built-in name) to GGUF for each
--outtypes, evaluates the same token windows with PyTorch (float32, slimgpt.load_pruned) and with
llama.cpp (llama-cpp-python, float32 KV cache unless --kv-type f16), and reports per outtype: max and
mean absolute logit difference, top-1 agreement, both perplexities, and the fraction of eval-text lines
that llama.cpp's tokenizer (from the GGUF) splits exactly like the model's transformers tokenizer.

    pip install llama-cpp-python   # compiles llama.cpp; CMAKE_ARGS=-DGGML_NATIVE=OFF for a portable build
    python benchmarks/gguf_parity.py OUT_DIR --seqlen 128 --windows 8 --json benchmarks/results/gguf_parity.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from slimgpt.data import eval_windows, load_documents
from slimgpt.evaluation.ppl import window_nll_sum
from slimgpt.export import export_gguf
from slimgpt.export.llama_cpp import llama_cpp_logits, llama_cpp_tokenize
from slimgpt.models.slim import load_model, resolve_model_path


def perplexity(logits: torch.Tensor, windows: torch.Tensor) -> float:
    """exp(mean NLL) of tokens 1..T-1 of every window; logits [n, T, vocab], windows [n, T]."""
    nll = sum(window_nll_sum(row[:-1], window) for row, window in zip(logits, windows, strict=True))
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def compare(reference: torch.Tensor, logits: torch.Tensor, windows: torch.Tensor) -> dict[str, float]:
    diff = (logits - reference).abs()
    ppl_ref, ppl = perplexity(reference, windows), perplexity(logits, windows)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
        "ppl_pytorch": ppl_ref,
        "ppl_llama_cpp": ppl,
        "ppl_rel_diff": (ppl - ppl_ref) / ppl_ref,
    }


def tokenizer_agreement(tokenizer: Any, path: Path, source: str, lines: int) -> float:
    """Fraction of the eval text's first non-empty lines that llama.cpp tokenizes exactly like transformers."""
    texts = [line for doc in load_documents(source, "eval") for line in doc.splitlines() if line.strip()][:lines]
    ours = llama_cpp_tokenize(path, texts)
    same = sum(tokenizer.encode(t, add_special_tokens=False) == ids for t, ids in zip(texts, ours, strict=True))
    return same / len(texts)


def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(resolve_model_path(args.model))
    model, tokenizer = load_model(str(folder), dtype=torch.float32)
    windows = eval_windows(tokenizer, args.source, args.seqlen, args.windows)
    with torch.no_grad():
        reference = torch.cat([model(w[None]).logits for w in windows])  # [n, T, vocab]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for outtype in args.outtypes:
            start = time.perf_counter()
            result = export_gguf(folder, Path(tmp) / f"model-{outtype}.gguf", outtype=outtype)
            export_s = time.perf_counter() - start
            start = time.perf_counter()
            logits = llama_cpp_logits(result.path, windows, kv_type=args.kv_type, n_threads=args.threads)
            agreement = tokenizer_agreement(tokenizer, result.path, args.source, args.tokenizer_lines)
            rows.append({"outtype": outtype, **compare(reference, logits, windows), "tokenizer_agreement": agreement,
                         "file_mib": result.path.stat().st_size / 2**20, "export_s": export_s,
                         "llama_cpp_s": time.perf_counter() - start, "notes": result.notes})
    import gguf
    import llama_cpp
    import transformers

    return {
        "model": str(args.model), "source": args.source, "seqlen": args.seqlen, "windows": int(windows.shape[0]),
        "kv_type": args.kv_type, "layers": [
            [int(x) for x in (layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features,
                              layer.mlp.down_proj.in_features)] for layer in model.model.layers],
        "results": rows,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "gguf": getattr(gguf, "__version__", "?"), "llama_cpp_python": llama_cpp.__version__,
                     "python": platform.python_version(), "machine": platform.machine()},
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [f"GGUF parity: {report['model']}, {report['windows']} x {report['seqlen']} tokens of "
             f"{report['source']}, llama.cpp KV cache {report['kv_type']}", "",
             "| outtype | max abs diff | mean abs diff | top-1 agree | PPL PyTorch | PPL llama.cpp | PPL rel diff "
             "| same tokens | MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["results"]:
        lines.append(f"| {row['outtype']} | {row['max_abs_diff']:.2e} | {row['mean_abs_diff']:.2e} | "
                     f"{row['top1_agreement']:.2%} | {row['ppl_pytorch']:.4f} | {row['ppl_llama_cpp']:.4f} | "
                     f"{row['ppl_rel_diff']:+.2e} | {row['tokenizer_agreement']:.1%} | {row['file_mib']:.2f} |")
    notes = {note for row in report["results"] for note in row["notes"]}
    lines += [f"\nnote: {note}" for note in sorted(notes)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="folder written by `slimgpt prune` (or a dense folder / built-in name)")
    parser.add_argument("--source", default="builtin", help="eval text: builtin, wikitext2, a local file, ...")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--outtypes", type=lambda s: s.split(","), default=["f32", "f16"])
    parser.add_argument("--tokenizer-lines", type=int, default=200,
                        help="eval-text lines tokenized by both tokenizers for the 'same tokens' column")
    parser.add_argument("--kv-type", choices=["f32", "f16"], default="f32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="where the temporary GGUF files go (default: system temp)")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args()
    report = run(args)
    print(markdown(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
