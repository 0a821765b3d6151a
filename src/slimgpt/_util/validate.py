"""Type checks of a config dataclass's fields at construction, so a wrong type fails with one line."""

from __future__ import annotations

import math
from dataclasses import MISSING, fields
from typing import Any

from slimgpt.errors import ConfigError

_KINDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}


def check_field_types(config: Any, optional: dict[str, type] | None = None) -> None:
    """Every field holds the type of its default (``optional``: the type of a field whose default is None).

    int fields take ints (not bools or floats), float fields take finite ints or floats, bool fields
    take bools only (``compensate="no"`` is refused rather than read as true).
    """
    optional = optional or {}
    for field in fields(config):
        value = getattr(config, field.name)
        kind = optional.get(field.name) or (type(field.default) if field.default is not MISSING else None)
        if kind not in _KINDS or (value is None and field.name in optional):
            continue
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, str)
        if not ok:
            flag = "--" + field.name.replace("_", "-")
            raise ConfigError(f"{flag} {value!r} is not {_KINDS[kind]}: pass {_KINDS[kind]}")
