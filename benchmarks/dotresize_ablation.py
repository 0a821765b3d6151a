"""DOTResize's transport merge against the least-squares restoration and plain dropping, at equal selection.

Two measurements per model and ratio, all three restorers with the same targets rule (the channels of
largest activation norm) and the same uniform FFN width (slimgpt.methods.dotresize):

1. ``layers``: on the dense model's down_proj inputs (one forward pass over the calibration windows), per
   layer the identical target set restored three ways, and the relative layer-wise output error
   ||(W - W') X||^2 / ||W X||^2 of each (slimgpt.solver.obs.reconstruction_error). This is selection held
   exactly equal; with ``--epsilons`` the transport merge is run at several Sinkhorn eps.
2. ``models``: the whole model pruned layer by layer by ``prune_model`` (each layer sees its pruned
   predecessors, so later layers' targets can differ between restorers), then held-out perplexity on
   512-token windows of the built-in eval split.

Restorers: ``dotresize`` (W'[:, M] = W n P*, slimgpt.solver.transport.merge_columns), ``least-squares``
(W'[:, M] = W Hd[:, M] Hd[M, M]^-1 with SlimGPT's damped Hd, as FASP: slimgpt.solver.restore), ``drop``
(the removed columns zeroed).

    PYTHONPATH=src python benchmarks/dotresize_ablation.py --models tiny-mha,tiny-gqa --ratios 0.2,0.5 \\
        --out docs/results/dotresize.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from slimgpt import PruneConfig, load_model, prune_model
from slimgpt.data import calibration_windows, eval_windows
from slimgpt.evaluation.ppl import perplexity
from slimgpt.methods import PruneJob
from slimgpt.methods.dotresize import DOTResizeMethod
from slimgpt.models.families import get_adapter
from slimgpt.solver.hessian import InputStatistics, prepare_hessian
from slimgpt.solver.obs import reconstruction_error
from slimgpt.solver.prunenet import uniform_ffn_plan
from slimgpt.solver.restore import restore_least_squares
from slimgpt.solver.transport import merge_columns

RESTORERS = ("dotresize", "least-squares", "drop")


class LeastSquaresRestore(DOTResizeMethod):
    """DOTResize's selection and width, the least-squares restoration (FASP's, SlimGPT's damping)."""

    def restore(self, job: PruneJob, keep: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        assert job.stats is not None
        H = prepare_hessian(job.stats.hessian, job.weight.clone(), self.config.percdamp)
        return restore_least_squares(job.weight, H, keep, damp=0.0), {}


class DropRestore(DOTResizeMethod):
    """DOTResize's selection and width, the removed columns zeroed."""

    def restore(self, job: PruneJob, keep: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        weight = job.weight.clone()
        weight[:, ~keep] = 0
        return weight, {}


METHOD_CLASSES = {"dotresize": DOTResizeMethod, "least-squares": LeastSquaresRestore, "drop": DropRestore}


def dense_statistics(model: Any, calibration: torch.Tensor) -> tuple[list[torch.Tensor], list[InputStatistics]]:
    """Every layer's down_proj weight and the statistics of its inputs in the dense model."""
    adapter = get_adapter(model.config)
    layers = adapter.decoder_layers(model)
    stats = [InputStatistics(adapter.mlp_output(layer).in_features, "cpu") for layer in layers]
    hooks = [adapter.mlp_output(layer).register_forward_pre_hook(lambda _m, args, s=s: s.add(args[0]))
             for layer, s in zip(layers, stats, strict=True)]
    with torch.no_grad():
        for batch in calibration.split(8):
            model(batch)
    for hook in hooks:
        hook.remove()
    return [adapter.mlp_output(layer).weight.detach().float() for layer in layers], stats


def layer_errors(model: Any, calibration: torch.Tensor, ratio: float, epsilons: list[float],
                 percdamp: float) -> list[dict[str, Any]]:
    """Per layer: the relative output error of each restorer for the same activation-norm targets."""
    from slimgpt.models.geometry import model_geometry

    adapter = get_adapter(model.config)
    width_removed = uniform_ffn_plan(model_geometry(model, adapter, "kv-group"), ratio).layers[0].channels_removed
    rows = []
    for index, (W, stats) in enumerate(zip(*dense_statistics(model, calibration), strict=True)):
        H = stats.hessian
        n = W.shape[1]
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.argsort(H.diagonal(), descending=True, stable=True)[: n - width_removed]] = True
        dropped = W.clone()
        dropped[:, ~keep] = 0
        ls = restore_least_squares(W, prepare_hessian(H, W.clone(), percdamp), keep, damp=0.0)
        row: dict[str, Any] = {"layer": index, "kept": int(keep.sum()), "of": n,
                               "drop": reconstruction_error(W, dropped, H),
                               "least-squares": reconstruction_error(W, ls, H)}
        for eps in epsilons:
            start = time.perf_counter()
            merged, result = merge_columns(W, H, keep, eps, tol=1e-6)
            row[f"dotresize@{eps}"] = reconstruction_error(W, merged, H)
            row[f"sinkhorn@{eps}"] = {"iterations": result.iterations, "marginal_error": result.marginal_error,
                                      "seconds": round(time.perf_counter() - start, 2)}
        rows.append(row)
        print(json.dumps({"ratio": ratio, **row}), flush=True)
    return rows


def prune_and_measure(dense: Any, tokenizer: Any, calibration: torch.Tensor, held_out: torch.Tensor, ratio: float,
                      restorer: str, args: argparse.Namespace) -> dict[str, Any]:
    model = copy.deepcopy(dense)
    config = PruneConfig(method="dotresize", ratio=ratio, calib="builtin", nsamples=args.nsamples,
                         seqlen=args.seqlen, batch_size=8)
    start = time.perf_counter()
    report = prune_model(model, config, calibration, tokenizer=tokenizer, progress=False,
                         method=METHOD_CLASSES[restorer](config))
    seconds = time.perf_counter() - start
    errors = [row.ffn_error for row in report.layers if row.ffn_error is not None]
    return {"params": sum(p.numel() for p in model.parameters()), "realised_ratio": report.realised_ratio,
            "ffn_width": f"{report.layers[0].ffn_kept}/{report.layers[0].ffn_total}",
            "mean_layer_error": sum(errors) / max(len(errors), 1), "prune_seconds": round(seconds, 1),
            "ppl512": perplexity(model, held_out, batch_size=4, progress=False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-mha,tiny-gqa")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--restorers", default=",".join(RESTORERS))
    parser.add_argument("--epsilons", default="0.01,0.05,0.2", help="Sinkhorn eps (x mean cost) for the layer table")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40, help="held-out 512-token windows")
    parser.add_argument("--skip-models", action="store_true", help="only the layer-wise table")
    parser.add_argument("--skip-layers", action="store_true", help="only the whole-model runs")
    parser.add_argument("--out", type=Path, default=Path("docs/results/dotresize.json"))
    args = parser.parse_args()
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))

    epsilons = [float(e) for e in args.epsilons.split(",")]
    for model_name in args.models.split(","):
        dense, tokenizer = load_model(model_name, dtype=torch.float32)
        calibration = calibration_windows(tokenizer, "builtin", args.nsamples, args.seqlen, seed=0)
        for ratio in (float(r) for r in args.ratios.split(",")):
            key = f"{model_name}|layers|{ratio}"
            if key not in results and not args.skip_layers:
                results[key] = layer_errors(dense, calibration, ratio, epsilons, PruneConfig().percdamp)
                save()
        if args.skip_models:
            continue
        held_out = eval_windows(tokenizer, "builtin", 512, args.max_windows)
        if f"{model_name}|dense" not in results:
            results[f"{model_name}|dense"] = {"params": sum(p.numel() for p in dense.parameters()),
                                              "ppl512": perplexity(dense, held_out, batch_size=4, progress=False)}
            save()
        for ratio in (float(r) for r in args.ratios.split(",")):
            for restorer in args.restorers.split(","):
                key = f"{model_name}|{restorer}|{ratio}"
                if key not in results:
                    results[key] = prune_and_measure(dense, tokenizer, calibration, held_out, ratio, restorer, args)
                    print(json.dumps({"key": key, **results[key]}), flush=True)
                    save()


if __name__ == "__main__":
    main()
