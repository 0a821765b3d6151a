"""slimgpt: SlimGPT structured pruning for causal language models.

Importing slimgpt registers the ``slimgpt_<family>`` model types with transformers' Auto classes, so a
pruned directory loads with ``AutoModelForCausalLM.from_pretrained``.

    from slimgpt import PruneConfig, load_model, prune_model, save_pruned
    model, tokenizer = load_model("tiny-mha")
    report = prune_model(model, PruneConfig(ratio=0.2, calib="builtin"), tokenizer=tokenizer)
    save_pruned(model, tokenizer, report, "out")
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# Before torch loads: OpenMP threads that sleep while they wait instead of spinning. On a CPU shared with
# other jobs, spinning threads take the cores the others need; a perplexity pass next to one other 2-thread
# job ran 14x slower with the default (docs/benchmarks.md, "OpenMP wait policy"). Set OMP_WAIT_POLICY
# yourself to choose; it has no effect once torch is imported.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from slimgpt.config import PruneConfig
from slimgpt.models.slim import load_model, load_pruned
from slimgpt.prune import plan, prune_model
from slimgpt.report import LayerReport, PruneReport
from slimgpt.saving import load_report, save_pruned

__all__ = [
    "LayerReport",
    "PruneConfig",
    "PruneReport",
    "__version__",
    "load_model",
    "load_pruned",
    "load_report",
    "plan",
    "prune_model",
    "save_pruned",
]
