"""The rANS streams of the bits-back codec, on ``constriction``'s stack coder (an optional extra).

Three kinds of symbols share one stack (last in, first out):
- tensors: every 16-bit word of a tensor's bytes under a uniform model (exactly 16 bits each, so the
  stack holds the safetensors payload bit for bit);
- rotations: the quantised angles of slimgpt.solver.haar under their discretised Haar densities (an
  angle index g = coarse * 2^(bits - coarse_bits) + fine: the coarse bin by a categorical table of the
  density at the bin centres, the fine offset uniform) and the sign as a fair bit;
- corrections (their own stack): integer symbol differences under a categorical table of their counts.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from slimgpt.errors import SlimGPTError
from slimgpt.solver import haar

COARSE_BITS = 12
INSTALL = 'pip install -e ".[bitsback]"  (or: pip install constriction)'


def constriction_module() -> Any:
    try:
        import constriction
    except ImportError:
        raise SlimGPTError(f"bits-back coding needs the constriction package: {INSTALL}") from None
    return constriction


def new_coder(words: np.ndarray | None = None) -> Any:
    stack = constriction_module().stream.stack
    return stack.AnsCoder() if words is None else stack.AnsCoder(words.astype(np.uint32))


@functools.lru_cache(maxsize=4096)
def _model(exponent: int, bits: int, part: str) -> Any:
    """The constriction model of the ``part`` ("coarse" / "fine") of a symbol with this density."""
    model = constriction_module().stream.model
    coarse = min(bits, COARSE_BITS)
    if exponent == haar.SIGN:
        return model.Uniform(2)
    if part == "fine":
        return model.Uniform(2 ** (bits - coarse))
    if exponent == haar.UNIFORM_ANGLE:
        return model.Uniform(2 ** (coarse + 1))
    centres = (torch.arange(2**coarse, dtype=torch.float64) + 0.5) * (torch.pi / 2**coarse)
    logp = haar.log_density(exponent, centres)
    probabilities = torch.exp(logp - logp.max()).numpy()
    return model.Categorical(probabilities, perfect=False)


def _parts(exponent: int, bits: int) -> list[str]:
    has_fine = exponent != haar.SIGN and bits > COARSE_BITS
    return ["coarse", "fine"] if has_fine else ["coarse"]


def pop_rotation(coder: Any, d: int, bits: int) -> torch.Tensor:
    """Decode a d×d rotation's symbols off the stack (consuming its bits: the bits-back step)."""
    exponents = haar.exponents(d)
    symbols = torch.zeros(exponents.numel(), dtype=torch.int64)
    shift = max(bits - COARSE_BITS, 0)
    for exponent in torch.unique(exponents).tolist():
        where = exponents == exponent
        count = int(where.sum())
        value = torch.zeros(count, dtype=torch.int64)
        for part in _parts(exponent, bits):
            got = torch.from_numpy(coder.decode(_model(exponent, bits, part), count).astype(np.int64))
            value = value * (2**shift) + got if part == "fine" else got
        symbols[where] = value
    return symbols


def push_rotation(coder: Any, symbols: torch.Tensor, d: int, bits: int) -> None:
    """Encode a rotation's symbols back onto the stack (the exact inverse of ``pop_rotation``)."""
    exponents = haar.exponents(d)
    shift = max(bits - COARSE_BITS, 0)
    for exponent in reversed(torch.unique(exponents).tolist()):
        value = symbols[exponents == exponent]
        parts = _parts(exponent, bits)
        split = {"coarse": value >> shift if len(parts) == 2 else value, "fine": value & (2**shift - 1)}
        for part in reversed(parts):
            coder.encode_reverse(split[part].numpy().astype(np.int32), _model(exponent, bits, part))


def push_tensor(coder: Any, tensor: torch.Tensor) -> None:
    """Encode a tensor's raw bytes as 16-bit words under a uniform model (16 bits each)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    if data.size % 2:
        raise SlimGPTError(f"cannot code a tensor of {tensor.dtype}: bits-back coding stores 16-bit words")
    words = data.view(np.uint16).astype(np.int32)
    coder.encode_reverse(words, constriction_module().stream.model.Uniform(2**16))


def pop_tensor(coder: Any, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    count = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size() // 2
    words = coder.decode(constriction_module().stream.model.Uniform(2**16), count).astype(np.uint16)
    return torch.from_numpy(words.view(np.uint8).copy()).view(dtype).reshape(shape)


CLIP = 255  # corrections beyond +-CLIP are escaped: one escape symbol, then the value as two raw 16-bit words
_OFFSET = 2**31


def correction_table(corrections: list[torch.Tensor]) -> list[list[int]]:
    """[value, count] of each correction value in -CLIP..CLIP that occurs, and [CLIP + 1, escapes]
    for the larger ones (the header's table; both sides code the corrections with it)."""
    values = torch.cat(corrections) if corrections else torch.zeros(0, dtype=torch.int64)
    clipped = torch.where(values.abs() > CLIP, CLIP + 1, values)
    found, counts = torch.unique(clipped, return_counts=True)
    return [[int(v), int(c)] for v, c in zip(found.tolist(), counts.tolist(), strict=True)]


def _alphabet(pairs: list[list[int]]) -> tuple[int, Any]:
    """(offset, model) of the categorical over -k..k and the escape, k the largest clipped value."""
    k = max((abs(v) for v, _ in pairs if v <= CLIP), default=0)
    table = np.zeros(2 * k + 2, dtype=np.float64)
    for value, count in pairs:
        table[2 * k + 1 if value > CLIP else value + k] = count
    return k, constriction_module().stream.model.Categorical(table, perfect=False)


def push_corrections(coder: Any, corrections: torch.Tensor, pairs: list[list[int]]) -> None:
    if len(pairs) == 1 and pairs[0][0] == 0:
        return  # nothing to correct: nothing coded
    k, model = _alphabet(pairs)
    escaped = corrections.abs() > k
    if bool(escaped.any()):
        words = (corrections[escaped] + _OFFSET).numpy().astype(np.uint32)
        raw = np.concatenate([words >> 16, words & 0xFFFF]).astype(np.int32)
        coder.encode_reverse(raw, constriction_module().stream.model.Uniform(2**16))
    symbols = torch.where(escaped, 2 * k + 1, corrections + k)
    coder.encode_reverse(symbols.numpy().astype(np.int32), model)


def pop_corrections(coder: Any, count: int, pairs: list[list[int]]) -> torch.Tensor:
    if len(pairs) == 1 and pairs[0][0] == 0:
        return torch.zeros(count, dtype=torch.int64)
    k, model = _alphabet(pairs)
    symbols = torch.from_numpy(coder.decode(model, count).astype(np.int64))
    escaped = symbols == 2 * k + 1
    values = symbols - k
    n = int(escaped.sum())
    if n:
        raw = coder.decode(constriction_module().stream.model.Uniform(2**16), 2 * n).astype(np.int64)
        values[escaped] = torch.from_numpy((raw[:n] << 16) + raw[n:]) - _OFFSET
    return values


def words_of(coder: Any) -> np.ndarray:
    """The stack's compressed words, little-endian on every platform."""
    words: np.ndarray = coder.get_compressed().astype("<u4")
    return words
