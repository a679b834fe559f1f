"""The ``hyperlit`` console script: inspect and convert hypernetwork files (and other subcommands)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from hyperlit import files
from hyperlit.cli_vae import add_eval_vae_parser, is_vae_file, run_inspect_vae
from hyperlit.files import HypernetworkFile, clients, comfyui
from hyperlit.lora.command import add_to_lora_parser

DESCRIPTION = (
    "Tools for hypernetwork and VAE files: inspect and convert them, generate images with them, evaluate VAEs, "
    "make webdataset shards."
)
EPILOG = (
    "Training is not a subcommand: in the repository, python train.py trains a hypernetwork and python train.py "
    "--config-name vae fine-tunes a VAE decoder (python train.py --help lists their options). "
    "hyperlit COMMAND --help describes each command."
)


def describe(content: HypernetworkFile, path: str | Path | None = None) -> dict:
    """Everything `hyperlit inspect` reports, as plain data."""
    config = content.config
    parameters = sum(t.numel() for pair in content.layers.values() for state in pair for t in state.values())
    comfy = comfyui.verdict(content)
    comfy_reason = comfy.reason + clients.comfyui_advice(content.name, comfy.dropout_layers > 0) if comfy.reason else ""
    return {
        "name": content.name,
        "layout": content.layout,
        "widths": list(content.layers),
        "layer_structure": config.layer_structure,
        "activation": config.activation,
        "activate_output": config.activate_output,
        "layer_norm": config.layer_norm,
        "dropout_structure": config.dropout_probabilities(),
        "weight_init": config.weight_init,
        "parameters": parameters,
        "step": content.step,
        "sd_checkpoint": content.sd_checkpoint,
        "sd_checkpoint_name": content.sd_checkpoint_name,
        "optional_info": content.optional_info,
        "comfyui_same_function": comfy.same_function,
        "comfyui_note": comfy_reason or None,
        "clients": clients.readers(path) if path is not None else None,
    }


def _read_checked(path: str | Path) -> HypernetworkFile:
    """Read a file and make sure its weights fit its metadata, so a broken file is reported, not passed on."""
    content = files.read_file(path)
    files.from_file_content(content, source=str(path))
    return content


def _inspect(args: argparse.Namespace) -> int:
    if is_vae_file(args.file):  # dispatch by content: VAE keys or a diffusers folder
        return run_inspect_vae(args)
    info = describe(_read_checked(args.file), args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(key) for key in info)
    for key, value in info.items():
        if value is None:
            continue
        if key == "parameters":
            value = f"{value:,}"
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.input), Path(args.output)
    if src.resolve() == dst.resolve():
        raise ValueError(f"convert: input and output are the same file ({src}); choose another output name")
    content = _read_checked(src)
    if args.strip_dropout:
        content = files.strip_dropout(content)
    files.write_file(dst, replace(content))  # named after the output file, without a client tag
    print(f"wrote {dst} ({files.read_file(dst).layout})")
    return 0


def native_or_512(components: object | None) -> int:
    """The model's native size for precomputed latents; 512 (SD1's) when no model encodes them."""
    if components is None:
        return 512
    return components.family.native_resolution(components.prediction_type)


def _make_shards(args: argparse.Namespace) -> int:
    import logging
    import os

    from hyperlit.data.shards import make_shards

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    encoder = None
    if args.model:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from hyperlit.models import load_components

        encoder = load_components(family=args.model, path=args.model_path, tokenizer_path=args.tokenizer_path)
    paths = make_shards(
        args.src,
        args.dst,
        encoder=encoder,
        resolution=args.resolution or native_or_512(encoder),
        resize=args.resize,
        template=args.template,
        name=args.name,
        samples_per_shard=args.samples_per_shard,
        prefix=args.prefix,
    )
    print(f"wrote {len(paths)} shard(s): {paths[0]} ... {paths[-1]}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hyperlit.generate import GenerateOptions, generate

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    options = vars(args).copy()
    for key in ("command", "run"):
        options.pop(key)
    paths = generate(GenerateOptions(**options))
    print(f"wrote {len(paths)} image(s) to {args.out}: {', '.join(p.name for p in paths)}")
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate", help="text to image; <hypernet:NAME:MULT> / <lora:NAME:MULT> tags apply hypernetworks / LoRAs"
    )
    gen.add_argument(
        "prompt", help="the prompt, with A1111 tags <hypernet:NAME[:MULTIPLIER]> and <lora:NAME[:MULTIPLIER]>"
    )
    gen.add_argument("--hypernetwork-dir", default=None, help="folder with NAME.pt / NAME.safetensors files")
    gen.add_argument(
        "--lora-dir", default=None, help="folder with NAME.safetensors LoRA files (kohya or diffusers layout)"
    )
    gen.add_argument("--out", required=True, help="output folder for <seed>-<index>.png")
    gen.add_argument("--model", default="tiny", help="model family: tiny (embedded, the default), sd15, sd21, sdxl")
    gen.add_argument("--model-path", default=None, help="checkpoint file or diffusers folder for sd15/sd21/sdxl")
    gen.add_argument(
        "--tokenizer-path",
        default=None,
        help="tokenizer folder (or diffusers folder) for a single file (SDXL: a folder with tokenizer/ + tokenizer_2/)",
    )
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    gen.add_argument("--n", type=int, default=4, help="number of images")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale")
    gen.add_argument("--sampler", default="euler_a", help="euler_a | euler | dpmpp_2m | ddim")
    gen.add_argument("--width", type=int, default=None, help="default: the model's native size")
    gen.add_argument("--height", type=int, default=None, help="default: the model's native size")
    gen.set_defaults(run=_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hyperlit", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    inspect = sub.add_parser("inspect", help="show what a hypernetwork or VAE file (or diffusers VAE folder) holds")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(run=_inspect)

    convert = sub.add_parser("convert", help="convert between A1111 .pt and hyperlit .safetensors")
    convert.add_argument("input")
    convert.add_argument("output", help="the extension (.pt or .safetensors) chooses the format")
    convert.add_argument(
        "--strip-dropout",
        action="store_true",
        help="write an inference copy without Dropout slots (renumbered keys, same eval-mode outputs)",
    )
    convert.set_defaults(run=_convert)

    shards = sub.add_parser("make-shards", help="turn an A1111 image folder into webdataset shards")
    shards.add_argument("src", help="A1111 folder: images with optional same-stem .txt captions")
    shards.add_argument("dst", help="output directory for <prefix>-000000.tar ...")
    shards.add_argument("--samples-per-shard", type=int, default=1000)
    shards.add_argument("--prefix", default="shard")
    shards.add_argument(
        "--model",
        default=None,
        help="model family (tiny, sd15, sd21, sdxl) to precompute latents, context (and SDXL's pooled) with",
    )
    shards.add_argument("--model-path", default=None, help="checkpoint or diffusers folder for sd15/sd21/sdxl")
    shards.add_argument(
        "--tokenizer-path", default=None, help="tokenizer folder for a single file (SDXL: tokenizer/ + tokenizer_2/)"
    )
    shards.add_argument(
        "--resolution", type=int, default=None, help="default: the --model's native size (512 without --model)"
    )
    shards.add_argument("--resize", default="crop", choices=("crop", "stretch"))
    shards.add_argument("--template", default="style_filewords")
    shards.add_argument("--name", default="hypernetwork", help="the [name] in template lines")
    shards.set_defaults(run=_make_shards)
    _add_generate(sub)
    add_eval_vae_parser(sub)
    add_to_lora_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"hyperlit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
