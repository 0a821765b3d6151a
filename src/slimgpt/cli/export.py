"""``slimgpt export``: parse arguments, call one exporter, print where the result is."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimgpt.cli import common
from slimgpt.errors import ConfigError
from slimgpt.export import FORMATS, GGUF_OUTTYPES, export_gguf, export_padded, export_remote_code

FORMAT_HELP = """formats (all opt-in; a saved folder itself never contains code):
  remote-code   add configuration_slimgpt.py / modeling_slimgpt.py and an auto_map to config.json, so
                AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) works without slimgpt;
                in place unless --output is given
  llama-padded  zero-pad removed heads and channels back to a stock Llama/Mistral/Qwen2/OPT config
                (--output required): loads in every runtime, exact, but no smaller or faster than dense
  gguf          one GGUF file for llama.cpp (deci architecture: per-layer widths, pruned size and speed;
                --output FILE.gguf required, --outtype f32|f16)
  bits-back     a folder sliced by --method slicegpt / dynamic-slicing as one entropy-coded file that is
                smaller than its safetensors at the same precision: each residual basis's free rotation is
                bits-back coded (--output required; needs pip install -e ".[bitsback]"); `slimgpt eval`
                loads it, and so does slimgpt.export.bitsback.load_bits_back
"""

# config keys of saved formats that only slimgpt loads: the method and the structure no export describes
UNEXPORTABLE = {
    "qk_dims": ("modegpt", "per-layer q/k and v head dims, a RoPE index"),
    "disp_index": ("disp-llm", "per-block gather/scatter indices of the residual stream"),
}


def register(subparsers: common.Subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="make a pruned model usable without slimgpt (remote code, padded stock config, GGUF)",
        description="Export a folder saved by `slimgpt prune` for runtimes without slimgpt.",
        epilog=FORMAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="folder written by `slimgpt prune`")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="export_format")
    common.add_output(parser, required=False,
                      help="output folder (remote-code: default edits DIR in place; llama-padded) or file (gguf)")
    parser.add_argument("--outtype", choices=GGUF_OUTTYPES, default="f16",
                        help="gguf: float type of the weight matrices; norms and biases stay f32 (default %(default)s)")
    parser.add_argument("--angle-bits", type=int, default=None, metavar="B",
                        help="bits-back: quantise each rotation angle to B bits per pi (default: by the weights' "
                             "dtype, bfloat16 12, float16 14, float32 26)")
    common.add_overwrite(parser)


def check_source(args: argparse.Namespace) -> Path:
    """The folder to export, checked (and the --output it needs) before any work."""
    source = Path(args.directory)
    if not source.is_dir():
        raise ConfigError(f"{source} is not a folder: pass the folder written by `slimgpt prune`")
    config_path = source / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    for key, (method, structure) in UNEXPORTABLE.items():
        if config.get(key):
            raise ConfigError(f"{source} was pruned by --method {method} ({structure}), which no export format "
                              "describes: load it with slimgpt (`import slimgpt`, then from_pretrained)")
    if args.export_format == "bits-back":
        return check_bits_back_source(args, source)
    if config.get("slice_dims"):
        report_path = source / "slimgpt_report.json"
        method = json.loads(report_path.read_text()).get("method", "slicegpt") if report_path.exists() else "slicegpt"
        raise ConfigError(f"{source} was sliced by --method {method} (shortcut matrices between layers), which no "
                          "runtime export format describes: load it with slimgpt (`import slimgpt`, then "
                          "from_pretrained); --format bits-back makes a smaller file of it")
    if args.export_format != "remote-code" and args.output is None:
        kind = "file" if args.export_format == "gguf" else "folder"
        raise ConfigError(f"--format {args.export_format} writes a new {kind}: pass --output")
    return source


def check_bits_back_source(args: argparse.Namespace, source: Path) -> Path:
    """bits-back: a sliced folder, an --output, a sane --angle-bits and the codec library, before any work."""
    from slimgpt.export.bitsback_codec import constriction_module

    config_path = source / "config.json"
    if not (config_path.exists() and json.loads(config_path.read_text()).get("slice_dims")):
        raise ConfigError(f"{source} is not a sliced checkpoint (no slice_dims in config.json): --format bits-back "
                          "codes the rotational freedom of models pruned by --method slicegpt or dynamic-slicing")
    if args.output is None:
        raise ConfigError("--format bits-back writes a new folder: pass --output")
    if args.angle_bits is not None and not 2 <= args.angle_bits <= 30:
        raise ConfigError(f"--angle-bits must be in [2, 30], got {args.angle_bits}")
    constriction_module()
    return source


def run(args: argparse.Namespace) -> int:
    source = check_source(args)
    if args.export_format == "remote-code":
        path = export_remote_code(source, args.output, overwrite=args.overwrite)
        print(f"{path}: loads with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    elif args.export_format == "llama-padded":
        path = export_padded(source, args.output, overwrite=args.overwrite)
        print(f"{path}: stock config, zero-padded (exact, no speed-up)")
    elif args.export_format == "bits-back":
        from slimgpt.export.bitsback import export_bits_back

        path, summary = export_bits_back(source, args.output, overwrite=args.overwrite, angle_bits=args.angle_bits)
        print(f"{path}: bits-back, {summary.bitsback_bytes} bytes, {summary.saved_percent:.2f}% below safetensors "
              f"({summary.safetensors_bytes} bytes); summary in {path / 'bits_back.md'}")
    else:
        result = export_gguf(source, args.output, outtype=args.outtype, overwrite=args.overwrite)
        for note in result.notes:
            print(f"note: {note}")
        print(f"{result.path}: GGUF ({args.outtype}, llama.cpp architecture deci)")
    return 0
