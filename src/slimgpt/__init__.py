"""slimgpt: SlimGPT structured pruning for causal language models.

Importing slimgpt registers the ``slimgpt_<family>`` model types with transformers' Auto classes, so a
pruned directory loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from slimgpt.modeling import load_model, load_pruned

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "load_pruned"]
