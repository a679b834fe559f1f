"""Find and read a tiny autoencoder (TAESD) that hyperlit exports or madebyollin publishes: a diffusers
``AutoencoderTiny`` folder, or madebyollin-layout ``<name>_decoder`` / ``<name>_encoder`` files (.safetensors or
.pth). What a path holds is told from config.json or from its keys and shapes (safetensors headers; .pth through the
weights-only reader) before any model is built, so callers can check it at the door."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderTiny
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open

from hyperlit.pretrained import OFFLINE
from hyperlit.vae.describe import DIFFUSERS_WEIGHTS, read_shapes
from hyperlit.vae.lpips import load_weights_file
from hyperlit.vae.taesd_layout import load_taesd_part, match_layout, tiny_autoencoder

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
# A TAESD half is about 5 MB in fp32; a torch file larger than this is not one (and is not unpickled to look).
MAX_TORCH_FILE = 64 * 2**20
# Weights-file metadata of hyperlit's diffusers folders: the halves that trained (the other holds its random init).
TRAINED_PARTS = "hyperlit.trained_parts"
WHAT = "a diffusers AutoencoderTiny folder or a madebyollin-layout <name>_decoder .safetensors/.pth"


@dataclass(frozen=True)
class TAESDSource:
    """The files of one tiny autoencoder, found from the path a user gave."""

    path: Path
    latent_channels: int
    folder: Path | None = None  # a diffusers AutoencoderTiny folder (config.json + weights)
    decoder: Path | None = None  # a madebyollin-layout decoder file
    encoder: Path | None = None  # its encoder: the folder's (when trained) or the partner file; None: decoder alone
    source_scaling: float | None = None  # the teacher VAE's scaling factor, when the file says (hyperlit's exports)
    source_shift: float | None = None

    @property
    def has_encoder(self) -> bool:
        return self.encoder is not None

    def describe(self) -> str:
        """For tables and log lines: what is read, and where the latents come from."""
        if self.folder is not None:
            kind = "AutoencoderTiny folder" + ("" if self.has_encoder else " (decoder only: its encoder never trained)")
        elif self.encoder is not None:
            kind = f"TAESD decoder + {self.encoder.name}"
        else:
            kind = "TAESD decoder alone"
        return f"{kind}, {self.latent_channels} latent channels"


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _shapes(path: Path, key: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    try:
        shapes, meta, _ = read_shapes(path)
    except Exception as e:  # noqa: BLE001 - a header or pickle that cannot be read is a bad file for the user
        raise ValueError(f"{key}={str(path)!r}: cannot be read as weights ({type(e).__name__}: {e})") from None
    return shapes, meta


def _partner(path: Path, part: str) -> Path | None:
    """``<name>_<other>.<ext>`` beside ``<name>_<part>.<ext>``: the same suffix first, then the other weight files."""
    stem = path.stem
    if not stem.endswith(f"_{part}"):
        return None
    other = "encoder" if part == "decoder" else "decoder"
    base = stem[: -len(part)] + other
    for suffix in (path.suffix, *WEIGHT_SUFFIXES):
        candidate = path.with_name(base + suffix)
        if candidate.is_file():
            return candidate
    return None


def _folder_source(path: Path, key: str) -> TAESDSource | None:
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderTiny":
        return None
    weights = next((path / n for n in DIFFUSERS_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{key}={str(path)!r}: an AutoencoderTiny folder without {DIFFUSERS_WEIGHTS[0]}")
    meta: dict[str, str] = {}
    if weights.suffix == ".safetensors":
        with safe_open(str(weights), "pt") as f:
            meta = dict(f.metadata() or {})
    trained = meta.get(TRAINED_PARTS, "encoder,decoder").split(",")
    if "decoder" not in trained:
        raise ValueError(f"{key}={str(path)!r}: this AutoencoderTiny's decoder never trained (metadata {trained})")
    return TAESDSource(
        path,
        int(config.get("latent_channels", 4)),
        folder=path,
        encoder=path if "encoder" in trained else None,
        source_scaling=_float(meta.get("hyperlit.source_scaling_factor")),
        source_shift=_float(meta.get("hyperlit.source_shift_factor")),
    )


def find_taesd(path: str | os.PathLike, key: str) -> TAESDSource | None:
    """The tiny autoencoder at ``path``, or None when the path holds something else (a full VAE, another file).

    A decoder file brings its ``<name>_encoder`` partner when one lies beside it; an encoder file must have its
    decoder partner (an encoder alone cannot make images)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _folder_source(p, key)
    if p.is_file():
        if p.suffix not in WEIGHT_SUFFIXES or (p.suffix != ".safetensors" and p.stat().st_size > MAX_TORCH_FILE):
            return None
        shapes, meta = _shapes(p, key)
        part = match_layout(shapes)
        if part is None:
            return None
        if part.part == "encoder":
            decoder = _partner(p, "encoder")
            if decoder is None:
                raise ValueError(
                    f"{key}={str(path)!r}: a TAESD encoder alone; give its decoder (<name>_decoder.safetensors/.pth "
                    "beside it), which brings this encoder along"
                )
            return find_taesd(decoder, key)
        encoder = _partner(p, "decoder")
        if encoder is not None:
            enc = match_layout(_shapes(encoder, key)[0])
            if enc is None or enc.part != "encoder" or enc.latent_channels != part.latent_channels:
                raise ValueError(
                    f"{key}={str(path)!r}: {encoder.name} beside it is not a TAESD encoder for "
                    f"{part.latent_channels} latent channels"
                )
        return TAESDSource(
            p,
            part.latent_channels,
            decoder=p,
            encoder=encoder,
            source_scaling=_float(meta.get("hyperlit.source_scaling_factor")),
            source_shift=_float(meta.get("hyperlit.source_shift_factor")),
        )
    raise FileNotFoundError(f"{key}={str(path)!r}: no such file or folder")


def load_taesd(source: TAESDSource, key: str) -> AutoencoderTiny:
    """An ``AutoencoderTiny`` (eval mode) with the source's weights; a half the source lacks keeps a fresh init."""
    if source.folder is not None:
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its own save_config writes a key its from_config then warns about
        try:
            model = AutoencoderTiny.from_pretrained(source.folder, **OFFLINE)
        finally:
            diffusers_logging.set_verbosity(verbosity)
    else:
        model = tiny_autoencoder(source.latent_channels)
        for part, file in (("decoder", source.decoder), ("encoder", source.encoder)):
            if file is not None:
                load_taesd_part(model, load_weights_file(file, key), part, f"{key}={str(file)!r}")
    return model.eval()
