"""`load_components(**cfg.model)`: validate the model config at the door, then load frozen SD parts from the
tiny embedded model, a diffusers folder or a single-file LDM checkpoint."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from hyperlit.pretrained import OFFLINE
from hyperlit.vae.load import load_vae

from .components import SDComponents
from .family import FAMILIES, PREDICTION_TYPES, ModelFamily, get_family, text_layer_index
from .hashing import a1111_short_hash, folder_sha256, modules_sha256
from .single_file import SINGLE_FILE_EXTENSIONS, FrozenParts, check_family, load_single_file, peek_shapes
from .tiny import build_tiny

SOURCES = ("tiny", "diffusers", "single_file")
# The embedded pretrained tiny base (a diffusers folder made by datasets/make_base.py, shipped as package data)
TINY_BASE_DIR = Path(__file__).parent / "tiny_base"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
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
    tokenizer_2_path: Path | None  # second tokenizer of two-encoder families (SDXL); None otherwise
    vae_path: Path | None  # a replacement VAE (e.g. an fp16-fixed SDXL VAE): diffusers folder or single file
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


def subfolders(family: ModelFamily) -> tuple[str, ...]:
    """The diffusers subfolders holding weights for `family` (what the folder hash covers)."""
    return ("unet", "vae", *family.text_encoders)


def _check_diffusers_folder(path: Path, family: ModelFamily) -> None:
    missing = [s for s in subfolders(family) if not (path / s / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"model.path={path} is a folder but not a diffusers model: missing "
            f"{', '.join(s + '/config.json' for s in missing)}"
        )
    unet, vae = (_read_json(path / s / "config.json") for s in ("unet", "vae"))
    text_width = sum(_read_json(path / s / "config.json").get("hidden_size", 0) for s in family.text_encoders)
    encoders = " + ".join(family.text_encoders)
    if unet.get("cross_attention_dim") != family.context_dim:
        looks = [f.name for f in FAMILIES.values() if f.context_dim == unet.get("cross_attention_dim")]
        hint = f" (it looks like {'/'.join(looks)}: set model={looks[0]})" if looks else ""
        raise ValueError(
            f"model.path={path}: unet cross_attention_dim is {unet.get('cross_attention_dim')}, but "
            f"model.family={family.name} expects {family.context_dim}{hint}"
        )
    facts = [
        (f"{encoders} hidden_size", text_width, family.context_dim),
        ("vae latent_channels", vae.get("latent_channels"), family.latent_channels),
        ("unet in_channels", unet.get("in_channels"), family.latent_channels),
    ]
    if family.uses_time_ids:
        facts.append(("unet addition_embed_type", unet.get("addition_embed_type"), "text_time"))
    for what, got, want in facts:
        if got != want:
            raise ValueError(f"model.path={path}: {what} is {got}, but model.family={family.name} expects {want}")


def _tokenizer_dirs(family: ModelFamily, value: str | os.PathLike) -> tuple[Path, Path | None]:
    """(tokenizer, tokenizer_2) folders; two-encoder families need a folder with tokenizer/ and tokenizer_2/."""
    if len(family.text_encoders) == 1:
        return _tokenizer_dir(value), None
    p = Path(value).expanduser()
    if not ((p / "tokenizer").is_dir() and (p / "tokenizer_2").is_dir()):
        raise FileNotFoundError(
            f"model.tokenizer_path={value}: model.family={family.name} has two text encoders and needs a folder "
            f"with tokenizer/ and tokenizer_2/ (any {family.name} diffusers folder has both)"
        )
    return _tokenizer_dir(p / "tokenizer"), _tokenizer_dir(p / "tokenizer_2")


def validate_model_config(
    family: str = "tiny",
    source: str | None = None,
    path: str | os.PathLike | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: str = "float32",
    seed: int = 0,
    prediction_type: str | None = None,
    clip_skip: int = 1,
    vae_path: str | os.PathLike | None = None,
    tiny_random: bool = False,
) -> ModelSpec:
    """Check a model config without loading weights (reads only small config files and safetensors headers).

    Raises FileNotFoundError/ValueError naming the `model.*` key, its value and what is allowed.
    """
    fam = get_family(family)
    if not fam.loadable:
        loadable = ", ".join(f.name for f in FAMILIES.values() if f.loadable)
        raise ValueError(f"model.family={family} is not loadable yet; loadable families: {loadable}")
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
    check_tiny_random(tiny_random)
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
        if fam.name == "tiny" and not tiny_random:
            check_tiny_base()
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
    tok2: Path | None = None
    two = len(fam.text_encoders) > 1
    if tokenizer_path not in (None, ""):
        tok, tok2 = _tokenizer_dirs(fam, tokenizer_path)
    elif src == "diffusers":
        wanted = ("tokenizer", "tokenizer_2") if two else ("tokenizer",)
        absent = [w for w in wanted if not (p / w).is_dir()]
        if absent:
            raise FileNotFoundError(
                f"model.path={p} has no {' or '.join(a + '/' for a in absent)} folder; set model.tokenizer_path to "
                + (
                    f"a {fam.name} diffusers folder (tokenizer/ and tokenizer_2/)"
                    if two
                    else "a folder with the CLIP tokenizer files (vocab.json, merges.txt)"
                )
            )
        tok, tok2 = _tokenizer_dirs(fam, p)  # the folder's own
    elif src == "tiny" and fam.name == "tiny" and not tiny_random:
        tok = TINY_BASE_DIR / "tokenizer"  # the base's own word-level tokenizer
    elif (fam.config_dir / "tokenizer").is_dir():
        tok = fam.config_dir / "tokenizer"  # shipped with the configs (tiny only): the random model's tokenizer
    else:
        need = (
            "a folder with tokenizer/ and tokenizer_2/"
            if two
            else "a folder with the CLIP tokenizer files (vocab.json, merges.txt)"
        )
        raise FileNotFoundError(
            f"model.tokenizer_path is not set: a single-file {fam.name} checkpoint has no tokenizer; set "
            f"model.tokenizer_path to {need} or to a diffusers {fam.name} folder"
        )
    vae_p: Path | None = None
    if vae_path not in (None, ""):
        vae_p = Path(vae_path).expanduser()
        if not vae_p.exists():
            raise FileNotFoundError(
                f"model.vae_path={vae_path} does not exist (a diffusers VAE folder or a .safetensors/.ckpt VAE file, "
                f"e.g. an fp16-fixed SDXL VAE)"
            )
    return ModelSpec(fam, src, p, tok, tok2, vae_p, DTYPES[dtype_name], seed, pred, clip_skip, tiny_random)


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


def check_tiny_random(tiny_random: object) -> None:
    if not isinstance(tiny_random, bool):
        raise ValueError(f"model.tiny_random={tiny_random!r} is not allowed; allowed: true | false")


def check_tiny_base() -> None:
    if not (TINY_BASE_DIR / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded tiny base model is missing at {TINY_BASE_DIR}; rebuild it with "
            f"`python datasets/make_base.py`, or set model.tiny_random=true for the random tiny model"
        )


def embedded_tiny_vae(tiny_random: bool = False, seed: int = 0) -> AutoencoderKL:
    """The VAE `model=tiny` uses, read alone (the VAE task, eval-vae): the base's, or with `tiny_random` the
    random one drawn from `seed`."""
    check_tiny_random(tiny_random)
    if tiny_random:
        return build_tiny(seed)[1]
    check_tiny_base()
    return load_vae(TINY_BASE_DIR / "vae")


def _folder_of(spec: ModelSpec) -> Path | None:
    """The diffusers folder the weights come from: the user's, the embedded tiny base, or none (random/single)."""
    if spec.source == "diffusers":
        return spec.path
    if spec.source == "tiny" and spec.family.name == "tiny" and not spec.tiny_random:
        return TINY_BASE_DIR
    return None


