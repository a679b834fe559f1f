"""The frozen parts of a Stable Diffusion model and the few operations every task needs from them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .family import ModelFamily, text_layer_index
from .hashing import modules_sha256

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Columns of a `sizes` tensor (B×6, pixels): what the data pipeline did to each image. SDXL's time_ids are exactly
# these; other families ignore them.
SIZE_COLUMNS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")


def plain_sizes(height: int, width: int, batch: int = 1) -> torch.Tensor:
    """`sizes` for generated images (no source image, no crop): SDXL's inference default (h, w, 0, 0, h, w)."""
    return torch.tensor([[height, width, 0, 0, height, width]] * batch, dtype=torch.long)


@dataclass
class TextEmbedding:
    """What the text encoders give for a batch of captions; the unit the text caches store."""

    context: torch.Tensor  # B×77×context_dim, float32
    pooled: torch.Tensor | None = None  # B×pooled_dim (SDXL), else None


@dataclass
class Conditioning:
    """Everything the UNet is conditioned on: `unet(x, t, encoder_hidden_states=context, **unet_kwargs)`."""

    context: torch.Tensor
    unet_kwargs: dict[str, Any] = field(default_factory=dict)  # SDXL: {"added_cond_kwargs": {text_embeds, time_ids}}

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Conditioning:
        added = self.unet_kwargs.get("added_cond_kwargs")
        kwargs = dict(self.unet_kwargs)
        if added is not None:
            kwargs["added_cond_kwargs"] = {k: v.to(device, dtype) for k, v in added.items()}
        return Conditioning(self.context.to(device, dtype), kwargs)


@dataclass
class SDComponents:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # configured for training; its prediction_type is the one to train with
    family: ModelFamily
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL's OpenCLIP bigG (pooled + second context half)
    tokenizer_2: CLIPTokenizer | None = None
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
        for m in self.modules():
            m.to(device)
        return self

    def modules(self) -> list[torch.nn.Module]:
        """Every frozen network (UNet, VAE, text encoders)."""
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    def text_pairs(self) -> list[tuple[CLIPTextModel, CLIPTokenizer]]:
        """(encoder, tokenizer) per text encoder, in the order their outputs are concatenated."""
        pairs = [(self.text_encoder, self.tokenizer)]
        if self.text_encoder_2 is not None:
            pairs.append((self.text_encoder_2, self.tokenizer_2 or self.tokenizer))
        return pairs

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
    def tokenize(self, captions: list[str], tokenizer: CLIPTokenizer | None = None) -> torch.Tensor:
        """Token ids B×77: SD pads to the full context and truncates long captions."""
        return (tokenizer or self.tokenizer)(
            list(captions), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids

    @property
    def text_layers(self) -> int:
        """How many layers of the (first) text encoder produce the context: the family's rule, minus clip_skip - 1."""
        return text_layer_index(self.family, self.text_encoder.config.num_hidden_layers, self.clip_skip)

    def _hidden(self, encoder: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context part, projected pooled output or None) of one encoder under the family's layer rule."""
        depth = encoder.config.num_hidden_layers
        used = text_layer_index(self.family, depth, self.clip_skip)
        out = encoder(ids.to(encoder.device), output_hidden_states=used != depth)
        pooled = getattr(out, "text_embeds", None)
        if used == depth:
            return out.last_hidden_state, pooled
        hidden = out.hidden_states[used]
        if self.family.text_final_norm:  # SD2 and A1111's clip skip normalise the inner layer; SDXL does not
            norm = encoder.text_model.final_layer_norm if hasattr(encoder, "text_model") else encoder.final_layer_norm
            hidden = norm(hidden)
        return hidden, pooled

    @torch.no_grad()
    def encode_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Context B×77×context_dim (float32) of a single-encoder family (SD1 last layer, SD2 penultimate)."""
        return self._hidden(self.text_encoder, input_ids)[0].float()

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> TextEmbedding:
        """Context (every encoder's hidden states, concatenated) and the pooled embedding of the last encoder."""
        parts, pooled = [], None
        for encoder, tokenizer in self.text_pairs():
            hidden, pooled = self._hidden(encoder, self.tokenize(captions, tokenizer))
            parts.append(hidden.float())
        context = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        if self.family.pooled_dim is None:
            pooled = None
        return TextEmbedding(context, pooled.float() if pooled is not None else None)

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """The context alone (B×77×context_dim); see `encode_prompts` for the pooled embedding too."""
        return self.encode_prompts(captions).context

    def condition(
        self, captions: list[str] | None = None, sizes: torch.Tensor | None = None, text: TextEmbedding | None = None
    ) -> Conditioning:
        """The UNet conditioning for a batch: encode `captions` (or take precomputed `text`) and, for families
        with micro-conditioning, turn `sizes` (B×6, see SIZE_COLUMNS) into time_ids. Hides which family it is."""
        if text is None:
            if captions is None:
                raise ValueError("condition() needs captions or a precomputed text embedding")
            text = self.encode_prompts(captions)
        if self.family.pooled_dim is None and not self.family.uses_time_ids:
            return Conditioning(text.context)
        added: dict[str, torch.Tensor] = {}
        if self.family.pooled_dim is not None:
            if text.pooled is None:
                raise ValueError(f"model.family={self.family.name} needs the pooled text embedding, which is missing")
            added["text_embeds"] = text.pooled
        if self.family.uses_time_ids:
            if sizes is None:
                raise ValueError(f"model.family={self.family.name} needs per-sample sizes (B×6) for its time_ids")
            added["time_ids"] = torch.as_tensor(sizes).to(text.context.device).float()
        return Conditioning(text.context, {"added_cond_kwargs": added})

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (what the UNet sees) -> pixels B×3×H×W, float32, nominally in [-1, 1] (not clamped)."""
        z = self.unscale_latents(latents).to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.decode(z).sample.float()

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
            spec = json.dumps(
                [[sorted(t.get_vocab().items()), t.pad_token, type(t).__name__] for _, t in self.text_pairs()]
                + [self.max_length]
            )
            return hashlib.sha256(spec.encode()).hexdigest()
        if component == "scheduler":
            cfg = {k: v for k, v in self.noise_scheduler.config.items() if not k.startswith("_")}
            return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
        # The family is part of every encoder fingerprint, so cache entries of SD1 and SDXL never mix.
        if component == "text_encoder":
            fam = self.family
            rule = f"{fam.name}|{self.text_layers}|{fam.text_final_norm}|{self.fingerprint('tokenizer')}"
            return modules_sha256(*(e for e, _ in self.text_pairs()), extra=rule)
        if component == "vae":
            rule = f"{self.family.name}|{self.family.scaling_factor}|{self.family.shift_factor}"
            return modules_sha256(self.vae, extra=rule)
        return modules_sha256(self.unet)
