"""`make_shards`: turn an A1111 folder into webdataset tar shards, optionally with precomputed latents/context.

Each sample is `<key>.<jpg|png|webp>` (original bytes; other formats re-encoded as PNG), `<key>.txt` (the
caption), `<key>.json` (source name and, with an encoder, what the precomputed arrays depend on) and
optionally `<key>.latent.npy` (float32 [2, C, h, w]: raw posterior mean and std, unscaled),
`<key>.context.npy` (float32 [77, D]: the fixed prompt encoded) and, for families with a pooled text embedding
(SDXL), `<key>.pooled.npy` (float32 [P]). The json's `sizes` (original h, w, crop top, left, target h, w) are
SDXL's time_ids; readers recompute them from the image header, target and resize mode, so older shards work too.
Shards are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from hyperlit.data.cache import sha256_bytes
from hyperlit.data.captions import load_template, make_prompt
from hyperlit.data.folder import scan_folder
from hyperlit.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadImage,
    DecodedImage,
    decode_image,
    place,
    to_pixels,
)
from hyperlit.data.options import RESIZE_MODES
from hyperlit.data.records import fixed_prompt_rng
from hyperlit.data.skips import SkipLog
from hyperlit.io import atomic_path

log = logging.getLogger(__name__)
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _image_member(data: bytes, decoded: DecodedImage) -> tuple[str, bytes]:
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
    if fmt in _KEEP_FORMATS:
        return _KEEP_FORMATS[fmt], data
    out = decoded.rgb
    if decoded.alpha is not None:  # keep alpha for use_weight
        out = decoded.rgb.copy()
        out.putalpha(decoded.alpha)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return "png", buf.getvalue()


def make_shards(
    src: str | Path,
    dst: str | Path,
    *,
    encoder: Any = None,
    resolution: int = 512,
    resize: str = "crop",
    template: str = "style_filewords",
    name: str = "hypernetwork",
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    encode_batch_size: int = 8,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[Path]:
    """Write `dst/<prefix>-000000.tar`, ... from the folder `src`; returns the shard paths.

    With `encoder` (SDComponents), each sample also carries its VAE posterior at `resolution` (for the
    default resize+center-crop placement) and the encoded fixed prompt built from `template` and `name`
    with the same rule as the folder DataModule, so training can skip both encoders.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"make_shards: source {src} is not a directory")
    if resize not in RESIZE_MODES:
        raise ValueError(f"make_shards: resize={resize!r}; expected one of {RESIZE_MODES}")
    if samples_per_shard < 1:
        raise ValueError(f"make_shards: samples_per_shard={samples_per_shard}; expected >= 1")
    skips = SkipLog()
    items = scan_folder(src, skips)
    lines = load_template(template) if encoder is not None else None
    target = (resolution, resolution)
    fps = (encoder.fingerprint("vae"), encoder.fingerprint("text_encoder")) if encoder is not None else None
    written: list[Path] = []
    shard: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], torch.Tensor, str]] = []

    def write_shard() -> None:
        if not shard:
            return
        path = dst / f"{prefix}-{len(written):06d}.tar"
        with atomic_path(path, suffix=".tar") as tmp, wds.TarWriter(str(tmp), encoder=False) as sink:
            for sample in shard:
                sink.write(sample)
        written.append(path)
        shard.clear()

    def add(sample: dict[str, Any]) -> None:
        shard.append(sample)
        if len(shard) >= samples_per_shard:
            write_shard()

    def flush() -> None:
        if not pending:
            return
        with torch.no_grad():
            mean, std = encoder.encode_images(torch.stack([p[1] for p in pending]))
            text = encoder.encode_prompts([p[2] for p in pending])
        for j, (sample, _, _) in enumerate(pending):
            sample["latent.npy"] = npy_bytes(torch.stack([mean[j], std[j]]).float().cpu().numpy())
            sample["context.npy"] = npy_bytes(text.context[j].float().cpu().numpy())
            if text.pooled is not None:
                sample["pooled.npy"] = npy_bytes(text.pooled[j].float().cpu().numpy())
            add(sample)
        pending.clear()

    for i, item in enumerate(items):
        data = item.read()
        try:
            decoded = decode_image(data, max_image_pixels)
        except BadImage as e:
            skips.add(e.kind, item.where, e.detail)
            continue
        ext, image_bytes = _image_member(data, decoded)
        meta: dict[str, Any] = {"source": Path(item.where).name}
        sample: dict[str, Any] = {"__key__": f"{i:08d}", ext: image_bytes, "txt": item.caption.encode("utf-8")}
        if encoder is None:
            sample["json"] = json.dumps(meta).encode("utf-8")
            add(sample)
            continue
        placement = place(decoded.rgb.size, target, resize)
        prompt = make_prompt(lines, item.caption, name, fixed_prompt_rng(sha256_bytes(data)), False, 0.0)
        meta.update(
            vae=fps[0],
            text_encoder=fps[1],
            target=list(target),
            resize=resize,
            prompt=prompt,
            crop=list(placement.crop),
            sizes=list(placement.sizes()),
        )
        sample["json"] = json.dumps(meta).encode("utf-8")
        pending.append((sample, to_pixels(decoded.rgb, placement), prompt))
        if len(pending) >= encode_batch_size:
            flush()
    if encoder is not None:
        flush()
    write_shard()
    if not written:
        raise ValueError(f"make_shards: no usable image in {src}; reasons with counts:\n{skips.describe()}")
    log.info("make_shards: %d shards in %s; bad input: %s", len(written), dst, skips.summary())
    return written