def _load_diffusers_folder(folder: Path, family: ModelFamily) -> FrozenParts:
    # the modules are initialised randomly before their weights load: keep that off the run's global RNG
    with torch.random.fork_rng(devices=[]):
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **OFFLINE)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **OFFLINE)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
        text_encoder_2 = None
        if "text_encoder_2" in family.text_encoders:
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", local_files_only=True
            )
    return FrozenParts(unet, vae, text_encoder, text_encoder_2)


def load_components(
    family: str = "tiny",
    source: str | None = None,
    path: str | os.PathLike | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    dtype: str = "float32",
    seed: int = 0,
    prediction_type: str | None = None,
    clip_skip: int = 1,
    vae_path: str | os.PathLike | None = None,
    tiny_random: bool = False,
) -> SDComponents:
    """Frozen SD parts (eval mode, requires_grad False, weights in `dtype`) described by the `model` config.

    family: tiny | sd15 | sd21 | sdxl | tiny_sdxl. source: tiny | diffusers | single_file, or None to infer from `path`
    (none -> tiny, folder -> diffusers, file -> single_file). tokenizer_path: CLIP tokenizer folder, needed for
    a single file of a family without a shipped tokenizer. seed: tiny weights. prediction_type: override of
    the family default (e.g. epsilon for SD 2.x 512 "base" models). clip_skip: A1111's "stop at last layers"
    (1 = the family's own rule; 2 = one layer earlier, as NovelAI-style SD1 models were trained). vae_path: a
    replacement VAE (diffusers folder or single file), e.g. an fp16-fixed SDXL VAE; without one SDXL's VAE runs
    in float32 whatever `dtype` says. tiny_random: family tiny without a path loads the embedded pretrained base
    (hyperlit/models/tiny_base); true builds the random model from the shipped configs and `seed` instead (for
    tests that need no learning).
    """
    spec = validate_model_config(
        family, source, path, tokenizer_path, dtype, seed, prediction_type, clip_skip, vae_path, tiny_random
    )
    folder = _folder_of(spec)
    if folder is not None:
        parts = _load_diffusers_folder(folder, spec.family)
    elif spec.source == "tiny":
        parts = FrozenParts(*build_tiny(spec.seed))
    else:
        parts = load_single_file(spec.path, spec.family, spec.family.config_dir)
    if spec.vae_path is not None:
        parts.vae = load_vae(spec.vae_path, scaling_factor=spec.family.scaling_factor, key="model.vae_path")

    for encoder in filter(None, (parts.text_encoder, parts.text_encoder_2)):
        depth = encoder.config.num_hidden_layers
        used = text_layer_index(spec.family, depth, spec.clip_skip)
        if not 1 <= used <= depth:
            raise ValueError(
                f"model.path={spec.path}: the text encoder has {depth} layers, but model.family={spec.family.name} "
                f"with model.clip_skip={spec.clip_skip} conditions on layer {used}"
            )
    # SDXL's VAE overflows in fp16 (NaN, black images): it stays float32 unless the user gave a replacement VAE,
    # which is then trusted to be fp16-safe (e.g. sdxl-vae-fp16-fix).
    upcast_vae = spec.family.vae_force_upcast and spec.vae_path is None
    for m in parts.modules():
        want = torch.float32 if (m is parts.vae and upcast_vae) else spec.dtype
        if m.dtype != want:  # diffusers warns on every .to(dtype), even a no-op one
            m.to(want)
        m.eval().requires_grad_(False)
    unet, vae, text_encoder = parts.unet, parts.vae, parts.text_encoder

    if spec.source == "tiny" and folder is not None:
        ckpt_hash, name = folder_sha256(folder, subfolders(spec.family))[:10], "tiny"
    elif spec.source == "tiny":
        # no file exists: the short hash is over the tiny weights + configs as built (see hashing.modules_sha256)
        ckpt_hash, name = modules_sha256(unet, vae, text_encoder, extra=f"tiny|{spec.seed}")[:10], "tiny"
    elif spec.source == "diffusers":
        # A1111 hashes one file; for a folder, sha256 over its component files (see hashing.folder_sha256)
        ckpt_hash, name = folder_sha256(spec.path, subfolders(spec.family))[:10], spec.path.resolve().name
    else:
        ckpt_hash, name = a1111_short_hash(spec.path), spec.path.stem

    return SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(spec.tokenizer_path), local_files_only=True),
        noise_scheduler=_noise_scheduler(spec),
        family=spec.family,
        text_encoder_2=parts.text_encoder_2,
        tokenizer_2=(
            CLIPTokenizer.from_pretrained(str(spec.tokenizer_2_path), local_files_only=True)
            if spec.tokenizer_2_path is not None
            else None
        ),
        checkpoint_hash=ckpt_hash,
        checkpoint_name=name,
        clip_skip=spec.clip_skip,
    )
