"""The latent cache's VAE fingerprint includes the model family: two families whose VAEs have identical weights
(and the same scaling) must not read each other's cached latents."""

from __future__ import annotations

import torch

from hyperlit.data import FolderDataModule
from hyperlit.models import load_components
from hyperlit.models.family import FAMILIES


class EncodeCounter:
    """The real components, counting the pixel batches handed to the VAE."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.encoded = 0

    def encode_images(self, pixels: torch.Tensor):
        self.encoded += len(pixels)
        return self.inner.encode_images(pixels)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def tiny_as(family: str):
    """The embedded tiny model (same VAE weights every time) labelled as `family` (tiny and sd15 share the VAE
    scaling and the text-layer rule, so only the name differs)."""
    comps = load_components(family="tiny")
    comps.family = FAMILIES[family]  # before any fingerprint is computed (they are memoised)
    return comps


def encoded_images(comps, folder, cache) -> int:
    spy = EncodeCounter(comps)
    dm = FolderDataModule(
        path=str(folder), encoder=spy, resolution=64, batch_size=2, cache_dir=str(cache), template="none",
        shuffle=False, val_count=0,
    )  # fmt: skip
    dm.setup("fit")
    return spy.encoded


def test_identical_vae_weights_of_two_families_do_not_share_cached_latents(image_folder, tmp_path):
    folder, cache = image_folder(n=3), tmp_path / "cache"
    sd15, tiny = tiny_as("sd15"), tiny_as("tiny")
    for a, b in zip(sd15.vae.state_dict().values(), tiny.vae.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert (FAMILIES["sd15"].scaling_factor, FAMILIES["sd15"].shift_factor) == (
        FAMILIES["tiny"].scaling_factor,
        FAMILIES["tiny"].shift_factor,
    )  # only the family tells them apart
    assert encoded_images(sd15, folder, cache) == 3
    assert encoded_images(tiny_as("sd15"), folder, cache) == 0  # the cache works: same family, read back
    assert encoded_images(tiny, folder, cache) == 3  # the other family encodes again
    assert sd15.fingerprint("vae") != tiny.fingerprint("vae")
