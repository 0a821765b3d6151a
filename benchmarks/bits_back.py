"""Bits-back export of sliced folders: bytes against safetensors, encode / decode time, logits kept.

Each FOLDER is a `slimgpt prune --method slicegpt` (or dynamic-slicing) output. For every folder and every
``--dtypes`` entry (``saved``: the folder's own precision; ``float16`` / ``float32``: a cast copy, to show
how the saving grows with the precision the rotation can be recovered at) the script exports it with
``slimgpt.export.bitsback.export_bits_back``, decodes it with ``load_bits_back`` (timed), checks the
decoded tensors' SHA-256 and the logits on a probe against the input folder, and prints a markdown row.

    python benchmarks/bits_back.py /tmp/m/tiny-mha-slicegpt-0.2 /tmp/m/tiny-gqa-slicegpt-0.5 \
        --dtypes saved,float16,float32 --json docs/results/bits_back.json
    python benchmarks/bits_back.py FOLDER --angle-bits 8,10,12,14     # the angle-precision sweep
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slimgpt import load_pruned
from slimgpt.export import bitsback


def cast_copy(folder: Path, dtype: str, root: Path) -> Path:
    """``folder`` with its floating tensors cast to ``dtype`` (``saved``: the folder itself)."""
    if dtype == "saved":
        return folder
    out = root / f"{folder.name}-{dtype}"
    shutil.copytree(folder, out)
    for file in out.glob("*.safetensors"):
        tensors = load_file(str(file))
        save_file({k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in tensors.items()},
                  str(file))
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def logits(folder: Path) -> torch.Tensor:
    model, _ = load_pruned(folder)
    probe = torch.arange(64).reshape(1, 64) % model.config.vocab_size
    with torch.no_grad():
        return model.float()(probe).logits


def measure(folder: Path, root: Path, angle_bits: int | None) -> dict[str, Any]:
    out = root / f"{folder.name}-{angle_bits}.bb"
    _, summary = bitsback.export_bits_back(folder, out, overwrite=True, angle_bits=angle_bits)
    start = time.perf_counter()
    _, tensors = bitsback.load_bits_back(out)
    decode_seconds = time.perf_counter() - start
    decoded = bitsback.decode_to_folder(out, root / f"{folder.name}-{angle_bits}.decoded", overwrite=True)
    reference, got = logits(folder), logits(decoded)
    row = {"folder": folder.name, **summary.__dict__, "decode_seconds": round(decode_seconds, 3),
           "logits_max_abs_diff": float((got - reference).abs().max()),
           "logits_scale": float(reference.abs().max()), "tensors": len(tensors)}
    shutil.rmtree(out)
    shutil.rmtree(decoded)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| folder | angle bits | safetensors bytes | bits-back bytes | saved | rotation bits returned | "
            "correction bits | header bytes | encode s | decode s | max logit diff / scale |")
    lines = [head, "|" + " --- |" * 11]
    for r in rows:
        lines.append(f"| {r['folder']} | {r['angle_bits']} | {r['safetensors_bytes']:,} | {r['bitsback_bytes']:,} | "
                     f"{r['saved_percent']:.2f}% | {r['rotation_bits_returned']:,} | {r['correction_bits']:,} | "
                     f"{r['header_bytes']:,} | {r['encode_seconds']:.1f} | {r['decode_seconds']:.1f} | "
                     f"{r['logits_max_abs_diff']:.2g} / {r['logits_scale']:.3g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--dtypes", default="saved", help="comma list of saved, float16, float32")
    parser.add_argument("--angle-bits", default="", help="comma list of angle bits (default: the dtype's)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the loops are small ops)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bits_list = [int(b) for b in args.angle_bits.split(",") if b] or [None]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bits-back-bench-") as tmp:
        for folder in args.folders:
            for dtype in args.dtypes.split(","):
                source = cast_copy(folder, dtype, Path(tmp))
                for bits in bits_list:
                    rows.append(measure(source, Path(tmp), bits))
                    print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
