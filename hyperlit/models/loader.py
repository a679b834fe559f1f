"""`load_components(**cfg.model)`: validate the model config at the door, then load frozen SD parts from the
tiny embedded model, a diffusers folder or a single-file LDM checkpoint."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .components import SDComponents
from .family import PREDICTION_TYPES, ModelFamily, get_family
from .hashing import a1111_short_hash, folder_sha256, modules_sha256
from .single_file import SINGLE_FILE_EXTENSIONS, check_family, load_single_file, peek_shapes
from .tiny import build_tiny

SOURCES = ("tiny", "diffusers", "single_file")
# The embedded pretrained tiny base (a diffusers folder made by datasets/make_base.py, shipped as package data)
TINY_BASE_DIR = Path(__file__).parent / "tiny_base"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
DIFFUSERS_SUBFOLDERS = ("unet", "vae", "text_encoder")
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
# scheduler keys that shape training noise; a pipeline folder's sampler config (PNDM, ...) contributes only these
TRAINING_SCHEDULER_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
    "rescale_betas_zero_snr", "timestep_spacing", "steps_offset",
)  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """A validated model config: everything load_components needs, resolved, nothing loaded yet."""

    family: ModelFamily
    source: str
    path: Path | None
    tokenizer_path: Path | None
    dtype: torch.dtype
    seed: int
    prediction_type: str
    clip_skip: int
    tiny_random: bool = False  # source tiny: the random model from the shipped configs instead of the base


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _tokenizer_dir(value: str | os.PathLike) -> Path:
    """A folder with CLIP tokenizer files, or a diffusers folder whose tokenizer/ has them."""
    p = Path(value).expanduser()
    for cand in (p, p / "tokenizer"):
        if any(all((cand / f).is_file() for f in files) for files in TOKENIZER_FILES):
            return cand
    raise FileNotFoundError(
        f"model.tokenizer_path={value}: no CLIP tokenizer there (need vocab.json + merges.txt or tokenizer.json, "
        f"in that folder or its tokenizer/ subfolder)"
    )


def _check_diffusers_folder(path: Path, family: ModelFamily) -> None:
    missing = [s for s in DIFFUSERS_SUBFOLDERS if not (path / s / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"model.path={path} is a folder but not a diffusers model: missing "
            f"{', '.join(s + '/config.json' for s in missing)}"
        )
    unet, vae, text = (_read_json(path / s / "config.json") for s in DIFFUSERS_SUBFOLDERS)
    facts = [
        ("unet cross_attention_dim", unet.get("cross_attention_dim"), family.context_dim),
        ("text_encoder hidden_size", text.get("hidden_size"), family.context_dim),
        ("vae latent_channels", vae.get("latent_channels"), family.latent_channels),
        ("unet in_channels", unet.get("in_channels"), family.latent_channels),
    ]
    for what, got, want in facts:
        if got != want:
            raise ValueError(f"model.path={path}: {what} is {got}, but model.family={family.name} expects {want}")


def validate_model_config(
    family: str = "tiny",
    source: str | None = None,
    path: str | os.PathLike | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: str = "float32",
    seed: int = 0,
    prediction_type: str | None = None,
    clip_skip: int = 1,
    tiny_random: bool = False,
) -> ModelSpec:
    """Check a model config without loading weights (reads only small config files and safetensors headers).

    Raises FileNotFoundError/ValueError naming the `model.*` key, its value and what is allowed.
    """
    fam = get_family(family)
    if not fam.loadable:
        raise ValueError(f"model.family={family} is not loadable yet; loadable families: tiny, sd15, sd21")
    dtype_name = DTYPE_ALIASES.get(str(dtype), str(dtype))
    if dtype_name not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    pred = prediction_type or fam.prediction_type
    if pred not in PREDICTION_TYPES:
        raise ValueError(
            f"model.prediction_type={prediction_type!r} is not allowed; allowed: {', '.join(PREDICTION_TYPES)}"
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"model.seed={seed!r} is not allowed; allowed: an integer")
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 1:
        raise ValueError(f"model.clip_skip={clip_skip!r} is not allowed; allowed: an integer >= 1 (1 = no skip)")
    if not isinstance(tiny_random, bool):
        raise ValueError(f"model.tiny_random={tiny_random!r} is not allowed; allowed: true | false")
    if source is not None and source not in SOURCES:
        raise ValueError(f"model.source={source!r} is not allowed; allowed: {', '.join(SOURCES)} (or null to infer)")

    p = Path(path).expanduser() if path not in (None, "") else None
    if p is None:
        if source not in (None, "tiny"):
            raise ValueError(f"model.source={source} needs model.path (a diffusers folder or a single file)")
        if fam.name != "tiny":
            raise ValueError(
                f"model.family={fam.name} needs model.path: a diffusers folder or a single-file checkpoint "
                f"({', '.join(SINGLE_FILE_EXTENSIONS)}); only family tiny is built without one"
            )
        src = "tiny"
        if not tiny_random and not (TINY_BASE_DIR / "unet" / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded tiny base model is missing at {TINY_BASE_DIR}; rebuild it with "
                f"`python datasets/make_base.py`, or set model.tiny_random=true for the random tiny model"
            )
    else:
        if tiny_random:
            raise ValueError(f"model.tiny_random=true builds the random tiny model and takes no model.path (got {p})")
        if not p.exists():
            raise FileNotFoundError(
                f"model.path={p} does not exist (set model.path to a diffusers folder or a checkpoint file)"
            )
        src = source or ("diffusers" if p.is_dir() else "single_file")
        if src == "tiny":
            raise ValueError(f"model.source=tiny takes no model.path (got {p})")
    if src == "diffusers":
        if not p.is_dir():
            raise ValueError(f"model.source=diffusers needs a folder, but model.path={p} is a file")
        _check_diffusers_folder(p, fam)
    if src == "single_file":
        if not p.is_file():
            raise ValueError(f"model.source=single_file needs a file, but model.path={p} is a folder")
        if p.suffix.lower() not in SINGLE_FILE_EXTENSIONS:
            raise ValueError(
                f"model.path={p} has extension {p.suffix or '(none)'!r}; allowed: {', '.join(SINGLE_FILE_EXTENSIONS)} "
                f"or a diffusers folder"
            )
        shapes = peek_shapes(p)
        if shapes is not None:
            check_family(shapes, fam, p)

    tok: Path | None
    if tokenizer_path not in (None, ""):
        tok = _tokenizer_dir(tokenizer_path)
    elif src == "diffusers":
        if not (p / "tokenizer").is_dir():
            raise FileNotFoundError(
                f"model.path={p} has no tokenizer/ folder; set model.tokenizer_path to a folder with the CLIP "
                f"tokenizer files (vocab.json, merges.txt)"
            )
        tok = _tokenizer_dir(p / "tokenizer")  # the folder's own
    elif src == "tiny" and not tiny_random:
        tok = TINY_BASE_DIR / "tokenizer"  # the base's own word-level tokenizer
    elif (fam.config_dir / "tokenizer").is_dir():
        tok = fam.config_dir / "tokenizer"  # shipped with the configs (tiny only): the random model's tokenizer
    else:
        raise FileNotFoundError(
            f"model.tokenizer_path is not set: a single-file {fam.name} checkpoint has no tokenizer; set "
            f"model.tokenizer_path to a folder with the CLIP tokenizer files (vocab.json, merges.txt) or to a "
            f"diffusers {fam.name} folder"
        )
    return ModelSpec(fam, src, p, tok, DTYPES[dtype_name], seed, pred, clip_skip, tiny_random)


def _noise_scheduler(spec: ModelSpec) -> DDPMScheduler:
    """SD's training scheduler: the family's shipped config, updated by a diffusers folder's noise schedule."""
    config = dict(DDPMScheduler.load_config(spec.family.config_dir / "scheduler"))
    folder = _folder_of(spec)
    folder_cfg = folder / "scheduler" / "scheduler_config.json" if folder is not None else None
    if folder_cfg is not None and folder_cfg.is_file():
        own = _read_json(folder_cfg)
        config.update({k: own[k] for k in TRAINING_SCHEDULER_KEYS if k in own})
    config["prediction_type"] = spec.prediction_type
    config["clip_sample"] = False  # sampling-time clamp; never wanted in training (PNDM configs omit it)
    return DDPMScheduler.from_config(config)


