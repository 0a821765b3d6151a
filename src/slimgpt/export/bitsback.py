"""Bits-back coding of a sliced checkpoint's rotational freedom (``slimgpt export --format bits-back``).

After He, Flamich and Hernández-Lobato, "Getting Free Bits Back from Rotational Symmetries in LLMs"
(docs/method.md, "Bits-back export"). A sliced model (SliceGPT, dynamic slicing) computes the same
function after any orthogonal change of basis P of each free residual basis (bitsback_layout), so a plain
file pays for one arbitrary choice of every P. The encoder, per free basis k in order:

1. canonicalises it: Q_k = the orthogonal factor of the positive-diagonal QR of d pivot columns of the
   basis's designated block matrix (every tensor that moves with that basis alone, in writer form; the
   columns chosen by greedy pivoted QR and stored in the header);
2. *decodes* a rotation R_k off the rANS stack under the discretised Haar density (slimgpt.solver.haar):
   this consumes bits of the tensors already pushed;
3. moves the basis by P_k = Q_k R_k and pushes the tensors whose last free basis is k (raw 16-bit words);
4. runs the decoder's recovery of R_k from those rounded tensors and keeps the symbol differences
   (the correction stream; float round-off in the canonicalisation is absorbed there).

The decoder goes backwards: pop basis k's tensors, canonicalise them (QR again: the Q factor is R_k^T),
quantise, add the corrections, and *encode* R_k back, which returns the bits the encoder took. What is
decoded is the moved checkpoint, bit for bit (checked against a SHA-256 in the header); its logits equal
the input's up to one float rounding of each moved tensor, as a re-save would.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimgpt._util import files
from slimgpt.errors import SlimGPTError
from slimgpt.export import bitsback_codec as codec
from slimgpt.export.bitsback_layout import Layout, frame_matrix, move_tensor, plan_layout
from slimgpt.export.checkpoint import copy_files, read_checkpoint, support_files
from slimgpt.models.families import FAMILIES
from slimgpt.solver import haar

logger = logging.getLogger(__name__)

MAGIC = b"SLIMGPT-BITSBACK-1\n"
FILE = "model.bitsback"
# angle bits per pi by the weights' dtype: where more bits stop paying for their corrections (the
# recoverable precision is the weights' times the frame's conditioning; measured: docs/results/bits_back.md)
DEFAULT_BITS = {torch.bfloat16: 12, torch.float16: 14, torch.float32: 26}


class CodecError(SlimGPTError):
    """A bits-back file that does not decode (damaged, or written by another slimgpt)."""


@dataclass
class BitsBackSummary:
    """What an export saved, in bytes and bits."""

    safetensors_bytes: int
    bitsback_bytes: int
    saved_percent: float
    tensor_bits: int
    rotation_bits_returned: int
    correction_bits: int
    header_bytes: int
    free_bases: int
    angle_bits: int
    corrected_symbols: int
    rotation_symbols: int
    encode_seconds: float


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread: the codec's loops are thousands of small float64 ops, where the
    thread pool's hand-offs cost more than the work (about 40x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _frame(layout: Layout, basis: int, tensors: dict[str, torch.Tensor], columns: torch.Tensor) -> torch.Tensor:
    """The canonical frame of ``basis``: the positive-diagonal QR of its designated matrix's pivot columns."""
    return haar.canonical_basis(frame_matrix(layout, basis, tensors)[:, columns])


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _angle_bits(tensors: dict[str, torch.Tensor], layout: Layout, bits: int | None) -> int:
    if bits is not None:
        return bits
    dtypes = {tensors[n].dtype for n in layout.moves if layout.group(n) >= 0}
    return min((DEFAULT_BITS.get(d, 26) for d in dtypes), default=26)


def _pack(pivots: dict[int, torch.Tensor]) -> str:
    """Every basis's pivot columns as one base64 little-endian uint16 (or uint32) array, in the header."""
    flat = torch.cat([pivots[b] for b in sorted(pivots)]) if pivots else torch.zeros(0, dtype=torch.int64)
    kind = "<u2" if flat.numel() == 0 or int(flat.max()) < 2**16 else "<u4"
    return kind + ":" + base64.b64encode(flat.numpy().astype(kind).tobytes()).decode()


def _unpack(text: str, layout: Layout) -> dict[int, torch.Tensor]:
    kind, _, data = text.partition(":")
    flat = torch.from_numpy(np.frombuffer(base64.b64decode(data), dtype=kind).astype(np.int64))
    out, start = {}, 0
    for basis in layout.free:
        out[basis] = flat[start:start + layout.widths[basis]]
        start += layout.widths[basis]
    if start != flat.numel():
        raise CodecError("the header's pivot columns do not match the free bases: the file is damaged; export again")
    return out


