"""Text-to-image sampling with a diffusers pipeline over frozen SD parts; used by `hyperlit generate` and previews.

The prompt is encoded with the same text rule as training (``components.encode_text``, clip skip included) and
handed to the pipeline as embeddings. The initial noise comes from a CPU generator seeded per image, so an image
depends on its seed only (not on the device, the batch or the images before it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from hyperlit.models import SDComponents
from hyperlit.models.sampling import SampleRequest, build_pipeline, embedding_kwargs


@dataclass(frozen=True)
class Sampler:
    a1111_name: str  # the name A1111 writes in a PNG's parameters ("Sampler: Euler a")
    scheduler: type[SchedulerMixin]


SAMPLERS: dict[str, Sampler] = {
    "euler_a": Sampler("Euler a", EulerAncestralDiscreteScheduler),
    "euler": Sampler("Euler", EulerDiscreteScheduler),
    "dpmpp_2m": Sampler("DPM++ 2M", DPMSolverMultistepScheduler),
    "ddim": Sampler("DDIM", DDIMScheduler),
}


def check_sampler(name: str, key: str = "sampler") -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"{key}: {name!r} is not allowed; allowed: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def check_size(value: int, key: str, multiple: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
        raise ValueError(f"{key}: {value!r} is not allowed; use a positive multiple of {multiple}")
    return value


@dataclass(frozen=True)
class SampleSettings:
    """What an image depends on besides the prompt, the seed and the weights."""

    steps: int = 20
    guidance_scale: float = 7.0
    sampler: str = "euler_a"
    height: int = 64
    width: int = 64


def make_pipeline(components: SDComponents, sampler: str) -> StableDiffusionPipeline:
    """A pipeline over the components (nothing copied) with the sampler built from the model's scheduler config."""
    scheduler = check_sampler(sampler).scheduler.from_config(components.noise_scheduler.config)
    return build_pipeline(components, scheduler)  # SD or SDXL pipeline over the same parts


@torch.no_grad()
def sample_image(
    pipe: StableDiffusionPipeline,
    components: SDComponents,
    prompt: str,
    negative_prompt: str,
    seed: int,
    settings: SampleSettings,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Image.Image:
    """One image for ``prompt`` from ``seed``; whatever hypernetworks are attached to the UNet apply.

    ``decode``: latents in the UNet's scale -> images in [-1, 1] (a tiny decoder for previews); None: the VAE."""
    device, dtype = components.unet.device, components.unet.dtype
    prompt_embeds = components.encode_text([prompt]).to(device, dtype)
    negative_embeds = components.encode_text([negative_prompt]).to(device, dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    factor = components.family.vae_scale_factor
    shape = (1, components.unet.config.in_channels, settings.height // factor, settings.width // factor)
    latents = torch.randn(shape, generator=generator).to(device, dtype)
    if components.text_encoder_2 is not None:
        # SDXL: conditioned through components.condition (pooled + time_ids); the VAE decodes in its own dtype
        request = SampleRequest(
            prompt, negative_prompt, settings.height, settings.width, settings.steps, settings.guidance_scale, latents
        )
        out = pipe(
            **embedding_kwargs(components, request, device),
            height=settings.height,
            width=settings.width,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            latents=latents,
            generator=generator,
            output_type="latent",
        ).images
        return pipe.image_processor.postprocess((decode or components.decode_latents)(out), output_type="pil")[0]
    out = pipe(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        height=settings.height,
        width=settings.width,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        latents=latents,
        generator=generator,  # ancestral samplers draw their step noise from it
        output_type="pil" if decode is None else "latent",  # "latent": the UNet-scale latents, not decoded
    ).images
    return out[0] if decode is None else pipe.image_processor.postprocess(decode(out), output_type="pil")[0]
