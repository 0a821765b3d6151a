"""Standalone files copied next to a pruned model by ``slimgpt export --format remote-code``.

``configuration_slimgpt.py`` and ``modeling_slimgpt.py`` import only torch and transformers, never
slimgpt: with them and an ``auto_map`` in config.json, ``AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)`` builds the per-layer-width model with plain transformers. They live here as
real modules so that linting, type checking and tests cover the code that users will run.
"""
