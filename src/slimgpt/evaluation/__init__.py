"""Evaluation of dense and pruned models: perplexity, zero-shot accuracy, speed, reports and plots.

    from slimgpt.evaluation import evaluate_model
    report = evaluate_model(model, tokenizer, "tiny-mha", ppl_datasets=["builtin"], speed=True)
    print(report.to_markdown())

Importing this package loads neither lm-eval nor matplotlib; they are imported when used.
"""

from slimgpt.evaluation.evaluate import EvalOptions, evaluate_model, layer_widths, realised_ratios, report_plots
from slimgpt.evaluation.harness import (
    COMMONSENSE_TASKS,
    DEFAULT_TASKS,
    TaskScore,
    TaskSuite,
    ZeroShotResult,
    load_tasks,
    zero_shot,
)
from slimgpt.evaluation.plots import plot_kept_ratio, plot_layer_error, plot_ppl_vs_ratio
from slimgpt.evaluation.ppl import PerplexityResult, evaluate_perplexity, perplexity, window_protocol
from slimgpt.evaluation.report import EvalReport, LayerWidths, compare, library_versions
from slimgpt.evaluation.speed import SpeedResult, count_parameters, measure_speed, weight_bytes

__all__ = [
    "COMMONSENSE_TASKS",
    "DEFAULT_TASKS",
    "EvalOptions",
    "EvalReport",
    "LayerWidths",
    "PerplexityResult",
    "SpeedResult",
    "TaskScore",
    "TaskSuite",
    "ZeroShotResult",
    "compare",
    "count_parameters",
    "evaluate_model",
    "evaluate_perplexity",
    "layer_widths",
    "library_versions",
    "load_tasks",
    "measure_speed",
    "perplexity",
    "plot_kept_ratio",
    "plot_layer_error",
    "plot_ppl_vs_ratio",
    "realised_ratios",
    "report_plots",
    "weight_bytes",
    "window_protocol",
    "zero_shot",
]