def encode(tensors: dict[str, torch.Tensor], layout: Layout, bits: int) -> tuple[bytes, dict[str, torch.Tensor],
                                                                                 dict[str, Any]]:
    """The coded payload, the moved tensors it decodes to, and the header facts about it."""
    main, moved = codec.new_coder(), dict(tensors)
    for name in reversed(layout.members(-1)):  # reversed pushes pop in name order
        codec.push_tensor(main, tensors[name])
    bases: dict[int, torch.Tensor] = {}
    corrections, symbols_total, returned = [], 0, 0
    pivots = {}
    for basis in layout.free:
        pivots[basis] = haar.pivot_columns(frame_matrix(layout, basis, tensors))
        frame = _frame(layout, basis, tensors, pivots[basis])
        before = main.num_bits()
        symbols = codec.pop_rotation(main, layout.widths[basis], bits)
        returned += before - main.num_bits()
        bases[basis] = frame @ haar.rotation_from_symbols(symbols, layout.widths[basis], bits)
        members = layout.members(basis)
        for name in members:
            moved[name] = move_tensor(tensors[name], layout.moves[name], bases)
        for name in reversed(members):
            codec.push_tensor(main, moved[name])
        _, delta = haar.recover_symbols(_frame(layout, basis, moved, pivots[basis]).T, bits, truth=symbols)
        corrections.append(delta)
        symbols_total += symbols.numel()
    table = codec.correction_table(corrections)
    fix = codec.new_coder()
    for delta in corrections:  # the decoder pops the last basis's first
        codec.push_corrections(fix, delta, table)
    main_words, fix_words = codec.words_of(main), codec.words_of(fix)
    facts = {"angle_bits": bits, "correction_table": table, "pivots": _pack(pivots),
             "main_words": int(main_words.size), "correction_words": int(fix_words.size),
             "returned_bits": int(returned), "symbols": symbols_total,
             "corrected": int(sum(int((c != 0).sum()) for c in corrections))}
    return main_words.tobytes() + fix_words.tobytes(), moved, facts


