"""Layer 4: the pruning methods, one file each, registered by name (slimgpt.methods.base.METHODS)."""

from __future__ import annotations

from slimgpt.config import PruneConfig
from slimgpt.methods import dynamic_slicing, flap, llm_pruner, magnitude, slicegpt, slimgpt, wanda_sp
from slimgpt.methods.base import METHODS, Decision, LayerMethod, Method, ModelMethod, ModelRun, PruneJob, register

__all__ = ["METHODS", "Decision", "LayerMethod", "Method", "ModelMethod", "ModelRun", "PruneJob", "get_method",
           "register"]
# imported for their registration
_MODULES = (dynamic_slicing, flap, llm_pruner, magnitude, slicegpt, slimgpt, wanda_sp)


def get_method(config: PruneConfig) -> Method:
    """The registered method ``config.method``, configured by ``config``."""
    return METHODS[config.method](config)
