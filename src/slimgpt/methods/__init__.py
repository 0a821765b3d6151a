"""Layer 4: the pruning methods, one file each, registered by name (slimgpt.methods.base.METHODS)."""

from __future__ import annotations

from slimgpt.config import PruneConfig
from slimgpt.methods import (
    disp_llm,
    dotresize,
    dynamic_slicing,
    fasp,
    flap,
    llm_pruner,
    magnitude,
    modegpt,
    prunenet,
    slicegpt,
    slimgpt,
    wanda_sp,
)
from slimgpt.methods.base import METHODS, Decision, LayerMethod, Method, ModelMethod, ModelRun, PruneJob, register

__all__ = ["METHODS", "Decision", "LayerMethod", "Method", "ModelMethod", "ModelRun", "PruneJob", "get_method",
           "register"]
_MODULES = (disp_llm, dotresize, dynamic_slicing, fasp, flap, llm_pruner, magnitude, modegpt, prunenet, slicegpt,
            slimgpt, wanda_sp)  # registered on import


def get_method(config: PruneConfig) -> Method:
    """The registered method ``config.method``, configured by ``config`` and the options only it reads
    (``spread``: dynamic slicing's width spread; ``eps``: MoDeGPT's budget smoothing)."""
    options: dict[str, float] = {}
    if config.spread is not None:
        options["spread"] = config.spread
    if config.eps is not None:
        options["smoothing"] = config.eps
    return METHODS[config.method](config, **options)
