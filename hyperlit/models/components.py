"""The frozen parts of a Stable Diffusion model and the few operations every task needs from them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .family import ModelFamily
from .hashing import modules_sha256

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class SDComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # configured for training; its prediction_type is the one to train with
    family: ModelFamily
    checkpoint_hash: str | None = None  # A1111 short hash (10 hex) written into hypernetwork files
    checkpoint_name: str | None = None
    clip_skip: int = 1  # A1111 "stop at last layers": 2 = one layer before the family's rule (NovelAI-style SD1)
    _fingerprints: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def context_dim(self) -> int:
        return self.family.context_dim

    @property
    def max_length(self) -> int:
        return self.text_encoder.config.max_position_embeddings

    def to(self, device: torch.device | str) -> SDComponents:
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device)
        return self

    # -- latents -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw VAE posterior (mean, std) in unscaled latent space, float32. `pixels`: B×3×H×W in [-1, 1]."""
        p = pixels.to(device=self.vae.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(p).latent_dist
        return posterior.mean.float(), posterior.std.float()

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the space the UNet sees (diffusers: (z - shift) * scale)."""
        return (latents - self.family.shift_factor) * self.family.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.family.scaling_factor + self.family.shift_factor

    # -- text ----------------------------------------------------------------------------------------------
    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids B×77: SD pads to the full context and truncates long captions."""
        return self.tokenizer(
            list(captions), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids

    @property
    def text_layers(self) -> int:
        """How many text-encoder layers produce the context: the family's rule, minus clip_skip - 1."""
        depth = self.text_encoder.config.num_hidden_layers
        return (self.family.text_layers_used or depth) - (self.clip_skip - 1)

    @torch.no_grad()
    def encode_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Context B×77×context_dim (float32) following the family's text-layer rule (SD1 last, SD2 penultimate)."""
        te = self.text_encoder
        ids = input_ids.to(te.device)
        used = self.text_layers
        if used == te.config.num_hidden_layers:
            out = te(ids).last_hidden_state
        else:
            # hidden_states[k] is the output of layer k; SD2 and A1111's clip skip apply the final layer norm to it
            out = te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[used])
        return out.float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (what the UNet sees) -> pixels B×3×H×W, float32, nominally in [-1, 1] (not clamped)."""
        z = self.unscale_latents(latents).to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.decode(z).sample.float()

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(captions))

    # -- identity ------------------------------------------------------------------------------------------
    def fingerprint(self, component: str) -> str:
        """Stable sha256 hex of what a component's outputs depend on (config + weights), for cache keys.

        "text_encoder" also covers the tokenizer and the family's layer rule, "vae" its scaling config, so a
        cache keyed by it is invalid exactly when encoded values could change.
        """
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; allowed: {', '.join(COMPONENTS)}")
        if component not in self._fingerprints:
            self._fingerprints[component] = self._compute_fingerprint(component)
        return self._fingerprints[component]

    def _compute_fingerprint(self, component: str) -> str:
        if component == "tokenizer":
            vocab = sorted(self.tokenizer.get_vocab().items())
            spec = json.dumps([vocab, self.max_length, type(self.tokenizer).__name__])
            return hashlib.sha256(spec.encode()).hexdigest()
        if component == "scheduler":
            cfg = {k: v for k, v in self.noise_scheduler.config.items() if not k.startswith("_")}
            return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
        if component == "text_encoder":
            rule = f"{self.text_layers}|{self.fingerprint('tokenizer')}"
            return modules_sha256(self.text_encoder, extra=rule)
        if component == "vae":
            rule = f"{self.family.scaling_factor}|{self.family.shift_factor}"
            return modules_sha256(self.vae, extra=rule)
        return modules_sha256(self.unet)
