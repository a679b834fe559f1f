"""The VAE subcommands of the ``hyperlit`` console script: ``eval-vae`` and ``inspect`` of VAE files."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from hyperlit.vae.colour import ColourLimits
from hyperlit.vae.evaluate import (
    LPIPS_TOLERANCE,
    PSNR_TOLERANCE,
    evaluate,
    format_table,
    fp16_fidelity,
    load_eval_images,
    save_png,
    with_reference,
    worse_than,
    worst_panel,
)
from hyperlit.vae.taesd_eval import tiny_reconstruction
from hyperlit.vae.taesd_read import TAESDSource, find_taesd

MODEL_NAMES = ("tiny", "tiny-random")  # --model's choices: the embedded tiny VAEs


def add_eval_vae_parser(sub: argparse._SubParsersAction) -> None:
    limits = ColourLimits()
    p = sub.add_parser(
        "eval-vae",
        help="PSNR / SSIM / LPIPS / rFID and colour checks of several VAEs on the same images",
        description=(
            "Scores every model on the same images and prints one table. Colour warnings: saturation ratio "
            f"outside [{limits.min_saturation_ratio}, {limits.max_saturation_ratio}], contrast ratio below "
            f"{limits.min_contrast_ratio}, or a channel mean shifted by more than {limits.max_mean_shift}."
        ),
    )
    p.add_argument("--data", required=True, help="folder of images (recursive)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        choices=list(MODEL_NAMES),
        help="tiny: the embedded tiny base's VAE (what model=tiny trains from); tiny-random: the random tiny VAE "
        "(model.tiny_random=true, seed 0)",
    )
    p.add_argument(
        "--model-path",
        action="append",
        default=[],
        help="diffusers VAE folder, single-file VAE (.safetensors/.pt/.ckpt) or full SD checkpoint; or a tiny "
        "autoencoder: a diffusers AutoencoderTiny folder, or a madebyollin-layout <name>_decoder.safetensors/.pth "
        "(with <name>_encoder beside it; a decoder alone decodes the first full VAE's latents); repeatable",
    )
    p.add_argument(
        "--reference-model",
        default=None,
        metavar="REF",
        help="score every model against REF's own reconstruction of each image (posterior mode, 8 bits) instead of "
        "the image: PSNR, SSIM, LPIPS, rFID and colour; REF is a --model name or a full VAE's path (e.g. the VAE a "
        "tiny decoder was distilled from, whose latents then feed a TAESD decoder given alone)",
    )
    p.add_argument("--resolution", type=int, default=256, help="short side resize + centre crop (cards: 256)")
    p.add_argument(
        "--norm-num-groups",
        type=int,
        default=None,
        help="GroupNorm groups of single-file VAEs (default: the file's, which hyperlit's exports carry; else 32)",
    )
    p.add_argument("--lpips-weights", default=None, help="torchvision VGG16 state dict (.pth/.safetensors)")
    p.add_argument("--lpips-lin-weights", default=None, help="lpips vgg.pth heads (default: torchmetrics' copy)")
    p.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth for rFID")
    p.add_argument("--limit", type=int, default=None, help="use at most N images (sorted by path)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--fp16",
        action="store_true",
        help="also decode in fp16: PSNR of each model's fp16 output against the FIRST model's fp32 output of the same "
        "latents (nan: inf/NaN in fp16); give the original VAE first to see what an fp16 fix kept",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--panel", default=None, help="PNG of each model's worst reconstructions, side by side")
    p.add_argument("--panel-count", type=int, default=4, help="worst images per model in the panel")
    p.add_argument(
        "--fail-if-worse",
        default=None,
        metavar="REF",
        help="exit 1 when a model is worse than REF on PSNR or LPIPS; REF is evaluated too (a --model name or a "
        "path; no need to list it again)",
    )
    p.add_argument("--psnr-tolerance", type=float, default=PSNR_TOLERANCE, help="dB below REF still accepted")
    p.add_argument("--lpips-tolerance", type=float, default=LPIPS_TOLERANCE, help="LPIPS above REF still accepted")
    p.set_defaults(run=run_eval_vae)


def _check_args(args: argparse.Namespace) -> list[str]:
    """Everything checkable before a weight loads; returns the model labels."""
    ref = args.fail_if_worse
    if ref is not None and ref not in [*args.model, *args.model_path]:
        # the CI gate `--model-path NEW --fail-if-worse OLD`: OLD is scored as well
        if ref in MODEL_NAMES:
            args.model.append(ref)
        elif os.path.exists(ref):
            args.model_path.append(ref)
        else:
            raise FileNotFoundError(f"--fail-if-worse={ref!r}: no such file or folder, and not a --model name")
    reference = args.reference_model
    if reference is not None and reference not in MODEL_NAMES and not os.path.exists(reference):
        raise FileNotFoundError(
            f"--reference-model={reference!r}: no such file or folder, and not a --model name "
            f"({', '.join(MODEL_NAMES)})"
        )
    labels = list(args.model) + list(args.model_path)
    if not labels:
        raise ValueError("eval-vae: no model given; use --model tiny and/or --model-path P (repeatable)")
    if len(set(labels)) != len(labels):
        raise ValueError(f"eval-vae: a model is given twice ({labels}); each must be different")
    for key, value in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--panel-count", args.panel_count)):
        if value is not None and value < 1:
            raise ValueError(f"{key}: {value} is not allowed; at least 1")
    for path in args.model_path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--model-path={path!r}: no such file or folder")
    for key in ("lpips_weights", "lpips_lin_weights", "inception_weights"):
        value = getattr(args, key)
        if value is not None and not Path(value).is_file():
            raise FileNotFoundError(f"--{key.replace('_', '-')}={value!r}: file not found")
    if args.fail_if_worse is not None and args.fail_if_worse not in labels:
        raise ValueError(f"--fail-if-worse: {args.fail_if_worse!r} is not one of the models ({', '.join(labels)})")
    return labels


def _tiny_sources(args: argparse.Namespace) -> dict[str, TAESDSource]:
    """The ``--model-path`` entries that are tiny autoencoders, told from config.json or file headers (no model is
    built); what they need is checked here, before any weight loads."""
    tiny = {path: source for path in args.model_path if (source := find_taesd(path, "--model-path")) is not None}
    full = [*args.model, *(p for p in args.model_path if p not in tiny)]
    reference = args.reference_model
    if reference is not None and reference not in MODEL_NAMES:
        if find_taesd(reference, "--reference-model") is not None:
            raise ValueError(
                f"--reference-model={reference!r}: a tiny autoencoder; the reference is a full VAE's reconstruction "
                f"(a --model name: {', '.join(MODEL_NAMES)}, or a full VAE's folder or file)"
            )
    alone = [path for path, source in tiny.items() if not source.has_encoder]
    if alone and not full and reference is None:
        raise ValueError(
            f"--model-path={alone[0]!r}: a TAESD decoder alone needs latents; list the full VAE it was distilled from "
            "too (--model tiny or --model-path VAE), whose encoder then feeds it"
        )
    if args.fp16 and tiny:
        raise ValueError(
            f"--fp16: compares full VAEs' fp16 decodes; {next(iter(tiny))!r} is a tiny autoencoder (drop --fp16 or it)"
        )
    return tiny


def _load_full(label: str, args: argparse.Namespace, key: str) -> tuple[str, nn.Module]:
    """(source, vae) of a full VAE: a --model name or a path."""
    from hyperlit.models.loader import embedded_tiny_vae
    from hyperlit.vae.load import load_vae

    if label in MODEL_NAMES:
        random = label == "tiny-random"
        source = "the random tiny VAE (seed 0)" if random else "the embedded tiny base's VAE"
        return source, embedded_tiny_vae(tiny_random=random)
    return str(Path(label).resolve()), load_vae(label, norm_num_groups=args.norm_num_groups, key=key)


@dataclass
class LoadedModels:
    models: list[tuple[str, str, nn.Module]]  # (label, source, model) in the order given
    reference: tuple[str, nn.Module] | None  # --reference-model's (source, vae)


def _load_models(args: argparse.Namespace, tiny: dict[str, TAESDSource]) -> LoadedModels:
    """Every model in the order given; a TAESD decoder alone decodes the reference's latents (--reference-model),
    else the first full VAE's."""
    full: dict[str, tuple[str, nn.Module]] = {}
    for label in [*args.model, *args.model_path]:
        if label not in tiny:
            full[label] = _load_full(label, args, "--model-path")
    reference = None
    if args.reference_model is not None:
        ref = args.reference_model
        reference = full[ref] if ref in full else _load_full(ref, args, "--reference-model")
    teacher_label, (_, teacher) = next(iter(full.items()), (None, (None, None)))
    if reference is not None:
        teacher_label, teacher = args.reference_model, reference[1]
    models: list[tuple[str, str, nn.Module]] = []
    for label in [*args.model, *args.model_path]:
        if label in full:
            models.append((label, *full[label]))
            continue
        source = tiny[label]
        model = tiny_reconstruction(source, "--model-path", teacher, str(teacher_label))
        feeds = "" if source.has_encoder else f"; latents from {teacher_label}"
        models.append((label, f"{Path(label).resolve()} ({source.describe()}{feeds})", model))
    return LoadedModels(models, reference)


