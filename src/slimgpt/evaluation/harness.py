"""Zero-shot (and MMLU 5-shot) accuracy with the stock, released lm-evaluation-harness.

The in-memory model is wrapped in ``lm_eval.models.huggingface.HFLM`` so a pruned model is evaluated
exactly as loaded (no save / reload, no fork of lm-eval). Task definitions come either from lm-eval's
own registry (which downloads the datasets from the Hugging Face Hub) or, offline, from a directory of
task YAMLs whose datasets are local files.

Papers disagree on acc vs acc_norm, so both are kept per task and the average
names its convention.

A local task for ``--tasks-dir`` is a stock lm-eval YAML whose dataset is a local file; ``data_files``
must be an absolute path (lm-eval does not resolve it against the YAML's folder)::

    task: piqa
    dataset_path: json
    dataset_kwargs:
      data_files:
        validation: /data/piqa/valid.jsonl
    output_type: multiple_choice
    validation_split: validation
    doc_to_text: "Question: {{goal}}\nAnswer:"
    doc_to_target: label
    doc_to_choice: "{{[sol1, sol2]}}"
    metric_list: [{metric: acc}, {metric: acc_norm}]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimgpt.errors import ConfigError, DataError, SlimGPTError

logger = logging.getLogger(__name__)

# The seven commonsense tasks of SlimGPT / LLM-Pruner, then MMLU.
COMMONSENSE_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
DEFAULT_TASKS = (*COMMONSENSE_TASKS, "mmlu")
# Few-shot examples per task; every task not listed is zero-shot.
DEFAULT_FEWSHOT: Mapping[str, int] = {"mmlu": 5}
# Tasks left out of the headline average: MMLU is a different kind of benchmark, and the papers'
# "7-task average" does not contain it.
AVERAGE_EXCLUDES = frozenset({"mmlu"})
AVERAGE_CONVENTION = "mean of acc_norm where the task reports it, else acc"
PLAIN_AVERAGE_CONVENTION = "mean of acc"


@dataclass(frozen=True)
class TaskScore:
    """One task's accuracies; ``acc_norm`` is None when the task does not report it (BoolQ, MMLU)."""

    name: str
    acc: float
    acc_norm: float | None
    acc_stderr: float | None
    acc_norm_stderr: float | None
    num_fewshot: int
    n_samples: int | None

    @property
    def headline(self) -> float:
        """The number that enters the average: acc_norm if reported, else acc."""
        return self.acc_norm if self.acc_norm is not None else self.acc

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "acc": self.acc,
            "acc_norm": self.acc_norm,
            "acc_stderr": self.acc_stderr,
            "acc_norm_stderr": self.acc_norm_stderr,
            "num_fewshot": self.num_fewshot,
            "n_samples": self.n_samples,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskScore:
        return cls(
            name=str(data["name"]),
            acc=float(data["acc"]),
            acc_norm=_optional_float(data.get("acc_norm")),
            acc_stderr=_optional_float(data.get("acc_stderr")),
            acc_norm_stderr=_optional_float(data.get("acc_norm_stderr")),
            num_fewshot=int(data["num_fewshot"]),
            n_samples=None if data.get("n_samples") is None else int(data["n_samples"]),
        )