def _folder_of(spec: ModelSpec) -> Path | None:
    """The diffusers folder the weights come from: the user's, the embedded tiny base, or none (random/single)."""
    if spec.source == "diffusers":
        return spec.path
    if spec.source == "tiny" and not spec.tiny_random:
        return TINY_BASE_DIR
    return None


def _load_diffusers_folder(folder: Path) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    # low_cpu_mem_usage needs accelerate, which is not a dependency; say so instead of letting diffusers warn
    kw = {"local_files_only": True, "low_cpu_mem_usage": False}
    # the modules are initialised randomly before their weights load: keep that off the run's global RNG
    with torch.random.fork_rng(devices=[]):
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    return unet, vae, text_encoder


def load_components(
    family: str = "tiny",
    source: str | None = None,
    path: str | os.PathLike | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: str = "float32",
    seed: int = 0,
    prediction_type: str | None = None,
    clip_skip: int = 1,
    tiny_random: bool = False,
) -> SDComponents:
    """Frozen SD parts (eval mode, requires_grad False, weights in `dtype`) described by the `model` config.

    family: tiny | sd15 | sd21. source: tiny | diffusers | single_file, or None to infer from `path`
    (none -> tiny, folder -> diffusers, file -> single_file). tokenizer_path: CLIP tokenizer folder, needed for
    a single file of a family without a shipped tokenizer. seed: tiny weights. prediction_type: override of
    the family default (e.g. epsilon for SD 2.x 512 "base" models). clip_skip: A1111's "stop at last layers"
    (1 = the family's own rule; 2 = one layer earlier, as NovelAI-style SD1 models were trained).
    tiny_random: with source tiny, the random model built from the shipped configs and `seed` (for tests that
    need no learning) instead of the embedded pretrained base.
    """
    spec = validate_model_config(
        family, source, path, tokenizer_path, dtype, seed, prediction_type, clip_skip, tiny_random
    )
    folder = _folder_of(spec)
    if folder is not None:
        unet, vae, text_encoder = _load_diffusers_folder(folder)
    elif spec.source == "tiny":
        unet, vae, text_encoder = build_tiny(spec.seed)
    else:
        unet, vae, text_encoder = load_single_file(spec.path, spec.family, spec.family.config_dir)

    depth = text_encoder.config.num_hidden_layers
    used = (spec.family.text_layers_used or depth) - (spec.clip_skip - 1)
    if not 1 <= used <= depth:
        raise ValueError(
            f"model.path={spec.path}: the text encoder has {depth} layers, but model.family={spec.family.name} "
            f"with model.clip_skip={spec.clip_skip} conditions on layer {used}"
        )
    for m in (unet, vae, text_encoder):
        if m.dtype != spec.dtype:  # diffusers warns on every .to(dtype), even a no-op one
            m.to(spec.dtype)
        m.eval().requires_grad_(False)

    if spec.source == "tiny" and spec.tiny_random:
        # no file exists: the short hash is over the tiny weights + configs as built (see hashing.modules_sha256)
        ckpt_hash, name = modules_sha256(unet, vae, text_encoder, extra=f"tiny|{spec.seed}")[:10], "tiny"
    elif spec.source == "tiny":
        ckpt_hash, name = folder_sha256(TINY_BASE_DIR, DIFFUSERS_SUBFOLDERS)[:10], "tiny"
    elif spec.source == "diffusers":
        # A1111 hashes one file; for a folder, sha256 over its component files (see hashing.folder_sha256)
        ckpt_hash, name = folder_sha256(spec.path, DIFFUSERS_SUBFOLDERS)[:10], spec.path.resolve().name
    else:
        ckpt_hash, name = a1111_short_hash(spec.path), spec.path.stem

    return SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(spec.tokenizer_path), local_files_only=True),
        noise_scheduler=_noise_scheduler(spec),
        family=spec.family,
        checkpoint_hash=ckpt_hash,
        checkpoint_name=name,
        clip_skip=spec.clip_skip,
    )
