"""The reference report: tiny-mha dense against SlimGPT at 20% and 50%, with the paper's figures.

    python benchmarks/report_reference.py                     # docs/results/reference_report.md + PNGs
    python benchmarks/report_reference.py --quick --out /tmp/report

Writes ``reference_report.md`` into ``--out`` and its figures into ``--out/reference_report/``:

- ``kept_ratio_<n>.png``: heads and FFN channels kept per layer (paper Fig. 4), from each pruned model;
- ``layer_error.png``: per-layer output error against the dense model (paper Fig. 2): dense and pruned
  models run on the same held-out windows, every decoder layer's output is hooked, and the relative
  error ||h_pruned - h_dense|| / ||h_dense|| is taken over all tokens of all windows, per layer;
- ``ppl_vs_ratio_builtin_<n>.png``: held-out perplexity against the realised pruning ratio.
Numbers come from ``slimgpt.evaluation`` (``evaluate_model``, ``compare``, ``report_plots``); each model's
``EvalReport`` and ``PruneReport`` are saved as JSON beside the figures.

Defaults: calibration 128 windows of 512 tokens from the built-in corpus's training split (seed 0);
perplexity on every window of the held-out split (128- and 512-token windows); the first 200 items of
each local code task (``benchmarks/tasks.py``); layer errors on 32 held-out 512-token windows. About
5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package

import tasks as code_tasks
from paper_tables import spread

from slimgpt.config import PruneConfig
from slimgpt.data import calibration_windows, eval_windows
from slimgpt.evaluation import (
    EvalReport,
    compare,
    evaluate_model,
    load_tasks,
    plot_layer_error,
    report_plots,
)
from slimgpt.evaluation.report import markdown_table, write_atomic
from slimgpt.models.families import get_adapter
from slimgpt.models.slim import load_model
from slimgpt.prune import prune_model
from slimgpt.report import PruneReport

SEED = 0


@torch.no_grad()
def layer_errors(dense: torch.nn.Module, pruned: torch.nn.Module, windows: torch.Tensor,
                 batch_size: int = 4) -> list[float]:
    """||h_pruned - h_dense|| / ||h_dense|| of every decoder layer's output, over all tokens of ``windows``.

    Both models see the same input ids; a forward hook on each decoder layer keeps its output (the
    residual stream after the layer). Squared norms are summed over batches, then the ratio of their
    square roots is taken per layer, so long and short windows weigh by their tokens.
    """
    models = {"dense": dense, "pruned": pruned}
    outputs: dict[str, dict[int, torch.Tensor]] = {"dense": {}, "pruned": {}}
    handles = []
    for label, model in models.items():
        for index, layer in enumerate(get_adapter(model.config).decoder_layers(model)):
            def hook(_module: Any, _args: Any, output: Any, label: str = label, index: int = index) -> None:
                hidden = output[0] if isinstance(output, tuple) else output
                outputs[label][index] = hidden.detach().float()
            handles.append(layer.register_forward_hook(hook))
    n_layers = len(get_adapter(dense.config).decoder_layers(dense))
    difference = torch.zeros(n_layers, dtype=torch.float64)
    reference = torch.zeros(n_layers, dtype=torch.float64)
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start:start + batch_size]
            for model in models.values():
                model(input_ids=batch, use_cache=False)
            for index in range(n_layers):
                h_dense, h_pruned = outputs["dense"][index], outputs["pruned"][index]
                difference[index] += float((h_pruned - h_dense).double().pow(2).sum())
                reference[index] += float(h_dense.double().pow(2).sum())
    finally:
        for handle in handles:
            handle.remove()
    return (difference.sqrt() / reference.sqrt()).tolist()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-mha")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128; quick 16)")
    parser.add_argument("--seqlen", type=int, default=None, help="calibration tokens per window (default 512)")
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--quick", action="store_true", help="few windows and items: checks the plumbing")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("lm_eval", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    nsamples = args.nsamples or (16 if args.quick else 128)
    max_windows = 8 if args.quick else None
    task_limit = 16 if args.quick else 200
    error_windows = 4 if args.quick else 32
    figures = args.out / "reference_report"
    start = time.perf_counter()

    dense, tokenizer = load_model(args.model, dtype="float32")
    context = int(getattr(dense.config, "max_position_embeddings", 512))
    seqlen = args.seqlen or min(128 if args.quick else 512, context)
    seqlens = tuple(sorted({min(128, context), context}))
    calibration = calibration_windows(tokenizer, "builtin", nsamples, seqlen, seed=SEED)
    probe = spread(eval_windows(tokenizer, "builtin", context), error_windows)
    name = Path(args.model).name

    with tempfile.TemporaryDirectory(prefix="slimgpt_report_") as tmp:
        suite = load_tasks(list(code_tasks.TASK_NAMES), code_tasks.write_task_yamls(Path(tmp)))

        def measure(model: Any, label: str, ratio: float, method: str | None) -> EvalReport:
            return evaluate_model(model, tokenizer, label, ppl_datasets=["builtin"], seqlens=seqlens, tasks=suite,
                                  limit=task_limit, max_windows=max_windows, batch_size=8, method=method,
                                  pruning_ratio=ratio)

        reports = [measure(dense, f"{name} dense", 0.0, None)]
        prune_reports: list[PruneReport] = []
        errors: dict[str, list[float]] = {}
        for ratio in ratios:
            pruned = copy.deepcopy(dense)
            config = PruneConfig(ratio=ratio, calib="builtin", nsamples=nsamples, seqlen=seqlen, seed=SEED,
                                 batch_size=8)
            prune_reports.append(prune_model(pruned, config, calibration, model_name=name, progress=False))
            label = f"{name} SlimGPT {100 * ratio:.0f}%"
            reports.append(measure(pruned, label, ratio, "slimgpt"))
            errors[f"SlimGPT {100 * ratio:.0f}%"] = layer_errors(dense, pruned, probe)

    written = report_plots(reports, figures)
    written.append(plot_layer_error(errors, figures / "layer_error.png",
                                    title=f"{name}: per-layer output error against the dense model",
                                    ylabel="||h_pruned - h_dense|| / ||h_dense||"))
    for index, report in enumerate(reports):
        report.save(figures / f"eval_{index + 1}.json")
    for report in prune_reports:
        write_atomic(figures / f"prune_{100 * report.target_ratio:.0f}.json", report.to_json())
    seconds = time.perf_counter() - start
    markdown = render(args, name, reports, prune_reports, errors, written, nsamples, seqlen, probe, task_limit,
                      max_windows, seconds)
    target = write_atomic(args.out / "reference_report.md", markdown)
    print(f"wrote {target} and {len(written)} figures in {figures} ({seconds:.0f} s)")
    return 0


def render(args: argparse.Namespace, name: str, reports: Sequence[EvalReport], prune_reports: Sequence[PruneReport],
           errors: dict[str, list[float]], figures: Sequence[Path], nsamples: int, seqlen: int,
           probe: torch.Tensor, task_limit: int, max_windows: int | None, seconds: float) -> str:
    chance = code_tasks.task_chance(limit=task_limit)
    relative = [path.relative_to(args.out) if path.is_relative_to(args.out) else path for path in figures]
    n_layers = len(next(iter(errors.values()))) if errors else 0
    error_rows = [[str(layer), *(f"{values[layer]:.4f}" for values in errors.values())] for layer in range(n_layers)]
    local_rows = [
        [f"{100 * report.target_ratio:.0f}%", str(row.layer), f"{row.ratio:.3f}",
         f"{row.heads_kept}/{row.heads_total}", f"{row.ffn_kept}/{row.ffn_total}",
         _err(row.attn_error), _err(row.attn_error_uncompensated), _err(row.ffn_error),
         _err(row.ffn_error_uncompensated)]
        for report in prune_reports for row in report.layers
    ]
    parts = [
        f"# Reference report: {name}, dense and SlimGPT",
        "",
        f"Generated by `python benchmarks/report_reference.py {' '.join(sys.argv[1:])}` in {seconds:.0f} s.",
        "",
        f"- calibration: {nsamples} windows of {seqlen} tokens, built-in corpus training split, seed {SEED}; "
        "SlimGPT defaults otherwise (log-increase schedule, GCD head scores, DGS, OBS compensation)",
        f"- perplexity: held-out split, {'first ' + str(max_windows) if max_windows else 'all'} non-overlapping "
        "windows per length, each from an empty context",
        f"- zero-shot: local code tasks from held-out files, first {task_limit} items each (chance: "
        + ", ".join(f"{task} {100 * value:.1f}%" for task, value in chance.items()) + ")",
        f"- layer error: {probe.shape[0]} held-out windows of {probe.shape[1]} tokens",
        "",
        "## Dense against pruned",
        "",
        compare(reports),
        "",
        "## Per-layer output error against the dense model (paper Fig. 2)",
        "",
        "Relative error of each decoder layer's output, ||h_pruned - h_dense|| / ||h_dense||: the error a "
        "layer inherits from the layers before it plus its own. The paper's argument for the increasing "
        "ratio schedule is that errors made early are carried and amplified to the end.",
        "",
        markdown_table(["layer", *errors], error_rows),
        "",
        "## Per-layer pruning (paper Fig. 4) and local reconstruction error",
        "",
        "`err` is the relative output error of o_proj / down_proj on the calibration inputs with OBS "
        "compensation, `drop` the same selection with the columns just dropped.",
        "",
        markdown_table(["target", "layer", "ratio", "heads", "ffn", "o_proj err", "o_proj drop", "down err",
                        "down drop"], local_rows),
        "",
        "## Figures",
        "",
        *[f"![{path.stem}]({path})" for path in relative],
        "",
    ]
    return "\n".join(parts)


def _err(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
