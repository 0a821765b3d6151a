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


def correction_table(corrections: list[torch.Tensor]) -> list[int]:
    """Counts of each correction value -K..K over all bases (the table both sides code them with)."""
    values = torch.cat(corrections) if corrections else torch.zeros(0, dtype=torch.int64)
    k = int(values.abs().max()) if values.numel() else 0
    return torch.bincount(values + k, minlength=2 * k + 1).tolist()


def sparse_table(table: list[int]) -> list[list[int]]:
    """The table as [value, count] pairs of the values that occur (for the header)."""
    k = len(table) // 2
    return [[i - k, c] for i, c in enumerate(table) if c]


def dense_table(pairs: list[list[int]]) -> list[int]:
    k = max((abs(v) for v, _ in pairs), default=0)
    table = [0] * (2 * k + 1)
    for value, count in pairs:
        table[value + k] = int(count)
    return table


def _correction_model(table: list[int]) -> Any:
    return constriction_module().stream.model.Categorical(np.asarray(table, dtype=np.float64), perfect=False)


def push_corrections(coder: Any, corrections: torch.Tensor, table: list[int]) -> None:
    if len(table) > 1:
        k = len(table) // 2
        coder.encode_reverse((corrections + k).numpy().astype(np.int32), _correction_model(table))


def pop_corrections(coder: Any, count: int, table: list[int]) -> torch.Tensor:
    if len(table) <= 1:
        return torch.zeros(count, dtype=torch.int64)
    k = len(table) // 2
    return torch.from_numpy(coder.decode(_correction_model(table), count).astype(np.int64)) - k


def words_of(coder: Any) -> np.ndarray:
    """The stack's compressed words, little-endian on every platform."""
    words: np.ndarray = coder.get_compressed().astype("<u4")
    return words