@dataclass(frozen=True)
class ZeroShotResult:
    """Scores of every task run, plus the headline averages over ``average_tasks``."""

    tasks: tuple[TaskScore, ...]
    average: float | None
    average_acc: float | None
    average_tasks: tuple[str, ...]
    average_convention: str
    task_source: str  # "lm-eval stock tasks" or "local task YAMLs in DIR"
    limit: int | None
    lm_eval_version: str

    def score(self, name: str) -> TaskScore | None:
        return next((task for task in self.tasks if task.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": [task.to_dict() for task in self.tasks],
            "average": self.average,
            "average_acc": self.average_acc,
            "average_tasks": list(self.average_tasks),
            "average_convention": self.average_convention,
            "task_source": self.task_source,
            "limit": self.limit,
            "lm_eval_version": self.lm_eval_version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ZeroShotResult:
        return cls(
            tasks=tuple(TaskScore.from_dict(task) for task in data["tasks"]),
            average=_optional_float(data.get("average")),
            average_acc=_optional_float(data.get("average_acc")),
            average_tasks=tuple(data.get("average_tasks", ())),
            average_convention=str(data.get("average_convention", AVERAGE_CONVENTION)),
            task_source=str(data.get("task_source", "")),
            limit=None if data.get("limit") is None else int(data["limit"]),
            lm_eval_version=str(data.get("lm_eval_version", "")),
        )


@dataclass(frozen=True)
class TaskSuite:
    """Tasks resolved and their data loaded, before any model runs.

    Loading is split from evaluation so that a missing dataset (offline, bad path) is reported
    before the model is loaded or any perplexity is computed.
    """

    names: tuple[str, ...]
    objects: Mapping[str, Sequence[Any]]  # requested name -> lm-eval Task / Group objects
    leaf_tasks: Mapping[str, tuple[str, ...]]  # requested name -> leaf task names
    is_group: Mapping[str, bool]
    manager: Any  # lm_eval.tasks.TaskManager, reused so lm-eval does not rebuild its index
    source: str


def _optional_float(value: Any) -> float | None:
    """lm-eval writes "N/A" for a missing stderr; JSON has no NaN. Both become None."""
    if value is None or isinstance(value, str):
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as error:
        raise SlimGPTError("zero-shot evaluation needs lm-eval: pip install slimgpt[eval]") from error
    return lm_eval


def warn_python_in_tasks(directory: Path) -> list[Path]:
    """Task YAMLs whose ``!function`` tags make lm-eval import and run Python from ``directory``.

    That is lm-eval's documented way to define a task, so it is allowed, but never silently: each such
    file is named in a warning before anything runs.
    """
    files = [path for path in sorted(directory.rglob("*.y*ml")) if "!function" in path.read_text(errors="replace")]
    for path in files:
        logger.warning("--tasks-dir: %s uses !function, so lm-eval will run Python code from %s", path.name,
                       directory)
    return files


def load_tasks(names: Sequence[str], tasks_dir: str | Path | None = None) -> TaskSuite:
    """Resolve task names and load their datasets with lm-eval's ``TaskManager``.

    Without ``tasks_dir`` the names are lm-eval's stock tasks, whose datasets come from the Hub (or
    the local `datasets` cache). With ``tasks_dir`` only the YAMLs in that directory are indexed, so
    nothing is fetched from the network.
    """
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    if not names:
        raise ConfigError("no zero-shot tasks given")
    if tasks_dir is not None:
        directory = Path(tasks_dir).expanduser().resolve()
        if not directory.is_dir():
            raise DataError(f"--tasks-dir {tasks_dir}: not a directory of lm-eval task YAMLs")
        warn_python_in_tasks(directory)
        manager = TaskManager(include_path=str(directory), include_defaults=False)
        source = f"local task YAMLs in {directory}"
    else:
        manager = TaskManager()
        source = "lm-eval stock tasks"

    objects: dict[str, list[Any]] = {}
    leaf_tasks: dict[str, tuple[str, ...]] = {}
    is_group: dict[str, bool] = {}
    for name in names:
        loaded = _load_one(manager, name, tasks_dir)
        if name in loaded["groups"]:
            objects[name] = [loaded["groups"][name]]
            is_group[name] = True
        else:
            objects[name] = list(loaded["tasks"].values())
            is_group[name] = False
        leaf_tasks[name] = tuple(loaded["tasks"])
    return TaskSuite(
        names=tuple(names),
        objects=objects,
        leaf_tasks=leaf_tasks,
        is_group=is_group,
        manager=manager,
        source=source,
    )


def _load_one(manager: Any, name: str, tasks_dir: str | Path | None) -> dict[str, Any]:
    """Load one task, turning lm-eval's and `datasets`' exceptions into one-line DataErrors."""
    if name not in manager.all_tasks:
        where = f"in --tasks-dir {tasks_dir}" if tasks_dir is not None else "among lm-eval's stock tasks"
        raise DataError(f"unknown zero-shot task {name!r} {where}")
    try:
        loaded = dict(manager.load([name]))
    except (ConnectionError, OSError) as error:
        # `datasets` raises ConnectionError offline and FileNotFoundError (an OSError, as is
        # DatasetNotFoundError) for a missing local file or an uncached Hub dataset.
        if tasks_dir is None:
            raise DataError(
                f"zero-shot task {name!r} needs its dataset from the Hugging Face Hub, which cannot be "
                "reached (offline?): pass --tasks-dir DIR with local task YAMLs, or go online"
            ) from error
        raise DataError(
            f"zero-shot task {name!r} in {tasks_dir}: its data could not be loaded: {_first_line(error)}"
        ) from error
    except (KeyError, ValueError, TypeError) as error:  # a malformed YAML or a field missing from the data
        raise DataError(f"zero-shot task {name!r} could not be built: {_first_line(error)}") from error
    for task_name, task in loaded["tasks"].items():
        if task.get_config("output_type") != "multiple_choice":
            raise DataError(
                f"zero-shot task {task_name!r} is not multiple-choice; slimgpt reports acc / acc_norm of "
                "multiple-choice tasks only"
            )
    return loaded


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] | TaskSuite = DEFAULT_TASKS,
    tasks_dir: str | Path | None = None,
    fewshot: Mapping[str, int] = DEFAULT_FEWSHOT,
    batch_size: int = 1,
    limit: int | None = None,
) -> ZeroShotResult:
    """Accuracy of an in-memory Hugging Face causal LM on lm-eval tasks.

    tasks: task names (or a ``TaskSuite`` from ``load_tasks``, to fail early on missing data).
    fewshot: shots per task name; tasks not listed are zero-shot. MMLU is 5-shot by default.
    limit: evaluate only the first ``limit`` documents of each task (for quick checks only: the
        numbers are then not comparable with published ones).
    The model stays on its device; lm-eval runs its forward passes there. As with lm-eval's own CLI,
    ``simple_evaluate`` seeds the global ``random``, numpy and torch generators (to lm-eval's defaults),
    so that numbers match a stock lm-eval run.
    """
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    suite = tasks if isinstance(tasks, TaskSuite) else load_tasks(tasks, tasks_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

    # lm-eval's num_fewshot applies to a whole call, so tasks are run in one call per shot count.
    by_shots: dict[int, list[str]] = {}
    for name in suite.names:
        by_shots.setdefault(int(fewshot.get(name, 0)), []).append(name)

    scores: dict[str, list[TaskScore]] = {}
    for shots, names in sorted(by_shots.items()):
        logger.info("lm-eval: %s (%d-shot)", ", ".join(names), shots)
        task_objects = [obj for name in names for obj in suite.objects[name]]
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_objects,
            num_fewshot=shots,
            limit=limit,
            task_manager=suite.manager,
            log_samples=False,
        )
        if output is None:  # only non-zero ranks of a distributed run get None
            raise SlimGPTError("lm-eval returned no results (not rank 0 of a distributed run?)")
        for name in names:
            scores[name] = _parse_scores(output, name, suite, shots)

    ordered = [score for name in suite.names for score in scores[name]]
    return summarise(ordered, source=suite.source, limit=limit, lm_eval_version=str(lm_eval.__version__))


