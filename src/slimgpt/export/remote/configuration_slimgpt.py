"""Configs of slimgpt-pruned models, for loading them without slimgpt (``trust_remote_code=True``).

Written by ``slimgpt export --format remote-code``; imports only transformers. A pruned model is its
family's stock config plus per-layer widths, read from these optional config.json keys (one entry
per decoder layer; absent means the stock width):

- ``layer_num_attention_heads``: query heads of each layer
- ``layer_num_key_value_heads``: key/value heads of each layer
- ``layer_intermediate_sizes``: FFN channels of each layer
- ``layer_output_bias``: every layer's attention output and FFN output projections have a bias

The classes add no fields: the stock config keeps unknown keys as attributes, so one file works with
the transformers versions whose stock classes it subclasses.
"""

from __future__ import annotations

from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config


class SlimLlamaConfig(LlamaConfig):
    model_type = "slimgpt_llama"


class SlimMistralConfig(MistralConfig):
    model_type = "slimgpt_mistral"


class SlimQwen2Config(Qwen2Config):
    model_type = "slimgpt_qwen2"


class SlimOPTConfig(OPTConfig):
    model_type = "slimgpt_opt"
