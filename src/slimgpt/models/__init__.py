"""Layer 2: the only code that knows Hugging Face module names and family differences.

adapters: surgery and forward halves, asked by role; families: one row per ``model_type``;
geometry: parameter counts and attention units; slim: per-layer-width model classes and loading;
sliced: SliceGPT's sliced residual-stream structure.
"""
