"""Which rows the paper tables need (``paper_tables.py``): protocols, row specs and the run plan.

A *protocol* says how one model is measured: its calibration source and size, its perplexity text and
windows, its zero-shot tasks. The built-in tiny models (trained on Python) use the ``code`` protocol;
the real pretrained SmolLM2-135M uses ``english`` (the shipped World English Bible and the tasks of
``benchmarks/english_tasks.py``). A row's key names its calibration, so rows of different protocols
never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slimgpt.config import GQA_POLICIES, METHODS, PruneConfig
from slimgpt.errors import SlimGPTError
from slimgpt.solver.schedule import AUTO, SCHEDULES

ALL_TABLES = ("1", "5", "6", "14", "fig3", "gqa")
TABLE1_RATIOS = (0.2, 0.25, 0.33, 0.5)
ABLATION_RATIOS = (0.2, 0.5)
BASELINES = ("magnitude", "wanda-sp", "flap", "llm-pruner", "slicegpt")  # the paper's Table 1 baselines
PAPER_METHODS = ("slimgpt", *BASELINES)  # run at every --ratios; the peers at --peer-ratios
AUTO_ROW = "slimgpt-auto"  # Table 1's row for SlimGPT with --schedule auto
VARIANTS: Mapping[str, tuple[str, Mapping[str, Any]]] = {AUTO_ROW: ("slimgpt", {"schedule": AUTO})}
LABELS = {AUTO_ROW: "SlimGPT auto"}
ABLATIONS: Mapping[str, Mapping[str, Any]] = {
    "SlimGPT": {},
    "-GCD (head_score=diag)": {"head_score": "diag"},
    "-DGS (group_schedule=fixed)": {"group_schedule": "fixed"},
    "-compensation (compensate=False)": {"compensate": False},
}
FIG3_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)
SHORT_WINDOW = 128  # the paper's (LLM-Pruner's) perplexity window
SEED = 0


def registry_methods() -> tuple[str, ...]:
    """Table 1's default methods: every registered method in ``slimgpt.config.METHODS`` order, any
    other registered one after it by name, and SlimGPT with ``--schedule auto`` right after SlimGPT."""
    from slimgpt.methods import METHODS as REGISTERED

    order = [*METHODS, *sorted(set(REGISTERED) - set(METHODS))]
    index = order.index("slimgpt") + 1 if "slimgpt" in order else 0
    return tuple([*order[:index], AUTO_ROW, *order[index:]])


# --- protocols -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """How every row is measured. A cached row is reused only if these are unchanged.

    windows_short / windows_context: windows of 128 tokens and of the long length (the model's context,
    or the protocol's cap), taken evenly spread over the held-out split (its first windows are a few
    documents only). task_limit: the first items of each task (None: all).
    """

    windows_short: int = 160
    windows_context: int = 40
    task_limit: int | None = 100
    ppl_batch: int = 8
    task_batch: int = 16
    prune_batch: int = 8


QUICK = EvalSettings(windows_short=8, windows_context=4, task_limit=16)


@dataclass(frozen=True)
class Protocol:
    """How one model is calibrated and measured (see the module docstring)."""

    name: str
    calib: str  # Table 1's calibration source (slimgpt.data)
    alt_calib: str  # Table 14's other source
    ppl: str  # the perplexity text's source (its eval split)
    tasks: str  # the zero-shot task set: "code" (benchmarks/tasks.py) or "english" (english_tasks.py)
    nsamples: int
    seqlen: int
    long_window: int | None  # the longer perplexity window; None: the model's whole context
    ablation_tasks: bool  # zero-shot on the rows of Tables 5, 6, 14, Figure 3 and gqa too (else PPL only)
    settings: EvalSettings

    def eval_lengths(self, context: int) -> tuple[int, ...]:
        """The two perplexity windows: 128 tokens and the long one (one if they coincide)."""
        long = context if self.long_window is None else min(self.long_window, context)
        return tuple(sorted({min(SHORT_WINDOW, context), long}))


CODE = Protocol("code", "builtin", "prose", "builtin", "code", nsamples=128, seqlen=512, long_window=None,
                ablation_tasks=True, settings=EvalSettings())
# Sized for SmolLM2-135M (30 layers, 8192-token context) on 2 CPU cores: see paper_tables.py's docstring.
ENGLISH = Protocol("english", "english", "builtin", "english", "english", nsamples=32, seqlen=256, long_window=512,
                   ablation_tasks=False,
                   settings=EvalSettings(windows_short=100, windows_context=25, task_limit=100, task_batch=8))
PROTOCOLS = {protocol.name: protocol for protocol in (CODE, ENGLISH)}
ENGLISH_MODELS = ("smollm2-135m",)  # real pretrained models: measured on English by default


def protocol_name(model: str, requested: str = "auto") -> str:
    """``requested`` unless "auto": English for the real pretrained built-in model, code otherwise."""
    if requested != "auto":
        return requested
    return ENGLISH.name if Path(model).name in ENGLISH_MODELS else CODE.name


# --- rows ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSpec:
    """One pruned (or dense) model to build and measure."""

    model: str
    method: str  # "dense" or a PruneConfig method
    ratio: float = 0.0
    calib: str = "builtin"
    nsamples: int = 128
    seqlen: int = 512
    options: tuple[tuple[str, Any], ...] = ()  # further PruneConfig fields (ablations, schedule, GQA)

    @property
    def key(self) -> str:
        if self.method == "dense":
            return f"{self.model}|dense"
        extra = ",".join(f"{name}={value}" for name, value in sorted(self.options))
        return (f"{self.model}|{self.method}|{self.ratio:.2f}|calib={self.calib}|n={self.nsamples}|"
                f"s={self.seqlen}|{extra}")

    def config(self) -> PruneConfig:
        return PruneConfig(method=self.method, ratio=self.ratio, calib=self.calib, nsamples=self.nsamples,
                           seqlen=self.seqlen, seed=SEED, **dict(self.options))


def with_options(spec: RowSpec, **options: Any) -> RowSpec:
    merged = dict(spec.options) | options
    return RowSpec(spec.model, spec.method, spec.ratio, spec.calib, spec.nsamples, spec.seqlen,
                   tuple(sorted(merged.items())))


@dataclass(frozen=True)
class Options:
    models: tuple[str, ...]
    ablation_models: tuple[str, ...]
    tables: tuple[str, ...]
    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    peer_ratios: tuple[float, ...] = ABLATION_RATIOS
    nsamples: int | None = None  # None: the protocol's
    seqlen: int | None = None
    protocols: Mapping[str, str] = field(default_factory=dict)  # model -> protocol name (default: auto)

    def protocol(self, model: str) -> Protocol:
        return PROTOCOLS[self.protocols.get(model) or protocol_name(model)]

    def calibration(self, model: str) -> tuple[str, int, int]:
        """The model's default calibration: source, windows, tokens per window."""
        protocol = self.protocol(model)
        return protocol.calib, self.nsamples or protocol.nsamples, self.seqlen or protocol.seqlen

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "protocols": {m: self.protocol(m).name for m in (*self.models, *self.ablation_models)}}


