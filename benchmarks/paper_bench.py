"""Building and measuring one row of the paper tables (``paper_tables.py``): data, pruning, evaluation.

``ModelBench`` holds one dense model and what its rows share (eval windows, calibration windows, the
zero-shot tasks of its protocol); ``measure_row`` prunes a deep copy and measures it.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import ctypes
import ctypes.util
import hashlib
import io
import os
import tempfile
import threading
import time
import tokenize
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import english_tasks
import tasks as code_tasks
import torch
from paper_plan import Protocol, RowSpec, with_options

from slimgpt import corpus
from slimgpt.data import calibration_windows, eval_windows
from slimgpt.evaluation import (
    PerplexityResult,
    TaskSuite,
    count_parameters,
    load_tasks,
    perplexity,
    window_protocol,
    zero_shot,
)
from slimgpt.evaluation.ppl import model_context
from slimgpt.models.families import get_adapter
from slimgpt.models.geometry import decoder_params
from slimgpt.models.slim import load_model, resolve_model_path
from slimgpt.prune import prune_model

PROSE_CALIB = "prose"
SLICED_METHODS = ("slicegpt", "dynamic-slicing")  # the rows that get a bits-back size column
BITS_BACK_DTYPES = ("bfloat16", "float32")  # what users ship, and the precision the rows are pruned in
TASK_SETS: dict[str, ModuleType] = {"code": code_tasks, "english": english_tasks}


def task_module(protocol: Protocol) -> ModuleType:
    return TASK_SETS[protocol.tasks]


def tasks_digest(module: ModuleType) -> str:
    digest = hashlib.sha1()
    for name in module.TASK_NAMES:
        digest.update((module.TASKS_DIR / f"{name}.jsonl").read_bytes())
    return digest.hexdigest()[:12]


def fingerprint(protocol: Protocol, quick: bool) -> dict[str, Any]:
    """What a cached row must match. The code protocol's is the original one, so its rows stay valid."""
    from paper_plan import QUICK

    settings = QUICK if quick else protocol.settings
    module = task_module(protocol)
    found = {**asdict(settings), "tasks": list(module.TASK_NAMES), "task_data": tasks_digest(module)}
    if protocol.name != "code":
        found |= {"protocol": protocol.name, "ppl": protocol.ppl, "long_window": protocol.long_window}
    return found


def weights_digest(name: str) -> str:
    """SHA-1 of the model's safetensors files: retrained reference models invalidate cached rows."""
    digest = hashlib.sha1()
    for path in sorted(Path(resolve_model_path(name)).glob("*.safetensors")):
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def is_gqa(name: str) -> bool:
    """Whether the model has fewer KV heads than query heads (read from its config only)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(name))
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(kv_heads) < int(config.num_attention_heads)


def spread(windows: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` windows evenly spaced over all of them (all when there are fewer)."""
    if windows.shape[0] <= count:
        return windows
    index = torch.linspace(0, windows.shape[0] - 1, count).round().long()
    return windows[index]


# --- Table 14's prose calibration for the code models -------------------------------------------


def prose_text(max_file_chars: int = 4000, max_chars: int = 1_500_000) -> str:
    """English prose from the docstrings and comments of the TRAINING split of the built-in corpus.

    The code models' stand-in for the paper's instruction-data calibration (Table 14): the same files
    as the code calibration, but natural language only. Docstrings (module, class, function) and runs
    of comment lines become paragraphs; lines that look like code (doctests, indented examples) and
    paragraphs with few words or few letters are dropped. At most ``max_file_chars`` per file, so every
    file contributes; deterministic (files in sorted order, nodes in ``ast.walk`` order).
    """
    pieces: list[str] = []
    total = 0
    for path in corpus.stdlib_files("train"):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        paragraphs: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                docstring = ast.get_docstring(node, clean=True)
                if docstring:
                    paragraphs += docstring.split("\n\n")
        paragraphs += _comment_paragraphs(source)
        kept, size = [], 0
        for paragraph in paragraphs:
            text = _prose(paragraph)
            if text is None or size + len(text) > max_file_chars:
                continue
            kept.append(text)
            size += len(text) + 2
        pieces += kept
        total += size
        if total >= max_chars:
            break
    return "\n\n".join(pieces) + "\n"


