"""Sampling images from frozen components with the matching diffusers pipeline (SD1/SD2 or SDXL), conditioned
through `components.condition` so previews and generation see exactly what training conditions the UNet on."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from .components import SDComponents, plain_sizes


@dataclass
class SampleRequest:
    """One image: prompts, size, sampler settings and the starting noise (B×C×h×w, scaled latent space)."""

    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance_scale: float
    latents: torch.Tensor


def build_pipeline(components: SDComponents, scheduler: SchedulerMixin) -> DiffusionPipeline:
    """The diffusers pipeline for the components' family, sharing their (frozen) modules."""
    if components.text_encoder_2 is not None:
        pipe: DiffusionPipeline = StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2 or components.tokenizer,
            unet=components.unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            unet=components.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embedding_kwargs(components: SDComponents, request: SampleRequest, device: torch.device) -> dict:
    """Prompt embeddings for the pipeline call, from the same conditioning call training uses. The negative
    prompt is encoded like any prompt (A1111 does so on SDXL too; diffusers would zero an absent one)."""
    dtype = components.unet.dtype
    sizes = plain_sizes(request.height, request.width)  # the pipeline derives the same time_ids itself
    pos = components.condition([request.prompt], sizes).to(device, dtype)
    neg = components.condition([request.negative_prompt], sizes).to(device, dtype)
    kwargs = {"prompt_embeds": pos.context, "negative_prompt_embeds": neg.context}
    added_pos = pos.unet_kwargs.get("added_cond_kwargs", {})
    added_neg = neg.unet_kwargs.get("added_cond_kwargs", {})
    if "text_embeds" in added_pos:
        kwargs["pooled_prompt_embeds"] = added_pos["text_embeds"]
        kwargs["negative_pooled_prompt_embeds"] = added_neg["text_embeds"]
    return kwargs


@torch.no_grad()
def sample_image(components: SDComponents, scheduler: SchedulerMixin, request: SampleRequest) -> Image.Image:
    """Denoise `request.latents` and decode with `components.decode_latents` (the VAE in its own dtype: SDXL's
    stays float32 while the UNet runs in float16)."""
    device = components.unet.device
    pipe = build_pipeline(components, scheduler)
    latents = pipe(
        **embedding_kwargs(components, request, device),
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        latents=request.latents.to(device, components.unet.dtype),
        output_type="latent",
    ).images
    pixels = components.decode_latents(latents)
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]
