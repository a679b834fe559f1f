"""What the VAE-decoder and tiny-autoencoder tasks share about their frozen VAE: a no-grad block, a weight checksum,
and the frozen encoder's posterior, cached once per image."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def frozen(module: nn.Module | None) -> Iterator[None]:
    """requires_grad off for the block: the generator step builds no graph into the discriminator's weights."""
    if module is None:
        yield
        return
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(f)


def weights_checksum(module: nn.Module, prefixes: tuple[str, ...] = ()) -> str:
    """sha256 over the weights whose names start with one of ``prefixes`` (all of them when empty)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if not prefixes or name.startswith(prefixes):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def cached_posterior(
    vae: nn.Module, cache: dict[int, tuple[Tensor, Tensor]], pixels: Tensor, index: Tensor | None, use_cache: bool
) -> tuple[Tensor, Tensor]:
    """(mean, logvar) of the frozen encoder in fp32 (autocast off: the encoder is not trained and SD-class encoders
    can overflow fp16). With ``index`` and ``use_cache``, each image is encoded once and kept in ``cache``."""
    use_cache = use_cache and index is not None
    keys = [int(i) for i in index] if use_cache else []
    todo = [j for j, k in enumerate(keys) if k not in cache] if use_cache else None
    if todo is None or todo:
        px = pixels if todo is None else pixels[todo]
        with torch.autocast(device_type=px.device.type, enabled=False):
            dist = vae.encode(px.float()).latent_dist
        mean, logvar = dist.mean.float(), dist.logvar.float()
        if todo is None:
            return mean, logvar
        for j, m, lv in zip(todo, mean, logvar, strict=True):
            cache[keys[j]] = (m.cpu(), lv.cpu())
    means, logvars = zip(*(cache[k] for k in keys), strict=True)
    return torch.stack(means).to(pixels.device), torch.stack(logvars).to(pixels.device)
