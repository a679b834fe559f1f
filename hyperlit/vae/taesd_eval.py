"""A tiny autoencoder as ``eval-vae`` scores it: images in [-1, 1] -> latents -> its decoder's images in [-1, 1].

The latents come from its own encoder or, for a decoder alone, from a full VAE's posterior mode put in the UNet's
scale, ``(z - shift_factor) * scaling_factor``: the latents a TAESD decoder is made for (the teacher's, as a UNet
would hand them over)."""

from __future__ import annotations

from diffusers import AutoencoderKL, AutoencoderTiny
from torch import Tensor, nn

from hyperlit.vae.taesd_read import TAESDSource, load_taesd

TAESD_FACTOR = 8  # madebyollin's layout: three 2x stages


class TinyReconstruction(nn.Module):
    """``forward(images)``: the tiny decoder's reconstruction (not clamped), no latent quantisation."""

    def __init__(
        self, tiny: AutoencoderTiny, teacher: AutoencoderKL | None = None, scaling: float = 1.0, shift: float = 0.0
    ) -> None:
        super().__init__()
        self.tiny = tiny
        self.teacher = teacher
        self.scaling, self.shift = scaling, shift

    def latents(self, images: Tensor) -> Tensor:
        if self.teacher is None:
            return self.tiny.encode(images).latents
        z = self.teacher.encode(images.to(self.teacher.dtype)).latent_dist.mode().float()
        return (z - self.shift) * self.scaling

    def forward(self, images: Tensor) -> Tensor:
        return self.tiny.decode(self.latents(images)).sample


def tiny_reconstruction(
    source: TAESDSource, key: str, teacher: AutoencoderKL | None = None, teacher_label: str = ""
) -> TinyReconstruction:
    """The scored model for ``source``; a decoder alone decodes ``teacher``'s latents (its scale: the file's
    ``hyperlit.source_*`` metadata when hyperlit wrote it, else the teacher's config)."""
    tiny = load_taesd(source, key)
    if source.has_encoder:
        return TinyReconstruction(tiny).eval()
    if teacher is None:
        raise ValueError(
            f"{key}={str(source.path)!r}: a TAESD decoder alone needs latents; list the full VAE it was distilled "
            "from too (--model tiny or --model-path VAE), whose encoder then feeds it"
        )
    channels = int(teacher.config.latent_channels)
    if channels != source.latent_channels:
        raise ValueError(
            f"{key}={str(source.path)!r}: a TAESD decoder for {source.latent_channels} latent channels cannot decode "
            f"{teacher_label}'s {channels}-channel latents"
        )
    factor = 2 ** (len(teacher.config.block_out_channels) - 1)
    if factor != TAESD_FACTOR:
        raise ValueError(
            f"{key}={str(source.path)!r}: a TAESD decoder upsamples {TAESD_FACTOR}x, but {teacher_label} downsamples "
            f"{factor}x; list the VAE it was distilled from first"
        )
    scaling = source.source_scaling if source.source_scaling is not None else float(teacher.config.scaling_factor)
    shift = source.source_shift if source.source_shift is not None else float(teacher.config.shift_factor or 0.0)
    return TinyReconstruction(tiny, teacher, scaling, shift).eval()
