"""The dtype names slimgpt accepts on the command line and reads from safetensors headers."""

from __future__ import annotations

import torch

from slimgpt.errors import ConfigError

DTYPE_NAMES: dict[str, torch.dtype | None] = {
    "auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
}
CLI_DTYPES = ("float32", "bfloat16", "float16")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a name ("bf16", "float32", "auto" -> None) or a dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPE_NAMES:
        raise ConfigError(f"--dtype {value!r} is not one of: {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[value]