def decode(payload: bytes, layout: Layout, specs: dict[str, tuple[list[int], torch.dtype]], facts: dict[str, Any]
           ) -> dict[str, torch.Tensor]:
    """The moved tensors from a payload written by ``encode`` (CodecError if it does not decode exactly)."""
    split = 4 * int(facts["main_words"])
    main = codec.new_coder(np.frombuffer(payload[:split], dtype="<u4"))
    fix = codec.new_coder(np.frombuffer(payload[split:], dtype="<u4"))
    bits, table, tensors = int(facts["angle_bits"]), facts["correction_table"], {}
    pivots = _unpack(facts["pivots"], layout)
    for basis in reversed(layout.free):
        for name in layout.members(basis):
            tensors[name] = codec.pop_tensor(main, *specs[name])
        d = layout.widths[basis]
        delta = codec.pop_corrections(fix, d * (d - 1) // 2 + 1, table)
        symbols, _ = haar.recover_symbols(_frame(layout, basis, tensors, pivots[basis]).T, bits,
                                        corrections=delta)
        codec.push_rotation(main, symbols, d, bits)
    for name in layout.members(-1):
        tensors[name] = codec.pop_tensor(main, *specs[name])
    if not (main.is_empty() and fix.is_empty()):
        raise CodecError("the bits-back streams did not decode to empty: the file is damaged or was written by an "
                         "incompatible slimgpt; export the sliced model again")
    return tensors


def _header(saved_config: dict[str, Any], layout: Layout, tensors: dict[str, torch.Tensor], moved_digest: str,
            facts: dict[str, Any]) -> dict[str, Any]:
    return {"format": "slimgpt-bits-back", "version": 1, "model_type": saved_config.get("model_type"),
            "slice_dims": layout.widths, "free_bases": layout.free, "sha256": moved_digest, **facts,
            "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                        for name, t in sorted(tensors.items())}}


def write_file(path: Path, header: dict[str, Any], payload: bytes) -> int:
    text = json.dumps(header, sort_keys=True).encode()
    path.write_bytes(MAGIC + struct.pack("<Q", len(text)) + text + payload)
    return len(MAGIC) + 8 + len(text)


def read_file(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise CodecError(f"{path} is not a slimgpt bits-back file: pass a folder written by "
                         "`slimgpt export --format bits-back`")
    start = len(MAGIC) + 8
    (length,) = struct.unpack("<Q", data[len(MAGIC):start])
    header: dict[str, Any] = json.loads(data[start:start + length])
    return header, data[start + length:]


def _summary_markdown(summary: BitsBackSummary, source: Path) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in asdict(summary).items())
    return (f"# Bits-back export of {source.name}\n\nThe same tensors as plain safetensors at the same precision, "
            f"{summary.saved_percent:.2f}% smaller: the rotation of each of {summary.free_bases} residual bases is "
            f"coded into the bits of the weights (bits-back), less {summary.correction_bits} correction bits.\n\n"
            f"| quantity | value |\n| --- | --- |\n{rows}\n\nDecode: `slimgpt eval DIR` or "
            "`slimgpt.export.bitsback.load_bits_back(DIR)`.\n")


def export_bits_back(directory: str | Path, output: str | Path, overwrite: bool = False,
                     angle_bits: int | None = None) -> tuple[Path, BitsBackSummary]:
    """Write ``output``: the sliced folder's tensors as one bits-back file, its config and support files."""
    codec.constriction_module()
    source = Path(directory)
    files.check_output(output, overwrite)
    saved = read_checkpoint(source)
    layout = plan_layout(saved.config, FAMILIES[saved.family], saved.tensors)
    bits = _angle_bits(saved.tensors, layout, angle_bits)
    start = time.perf_counter()
    with one_thread():
        payload, moved, facts = encode(saved.tensors, layout, bits)
    seconds = time.perf_counter() - start
    header = _header(saved.config, layout, saved.tensors, _digest(moved), facts)
    safetensors_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    result: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        result["header"] = write_file(tmp / FILE, header, payload)
        copy_files(support_files(source), tmp)
        copy_files([source / "config.json"], tmp)
        summary = _summarise(tmp / FILE, safetensors_bytes, facts, result["header"], len(layout.free), seconds)
        result["summary"] = summary
        (tmp / "bits_back.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
        (tmp / "bits_back.md").write_text(_summary_markdown(summary, source))

    path = files.write_atomic_dir(output, fill, overwrite)
    summary = result["summary"]
    if summary.bitsback_bytes >= summary.safetensors_bytes:
        logger.warning("%s is not smaller than the safetensors (%d >= %d bytes): %d angle bits is finer than the "
                       "rotations can be recovered at; export again with a smaller --angle-bits", path,
                       summary.bitsback_bytes, summary.safetensors_bytes, bits)
    return path, summary


def _summarise(path: Path, safetensors_bytes: int, facts: dict[str, Any], header_bytes: int, free: int,
               seconds: float) -> BitsBackSummary:
    size = path.stat().st_size
    tensor_bits = 32 * int(facts["main_words"]) + int(facts["returned_bits"])
    return BitsBackSummary(safetensors_bytes, size, round(100 * (1 - size / safetensors_bytes), 3), tensor_bits,
                           int(facts["returned_bits"]), 32 * int(facts["correction_words"]), header_bytes, free,
                           int(facts["angle_bits"]), int(facts["corrected"]), int(facts["symbols"]), round(seconds, 3))


def is_bits_back(path: str | Path) -> bool:
    """Whether ``path`` is a bits-back export (its folder or its ``model.bitsback`` file)."""
    path = Path(path)
    return (path / FILE).is_file() if path.is_dir() else path.name.endswith(".bitsback") and path.is_file()


def load_bits_back(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Decode a bits-back export (folder or file) to (config, tensors) of the sliced checkpoint."""
    codec.constriction_module()
    path = Path(path)
    file = path / FILE if path.is_dir() else path
    if not file.is_file():
        raise CodecError(f"{path} has no {FILE}: pass a folder written by `slimgpt export --format bits-back`")
    header, payload = read_file(file)
    config_path = file.parent / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    specs = {n: (s["shape"], getattr(torch, s["dtype"])) for n, s in header["tensors"].items()}
    empty = {n: torch.empty(shape, dtype=dtype) for n, (shape, dtype) in specs.items()}
    row = FAMILIES.get(str(header["model_type"]).removeprefix("slimgpt_"))
    if row is None or config.get("slice_dims") != header["slice_dims"]:
        raise CodecError(f"{file.parent}/config.json does not match {file.name}: keep the exported folder together")
    layout = plan_layout(config, row, empty, free_bases=[int(b) for b in header["free_bases"]])
    try:
        with torch.no_grad(), one_thread():
            tensors = decode(payload, layout, specs, header)
    except KeyError as error:
        # a flipped bit can make the decoder leave an entropy model's support: constriction 0.5 raises KeyError
        # ('zero probability') when the symbol is pushed back; other damage reaches the checks below
        raise CodecError(f"{file} does not decode ({type(error).__name__}: {error}): the file is damaged; "
                         "export the sliced model again") from error
    if _digest(tensors) != header["sha256"]:
        raise CodecError(f"{file} decoded to tensors that fail their SHA-256: the file is damaged; export again")
    return config, tensors


def decode_to_folder(path: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Decode a bits-back export into a plain sliced folder (safetensors) that ``slimgpt`` loads."""
    config, tensors = load_bits_back(path)
    source = Path(path) if Path(path).is_dir() else Path(path).parent
    keep = [p for p in support_files(source) if p.name not in ("bits_back.json", "bits_back.md") and p.name != FILE]

    def fill(tmp: Path) -> None:
        files.save_tensors_atomic(tensors, tmp / "model.safetensors")
        copy_files(keep, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return files.write_atomic_dir(output, fill, overwrite)
