"""Turning source items into training records: decode, place, VAE-encode and text-encode once, with caches.

Everything here runs in the main process (prepare_data/setup); workers only index the finished records, so
the encoder is never pickled into DataLoader workers.
"""

from __future__ import annotations

import io
import logging
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from hyperlit.data.buckets import bucket_resolutions, nearest_bucket
from hyperlit.data.cache import TensorCache, make_key, sha256_bytes
from hyperlit.data.captions import load_template, make_prompt, varies_per_step
from hyperlit.data.folder import SourceItem
from hyperlit.data.images import BadImage, Placement, alpha_map, decode_image, place, to_pixels
from hyperlit.data.options import DataOptions
from hyperlit.data.skips import SkipLog

log = logging.getLogger(__name__)


@dataclass
class Record:
    where: str
    sha: str
    caption: str  # the [filewords] text
    placement: Placement
    mean: torch.Tensor  # raw (unscaled) posterior mean, C×h×w
    std: torch.Tensor
    alpha: torch.Tensor | None = None  # h×w in [0, 1] when the image has alpha
    prompt: str | None = None  # fixed prompt (no shuffle/drop-out)
    context_index: int | None = None


class Encoded:
    """Records plus the unique text contexts (and pooled embeddings, SDXL) they point at, ready for `finalize`."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.contexts: torch.Tensor | None = None
        self.pooled: torch.Tensor | None = None
        self.vae_calls = 0
        self.text_calls = 0


def _targets(opts: DataOptions) -> list[tuple[int, int]] | None:
    if not opts.buckets:
        return None
    return bucket_resolutions(opts.bucket_max_area, opts.bucket_step, opts.bucket_min_size, opts.bucket_max_size)


def _image_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - a bad header is classified by the full decode that follows
        return None


def encode_items(
    items: Iterable[SourceItem],
    encoder: Any,
    opts: DataOptions,
    skips: SkipLog,
    cache_dir: str | None,
    write: bool,
) -> Encoded:
    """VAE posteriors for every usable item (from cache or encoder) and, for fixed prompts, text contexts."""
    out = Encoded()
    latent_cache = TensorCache(cache_dir, "latents") if cache_dir else None
    vae_fp = encoder.fingerprint("vae")
    buckets = _targets(opts)
    square = (opts.resolution, opts.resolution)
    pending: dict[tuple[int, int], list[tuple[Record, torch.Tensor, Image.Image | None, str]]] = defaultdict(list)

    def flush(target: tuple[int, int]) -> None:
        group = pending.pop(target, [])
        if not group:
            return
        with torch.no_grad():
            mean, std = encoder.encode_images(torch.stack([g[1] for g in group]))
        out.vae_calls += 1
        for (rec, _, alpha_img, key), m, s in zip(group, mean, std, strict=True):
            rec.mean, rec.std = m.detach().float().cpu(), s.detach().float().cpu()
            latent_hw = (rec.mean.shape[-1], rec.mean.shape[-2])
            if alpha_img is not None:
                rec.alpha = alpha_map(alpha_img, rec.placement, latent_hw)
            if latent_cache is not None and write:
                tensors = {"mean": rec.mean, "std": rec.std}
                if rec.alpha is not None:
                    tensors["alpha"] = rec.alpha
                latent_cache.put(key, tensors, _placement_meta(rec.placement, rec_repairs.get(rec.sha, [])))
            out.records.append(rec)

    rec_repairs: dict[str, list[str]] = {}
    for item in items:
        try:
            data = item.read()
        except OSError as e:
            skips.add("unreadable", item.where, str(e))
            continue
        sha = sha256_bytes(data)
        size = _image_size(data) if buckets else None
        target = nearest_bucket(size, buckets) if (buckets and size) else square
        key = make_key("latent", image=sha, vae=vae_fp, target=target, resize=opts.resize)
        hit = latent_cache.get(key) if latent_cache is not None else None
        if hit is not None and "source" not in hit[1]:
            hit = None  # written before the source size was kept; re-encode to know the original size
        if hit is not None:
            tensors, meta = hit
            for kind in filter(None, meta.get("repairs", "").split(",")):
                skips.add(kind, item.where)
            rec = Record(item.where, sha, item.caption, _placement_from_meta(meta), tensors["mean"], tensors["std"])
            rec.alpha = tensors.get("alpha")
            out.records.append(rec)
            continue
        try:
            decoded = decode_image(data, opts.max_image_pixels)
        except BadImage as e:
            skips.add(e.kind, item.where, e.detail)
            continue
        for kind in decoded.repairs:
            skips.add(kind, item.where)
        rec_repairs[sha] = decoded.repairs
        if buckets:
            target = nearest_bucket(decoded.rgb.size, buckets)
            key = make_key("latent", image=sha, vae=vae_fp, target=target, resize=opts.resize)
        placement = place(decoded.rgb.size, target, opts.resize)
        rec = Record(item.where, sha, item.caption, placement, torch.empty(0), torch.empty(0))
        pending[target].append((rec, to_pixels(decoded.rgb, placement), decoded.alpha, key))
        if len(pending[target]) >= opts.encode_batch_size:
            flush(target)
    for target in list(pending):
        flush(target)
    return out


def _placement_meta(p: Placement, repairs: list[str]) -> dict[str, str]:
    return {
        "target": f"{p.target[0]}x{p.target[1]}",
        "resized": f"{p.resized[0]}x{p.resized[1]}",
        "crop": f"{p.crop[0]},{p.crop[1]}",
        "source": f"{p.source[0]}x{p.source[1]}",
        "repairs": ",".join(repairs),
    }


def _placement_from_meta(meta: dict[str, str]) -> Placement:
    def pair(s: str, sep: str) -> tuple[int, int]:
        a, b = s.split(sep)
        return int(a), int(b)

    return Placement(
        pair(meta["target"], "x"), pair(meta["resized"], "x"), pair(meta["crop"], ","), pair(meta["source"], "x")
    )


def fixed_prompt_rng(sha: str) -> random.Random:
    # Seeded by the image content only (not listing order, not the run seed), so the same image gets the same
    # prompt in every run, sweep and shard build, and cached / precomputed text embeddings stay valid.
    return random.Random(f"prompt:{sha}")


def encode_prompts(enc: Encoded, encoder: Any, opts: DataOptions, cache_dir: str | None, write: bool) -> None:
    """Fix one prompt per record (A1111 rule without shuffle/drop-out) and encode each unique prompt once."""
    if varies_per_step(opts.shuffle_tags, opts.tag_dropout):
        return
    lines = load_template(opts.template)
    text_cache = TensorCache(cache_dir, "text") if cache_dir else None
    text_fp = encoder.fingerprint("text_encoder")
    unique: dict[str, int] = {}
    for rec in enc.records:
        rec.prompt = make_prompt(lines, rec.caption, opts.name, fixed_prompt_rng(rec.sha), False, 0.0)
        rec.context_index = unique.setdefault(rec.prompt, len(unique))
    prompts = list(unique)
    # per unique prompt: {"context": 77×D} plus "pooled" (P) for families with a pooled text embedding (SDXL)
    entries: list[dict[str, torch.Tensor] | None] = [None] * len(prompts)
    missing = []
    for i, prompt in enumerate(prompts):
        key = make_key("text", prompt=prompt, text_encoder=text_fp)
        hit = text_cache.get(key) if text_cache is not None else None
        if hit is not None:
            entries[i] = hit[0]
        else:
            missing.append((i, key))
    for start in range(0, len(missing), opts.encode_batch_size):
        chunk = missing[start : start + opts.encode_batch_size]
        with torch.no_grad():
            text = encoder.encode_prompts([prompts[i] for i, _ in chunk])
        enc.text_calls += 1
        for j, (i, key) in enumerate(chunk):
            entry = {"context": text.context[j].detach().float().cpu()}
            if text.pooled is not None:
                entry["pooled"] = text.pooled[j].detach().float().cpu()
            entries[i] = entry
            if text_cache is not None and write:
                text_cache.put(key, entry)
    if entries:
        enc.contexts = torch.stack([e["context"] for e in entries])  # type: ignore[index]
        if all("pooled" in e for e in entries):  # type: ignore[operator]
            enc.pooled = torch.stack([e["pooled"] for e in entries])  # type: ignore[index]
