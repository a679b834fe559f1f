"""VAE-decoder fine-tuning (frozen encoder, PatchGAN adversarial loss)."""

from hyperlit.tasks.vae.build import build
from hyperlit.tasks.vae.module import VAEDecoderTask

__all__ = ["VAEDecoderTask", "build"]