def run_eval_vae(args: argparse.Namespace) -> int:
    _check_args(args)
    tiny = _tiny_sources(args)
    images = load_eval_images(args.data, args.resolution, args.limit)
    lpips = rfid = None
    if args.lpips_weights is not None:
        from hyperlit.vae.lpips import LPIPS

        lpips = LPIPS(weights=args.lpips_weights, lin_weights=args.lpips_lin_weights)
    if args.inception_weights is not None:
        from hyperlit.vae.inception import load_inception
        from hyperlit.vae.metrics import RFID

        rfid = RFID(load_inception(args.inception_weights))
    loaded = _load_models(args, tiny)
    models = loaded.models
    if loaded.reference is not None:
        images = with_reference(images, loaded.reference[1], args.reference_model, args.batch_size)
    scores = evaluate(models, images, batch_size=args.batch_size, lpips=lpips, rfid=rfid)
    if args.fp16:
        for score, value in zip(scores, fp16_fidelity(models, images, args.batch_size), strict=True):
            score.fp16_psnr = value
    failures = (
        worse_than(scores, args.fail_if_worse, args.psnr_tolerance, args.lpips_tolerance)
        if args.fail_if_worse is not None
        else []
    )
    panel_rows: list[str] = []
    if args.panel:
        grid, rows = worst_panel(models, scores, images, args.panel_count)
        save_png(grid, args.panel)
        panel_rows = [images.names[i] for i in rows]
    if args.json:
        print(
            json.dumps(
                {
                    "protocol": images.protocol(),
                    "resolution": images.resolution,
                    "images": len(images.names),
                    "bad_input": dict(images.skips.counts),
                    "lpips_backbone": "vgg16" if lpips is not None else None,
                    "reference": {"model": args.reference_model, "source": loaded.reference[0]}
                    if loaded.reference is not None
                    else None,
                    "models": [s.to_dict(images.names) for s in scores],
                    "panel": {"path": args.panel, "rows": panel_rows} if args.panel else None,
                    "fail_if_worse": {"reference": args.fail_if_worse, "failures": failures}
                    if args.fail_if_worse
                    else None,
                },
                indent=2,
            )
        )
    else:
        print(f"protocol: {images.protocol()}")
        if lpips is not None:
            print("LPIPS: VGG16 backbone, lpips v0.1 heads, inputs in [-1, 1]")
        if args.fp16:
            print(f"fp16 PSNR: each model's fp16 decode against {scores[0].label}'s fp32 decode of the same latents")
        print(format_table(scores))
        for s in scores:
            for w in s.colour.warnings:
                print(f"warning: {s.label} {w}")
        if args.panel:
            reference_column = [f"reference ({args.reference_model})"] if loaded.reference is not None else []
            columns = " | ".join(["input", *reference_column] + [s.label for s in scores])
            print(f"wrote {args.panel}: rows {', '.join(panel_rows)}; columns {columns}")
        for f in failures:
            print(f"worse than {args.fail_if_worse}: {f}")
    return 1 if failures else 0


def is_vae_file(path: str) -> bool:
    from hyperlit.vae.describe import is_vae_path

    return is_vae_path(path)


def run_inspect_vae(args: argparse.Namespace) -> int:
    from hyperlit.vae.describe import describe_vae

    info = describe_vae(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(key) for key in info)
    for key, value in info.items():
        if value is None:
            value = "not carried" if key in ("scaling_factor", "shift_factor", "force_upcast") else None
        if value is None:
            continue
        if key == "parameters":
            value = f"{value:,}"
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0