@dataclass
class Plan:
    """The rows of every requested table, per model, in run order, without duplicates."""

    rows: dict[str, list[RowSpec]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    methods: tuple[str, ...] = ()  # Table 1's methods that are available (AUTO_ROW included)
    tasks: set[str] = field(default_factory=set)  # keys of the rows that are also measured on the zero-shot tasks

    def add(self, spec: RowSpec, tasks: bool = True) -> RowSpec:
        bucket = self.rows.setdefault(spec.model, [])
        if all(existing.key != spec.key for existing in bucket):
            bucket.append(spec)
        if tasks:
            self.tasks.add(spec.key)
        return spec


def available_methods(requested: Iterable[str], notes: list[str]) -> list[str]:
    """The requested methods this slimgpt implements; a note for each one it does not (yet)."""
    from slimgpt.methods import METHODS as REGISTERED

    chosen = []
    for method in requested:
        base, options = VARIANTS.get(method, (method, {}))
        try:
            PruneConfig(method=base, **options)
        except SlimGPTError:
            notes.append(f"method {method!r} is not available in this slimgpt (not in {', '.join(METHODS)}): skipped")
            continue
        if base not in REGISTERED:
            notes.append(f"method {method!r} is in slimgpt.config.METHODS but not registered: skipped")
            continue
        chosen.append(method)
    return chosen


def base_row(model: str, options: Options, ratio: float, method: str = "slimgpt") -> RowSpec:
    """Table 1's row of ``method`` (a PruneConfig method or a VARIANTS name) at ``ratio``."""
    calib, nsamples, seqlen = options.calibration(model)
    base, extra = VARIANTS.get(method, (method, {}))
    spec = RowSpec(model, base, ratio, calib, nsamples, seqlen)
    return with_options(spec, **extra) if extra else spec


def calib_row(model: str, options: Options, ratio: float, calib: str) -> RowSpec:
    _, nsamples, seqlen = options.calibration(model)
    return RowSpec(model, "slimgpt", ratio, calib, nsamples, seqlen)


def schedule_row(model: str, options: Options, schedule: str) -> RowSpec:
    spec = base_row(model, options, 0.5)
    return spec if schedule == PruneConfig().schedule else with_options(spec, schedule=schedule)


def fig3_values(full: int) -> list[int]:
    return sorted({max(1, round(full * fraction)) for fraction in FIG3_FRACTIONS})


def fig3_row(model: str, options: Options, axis: str, value: int) -> RowSpec:
    calib, nsamples, seqlen = options.calibration(model)
    if axis == "nsamples":
        return RowSpec(model, "slimgpt", 0.5, calib, value, seqlen)
    return RowSpec(model, "slimgpt", 0.5, calib, nsamples, value)


def gqa_row(model: str, options: Options, ratio: float, policy: str) -> RowSpec:
    """The default policy's row is Table 1's row (same key); the other one names its policy."""
    spec = base_row(model, options, ratio)
    return spec if policy == PruneConfig().gqa_policy else with_options(spec, gqa_policy=policy)


def table1_ratios(options: Options, method: str) -> tuple[float, ...]:
    """The paper's methods at every --ratios; the peers (and SlimGPT auto) at --peer-ratios."""
    return options.ratios if method in PAPER_METHODS else options.peer_ratios


def build_plan(options: Options, is_gqa: Callable[[str], bool]) -> Plan:
    """Every row in run order: dense, Table 1 at 20% and 50% (every method), Table 1's other ratios,
    then Tables 6, 5, 14, Figure 3 and the GQA-policy table."""
    plan = Plan()
    plan.methods = tuple(available_methods(options.methods, plan.notes))
    for model in dict.fromkeys([*options.models, *options.ablation_models]):
        plan.add(RowSpec(model, "dense"))
    if "1" in options.tables:
        for model in options.models:
            ratios = sorted({r for m in plan.methods for r in table1_ratios(options, m)},
                            key=lambda r: (r not in ABLATION_RATIOS, r))
            for ratio in ratios:
                for method in plan.methods:
                    if ratio in table1_ratios(options, method):
                        plan.add(base_row(model, options, ratio, method))
    for model in options.ablation_models:
        _ablation_rows(plan, options, model)
    if "gqa" in options.tables:
        gqa_models = [model for model in options.models if is_gqa(model)]
        if not gqa_models:
            plan.notes.append("table gqa: none of --models has grouped KV heads: skipped")
        for model in gqa_models:
            tasks = options.protocol(model).ablation_tasks
            for ratio in ABLATION_RATIOS:
                for policy in GQA_POLICIES:
                    plan.add(gqa_row(model, options, ratio, policy), tasks)
    return plan


def _ablation_rows(plan: Plan, options: Options, model: str) -> None:
    tasks = options.protocol(model).ablation_tasks
    if "6" in options.tables:
        for schedule in SCHEDULES:
            plan.add(schedule_row(model, options, schedule), tasks)
    if "5" in options.tables:
        for ratio in ABLATION_RATIOS:
            for ablation in ABLATIONS.values():
                plan.add(with_options(base_row(model, options, ratio), **ablation), tasks)
    if "14" in options.tables:
        protocol = options.protocol(model)
        for ratio in ABLATION_RATIOS:
            for calib in (protocol.calib, protocol.alt_calib):
                plan.add(calib_row(model, options, ratio, calib), tasks)
    if "fig3" in options.tables:
        _, nsamples, seqlen = options.calibration(model)
        for value in fig3_values(nsamples):
            plan.add(fig3_row(model, options, "nsamples", value), tasks)
        for value in fig3_values(seqlen):
            plan.add(fig3_row(model, options, "seqlen", value), tasks)


def model_label(model: str) -> str:
    """A model as tables name it: a built-in name, or a folder's last component."""
    return Path(model).name or model