def _comment_paragraphs(source: str) -> list[str]:
    paragraphs: list[str] = []
    current: list[str] = []
    last_row = -2
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type != tokenize.COMMENT:
                continue
            text = token.string.lstrip("#").strip()
            if token.start[0] != last_row + 1 and current:
                paragraphs.append("\n".join(current))
                current = []
            if text and not text.startswith(("!", "-*-", "type:", "noqa", "pragma")):
                current.append(text)
            last_row = token.start[0]
    except (tokenize.TokenError, SyntaxError):
        pass
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _prose(paragraph: str) -> str | None:
    lines = [line.strip() for line in paragraph.splitlines()
             if line.strip() and not line.startswith((" ", "\t")) and not line.lstrip().startswith((">>>", "..."))]
    text = " ".join(lines)
    if len(text.split()) < 6:
        return None
    letters = sum(char.isalpha() or char == " " for char in text)
    return text if letters >= 0.85 * len(text) else None


# --- peak memory of a pruning run ----------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so the RSS before a prune is not inflated by the last row."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


class PeakRss:
    """The peak resident memory of this process while the block runs, sampled every ``interval`` s.

    ``slimgpt._util.timing.peak_memory`` is the process's lifetime high-water mark on a CPU, which in a
    benchmark that prunes dozens of models in one process says nothing about one row; this samples
    ``/proc/self/statm`` on a thread instead (Linux; elsewhere ``None``).
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self.available = os.path.exists("/proc/self/statm")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        if self.available:
            _trim_heap()
            self.start = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    def to_dict(self) -> dict[str, int] | None:
        if not self.available:
            return None
        return {"rss_before": self.start, "rss_peak": self.peak, "above_before": self.peak - self.start}


# --- one model and its rows ----------------------------------------------------------------------


class ModelBench:
    """One dense model, loaded once, and everything its rows share: windows, calibration, tasks."""

    def __init__(self, name: str, protocol: Protocol, quick: bool, workdir: Path) -> None:
        from paper_plan import QUICK

        self.name = name
        self.protocol = protocol
        self.settings = QUICK if quick else protocol.settings
        self.workdir = workdir
        module = task_module(protocol)
        self.task_names = tuple(module.TASK_NAMES)
        yamls = module.write_task_yamls(workdir / f"tasks_{protocol.tasks}")
        self.suite: TaskSuite = load_tasks(list(self.task_names), yamls)
        # float32: the reference models ship in bf16, and CPU matmuls are faster and exact in float32.
        self.dense, self.tokenizer = load_model(name, dtype="float32")
        self.digest = weights_digest(name)
        self.fingerprint = fingerprint(protocol, quick)
        self.context = model_context(self.dense) or 2048
        self._windows: dict[int, torch.Tensor] = {}
        self._calibration: dict[tuple[str, int, int], torch.Tensor] = {}

    @property
    def eval_lengths(self) -> tuple[int, ...]:
        return self.protocol.eval_lengths(self.context)

    def windows(self, seqlen: int) -> torch.Tensor:
        if seqlen not in self._windows:
            count = self.settings.windows_short if seqlen == self.eval_lengths[0] else self.settings.windows_context
            self._windows[seqlen] = spread(eval_windows(self.tokenizer, self.protocol.ppl, seqlen), count)
        return self._windows[seqlen]

    def calibration(self, source: str, nsamples: int, seqlen: int) -> torch.Tensor:
        key = (source, nsamples, seqlen)
        if key not in self._calibration:
            path = str(self._prose_file()) if source == PROSE_CALIB else source
            self._calibration[key] = calibration_windows(self.tokenizer, path, nsamples, seqlen, seed=0)
        return self._calibration[key]

    def _prose_file(self) -> Path:
        path = self.workdir / "prose.txt"
        if not path.exists():
            path.write_text(prose_text(), encoding="utf-8")
        return path


def prune_row(spec: RowSpec, bench: ModelBench, model: torch.nn.Module) -> tuple[dict[str, Any], Any]:
    """Prune ``model`` in place as ``spec`` says: the row's ``prune`` record (with its peak memory) and
    the pruning report."""
    config = with_options(spec, batch_size=bench.settings.prune_batch).config()
    calibration = bench.calibration(spec.calib, spec.nsamples, spec.seqlen)
    with PeakRss() as memory:
        report = prune_model(model, config, calibration, model_name=spec.model, progress=False)
    return report, {
        "config": config.to_dict(),
        "realised_ratio": report.realised_ratio,
        "schedule": report.schedule,
        "layers": [{"layer": r.layer, "heads_kept": r.heads_kept, "heads_total": r.heads_total,
                    "kv_heads_kept": r.kv_heads_kept, "ffn_kept": r.ffn_kept, "ffn_total": r.ffn_total}
                   for r in report.layers],
        "stage_seconds": report.stage_seconds,
        "memory": memory.to_dict(),
    }


def measure_row(spec: RowSpec, bench: ModelBench, with_tasks: bool = True) -> dict[str, Any]:
    """Prune a deep copy of the dense model as ``spec`` says, then measure it: a JSON-ready row."""
    start, cpu_start = time.perf_counter(), time.process_time()
    model = copy.deepcopy(bench.dense)
    adapter = get_adapter(model.config)
    decoder_before = decoder_params(model, adapter)
    report, prune_info = prune_row(spec, bench, model) if spec.method != "dense" else (None, None)
    prune_s = time.perf_counter() - start

    ppl = {}
    for seqlen in bench.eval_lengths:
        windows = bench.windows(seqlen)
        value = perplexity(model, windows, batch_size=bench.settings.ppl_batch, progress=False)
        protocol = window_protocol(seqlen, bench.context)[1] + f", {windows.shape[0]} windows spread over held-out"
        ppl[str(seqlen)] = PerplexityResult(value, bench.protocol.ppl, protocol, seqlen, int(windows.shape[0]),
                                            int(windows.shape[0] * (seqlen - 1))).to_dict()
    scores = None
    if with_tasks:
        scores = zero_shot(model, bench.tokenizer, bench.suite, batch_size=bench.settings.task_batch,
                           limit=bench.settings.task_limit).to_dict()
    wall = time.perf_counter() - start
    sizes = bits_back_sizes(model, report, bench) if spec.method in SLICED_METHODS else None
    return {
        "key": spec.key, "model": spec.model, "method": spec.method, "ratio": spec.ratio, "calib": spec.calib,
        "nsamples": spec.nsamples, "seqlen": spec.seqlen, "options": dict(spec.options),
        "parameters": count_parameters(model),
        "decoder_parameters": decoder_params(model, adapter),
        "realised_ratio": 1 - decoder_params(model, adapter) / decoder_before,
        "ppl": ppl,
        "zero_shot": scores,
        "prune": prune_info,
        "prune_s": round(prune_s, 2),
        "eval_s": round(wall - prune_s, 2),
        "wall_s": round(wall, 2),
        "cpu_s": round(time.process_time() - cpu_start, 2),
        "model_digest": bench.digest,
        "eval": bench.fingerprint,
        **({"bits_back": sizes} if sizes is not None else {}),
    }


def bits_back_sizes(model: torch.nn.Module, report: Any, bench: ModelBench) -> dict[str, Any]:
    """Save the sliced ``model`` and export it with bits-back coding at each of ``BITS_BACK_DTYPES``: per
    precision, the safetensors and bits-back bytes and what was saved (``BitsBackSummary``), and whether
    the decoded tensors' SHA-256 checked out (``load_bits_back`` raises if not)."""
    from bits_back import cast_copy

    from slimgpt.export import bitsback
    from slimgpt.saving import save_pruned

    sizes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bitsback_", dir=bench.workdir) as tmp:
        root = Path(tmp)
        folder = save_pruned(model, None, report, root / "sliced")
        for dtype in BITS_BACK_DTYPES:
            source = folder if dtype == "float32" else cast_copy(folder, dtype, root)
            _, summary = bitsback.export_bits_back(source, root / f"bb-{dtype}")
            start = time.perf_counter()
            bitsback.load_bits_back(root / f"bb-{dtype}")
            sizes[dtype] = {**asdict(summary), "decode_seconds": round(time.perf_counter() - start, 3)}
    return sizes


def fill_bits_back(spec: RowSpec, bench: ModelBench) -> dict[str, Any]:
    """The bits-back column of a sliced row measured before the column existed: prune again (the
    pruning is deterministic given the seed; the parameter count is checked against the row) and export."""
    model = copy.deepcopy(bench.dense)
    report, _ = prune_row(spec, bench, model)
    return {"parameters": count_parameters(model), "bits_back": bits_back_sizes(model, report, bench)}