def _parse_scores(output: Mapping[str, Any], name: str, suite: TaskSuite, shots: int) -> list[TaskScore]:
    """Scores for one requested name: one for a task or a group (MMLU), one per task for a tag."""
    results = output["results"]
    n_samples = output.get("n-samples", {})
    leaves = suite.leaf_tasks[name]
    reported = [name] if suite.is_group[name] else list(leaves)
    scores = []
    for task in reported:
        metrics = results[task]
        if "acc,none" not in metrics:
            raise DataError(f"zero-shot task {task!r} reports no 'acc' metric: add acc to its metric_list")
        members = leaves if suite.is_group[name] else (task,)
        counted = [n_samples[leaf]["effective"] for leaf in members if leaf in n_samples]
        scores.append(
            TaskScore(
                name=task,
                acc=float(metrics["acc,none"]),
                acc_norm=_optional_float(metrics.get("acc_norm,none")),
                acc_stderr=_optional_float(metrics.get("acc_stderr,none")),
                acc_norm_stderr=_optional_float(metrics.get("acc_norm_stderr,none")),
                num_fewshot=shots,
                n_samples=int(sum(counted)) if counted else None,
            )
        )
    return scores


def summarise(
    scores: Sequence[TaskScore], source: str, limit: int | None = None, lm_eval_version: str = ""
) -> ZeroShotResult:
    """Attach the headline averages: over every task run except MMLU (the papers' 7-task average)."""
    averaged = [score for score in scores if score.name not in AVERAGE_EXCLUDES]
    average = sum(score.headline for score in averaged) / len(averaged) if averaged else None
    average_acc = sum(score.acc for score in averaged) / len(averaged) if averaged else None
    return ZeroShotResult(
        tasks=tuple(scores),
        average=average,
        average_acc=average_acc,
        average_tasks=tuple(score.name for score in averaged),
        average_convention=AVERAGE_CONVENTION,
        task_source=source,
        limit=limit,
        lm_eval_version=lm_eval_version,
    )
