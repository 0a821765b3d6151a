"""Hugging Face Hub sources: loading one split with the ``datasets`` package, and failing fast offline.

``datasets`` keeps its own on-disk cache. Every problem a user can fix (Hub offline or unreachable,
nothing cached, a column gone) is a one-line ``DataError`` raised in seconds, before any pruning work.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from slimgpt.data.sources import (
    ALPACA_PROMPT_NO_INPUT,
    ALPACA_PROMPT_WITH_INPUT,
    LOCAL_HINT,
    HubSource,
    Split,
    alpaca_fields,
)
from slimgpt.errors import DataError

logger = logging.getLogger(__name__)

# Seconds to wait for the Hub to answer before calling it unreachable. huggingface_hub retries a
# failed request 5 times with backoff (about 23 s when DNS fails at once, over a minute when packets
# are dropped), so one short probe decides first.
HUB_PROBE_TIMEOUT_S = 5.0
_TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})


def hub_split_and_files(hub: HubSource, split: Split) -> tuple[str, str | None]:
    """The Hub split and data file that ``split`` reads."""
    if split == "calibration":
        return hub.calibration_split, hub.calibration_files
    return hub.eval_split, hub.eval_files


def rows_description(hub: HubSource, split: Split) -> str:
    """Which rows of the Hub split ``split`` reads, in words for a report."""
    if hub.heldout_fraction > 0:
        held = f"last {hub.heldout_fraction:.0%}"
        return f"all but the {held}" if split == "calibration" else f"the {held} (held back from calibration)"
    if split == "eval" and hub.eval_documents is not None:
        return f"first {hub.eval_documents}"
    return "all"


def _hub_label(hub: HubSource, files: str | None) -> str:
    """``id/config@revision:file``, the way the message and the cache name it."""
    label = hub.hub_id + (f"/{hub.config}" if hub.config else "") + (f"@{hub.revision}" if hub.revision else "")
    return label + (f":{files}" if files else "")


def hub_rows(name: str, hub: HubSource, split: Split, required: Sequence[str]) -> Any:
    """The rows ``split`` may read (a ``datasets.Dataset``), checked to have the ``required`` columns.

    A one-split dataset loses the rows the other split owns (``heldout_range``); eval keeps at most
    ``eval_documents`` rows.
    """
    hub_split, files = hub_split_and_files(hub, split)
    dataset = load_hub_split(name, hub, hub_split, files)
    if hub.heldout_fraction > 0:
        dataset = dataset.select(heldout_range(len(dataset), hub.heldout_fraction, split))
    if split == "eval" and hub.eval_documents is not None:
        dataset = dataset.select(range(min(len(dataset), hub.eval_documents)))
    _require_columns(name, dataset.column_names, required)
    return dataset


def hub_documents(name: str, hub: HubSource, split: Split) -> Sequence[str]:
    """The documents of one split; a text column stays lazy so C4 rows are read only when sampled."""
    if hub.record_format == "alpaca":
        return [_format_alpaca(record) for record in hub_rows(name, hub, split, ("instruction", "output"))]
    column: Sequence[str] = hub_rows(name, hub, split, (hub.field,))[hub.field]  # a lazy datasets.Column
    return column


def heldout_range(rows: int, fraction: float, split: Split) -> range:
    """Rows ``split`` may read of a one-split dataset: eval the last ``fraction``, calibration the rest.

    At least one row is held back, and the boundary depends only on the row count, so calibration can
    never see an eval row.
    """
    heldout = max(1, math.ceil(rows * fraction))
    if heldout >= rows:
        raise DataError(f"a dataset of {rows} rows is too small to hold back {fraction:.0%} for eval: pass more data")
    return range(rows - heldout, rows) if split == "eval" else range(rows - heldout)


def _require_columns(name: str, columns: Sequence[str], required: Sequence[str]) -> None:
    missing = [column for column in required if column not in columns]
    if missing:
        raise DataError(
            f"dataset {name!r} has no {', '.join(map(repr, missing))} column "
            f"(columns: {', '.join(columns)}): the Hub copy changed; {LOCAL_HINT}"
        )


def _format_alpaca(record: Mapping[str, Any]) -> str:
    """One Alpaca record as one document in the standard Stanford Alpaca prompt (no Input if it is empty)."""
    fields = alpaca_fields(record)
    template = ALPACA_PROMPT_WITH_INPUT if fields["input"] else ALPACA_PROMPT_NO_INPUT
    return template.format(**fields)


def load_hub_split(name: str, hub: HubSource, hub_split: str, files: str | None) -> Any:
    """``datasets.load_dataset`` for one split, failing in seconds with a one-line ``DataError``.

    Offline with nothing cached: fail before calling it. Online: one short probe first, because a
    closed network otherwise costs huggingface_hub's retries (23 s to over a minute) and a traceback.
    Returns a ``datasets.Dataset``.
    """
    label = _hub_label(hub, files)
    cache_dir = _require_available(name, hub, label)

    from datasets import load_dataset

    logger.info("loading dataset %r (%s), split %s", name, label, hub_split)
    try:
        return load_dataset(
            hub.hub_id,
            hub.config,
            split=hub_split,
            data_files={hub_split: files} if files else None,
            revision=hub.revision,
            cache_dir=str(cache_dir),
        )
    except Exception as error:  # datasets raises many types here; all mean "this data could not be read"
        raise DataError(
            f"could not load dataset {name!r} ({label}): {_one_line(error)}: check the network and "
            f"disk space, or {LOCAL_HINT}"
        ) from error


def check_hub_available(name: str, hub: HubSource, split: Split) -> None:
    """Raise a one-line ``DataError`` now if ``split`` of ``hub`` cannot be loaded: offline with nothing
    cached, or the Hub unreachable. The preflight calls it, so this fails before the model loads."""
    _require_available(name, hub, _hub_label(hub, hub_split_and_files(hub, split)[1]))


def _require_available(name: str, hub: HubSource, label: str) -> Path:
    """The datasets cache folder, once the data is known to be loadable from it or from the Hub."""
    cache_dir = _datasets_cache_dir()
    cached = _in_datasets_cache(hub.hub_id, cache_dir)
    if _hub_offline():
        if not cached:
            raise DataError(
                f"dataset {name!r} ({label}) is not in the local Hugging Face cache ({cache_dir}) and the "
                f"Hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): {LOCAL_HINT}, or download it "
                "once with network (HF_DATASETS_CACHE=... to choose where)"
            )
    else:
        _check_hub_reachable(name, label, cached)
    return cache_dir


def _check_hub_reachable(name: str, label: str, cached: bool) -> None:
    """Raise ``DataError`` unless the Hub endpoint answers within ``HUB_PROBE_TIMEOUT_S`` (any status)."""
    from datasets import config
    from huggingface_hub.utils import get_session

    endpoint = config.HF_ENDPOINT
    try:
        get_session().head(endpoint, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:  # any failure to get an answer means unreachable, whatever the transport
        fix = "set HF_HUB_OFFLINE=1 to use the cached copy" if cached else LOCAL_HINT
        raise DataError(
            f"cannot reach the Hugging Face Hub at {endpoint} to load dataset {name!r} ({label}): "
            f"{_one_line(error)}: check the network, or {fix}"
        ) from error


def _hub_offline() -> bool:
    """Offline as the user asked now (environment), or as datasets decided when it was imported."""
    variables = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    if any(os.environ.get(variable, "").upper() in _TRUE_VALUES for variable in variables):
        return True
    from datasets import config

    return bool(config.HF_HUB_OFFLINE)


def _datasets_cache_dir() -> Path:
    """The datasets cache as the environment names it now (read per call, not at import)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "datasets"
    from datasets import config

    return Path(config.HF_DATASETS_CACHE).expanduser()


def _in_datasets_cache(hub_id: str, cache_dir: Path) -> bool:
    """Whether datasets has a prepared copy of ``hub_id``: the directory layout its offline loader reads."""
    from datasets.naming import camelcase_to_snakecase

    parts = hub_id.split("/")
    parts[-1] = camelcase_to_snakecase(parts[-1])
    root = cache_dir / "___".join(parts)
    return any(path.is_dir() for path in root.glob("*/*/*"))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
