"""Layer 0: infrastructure every other module may use (stdlib, torch and safetensors only)."""
