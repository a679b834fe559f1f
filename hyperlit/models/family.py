"""Facts about each Stable Diffusion model family, in one place; everything else reads them from here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIGS_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class ModelFamily:
    name: str
    context_dim: int  # text-context width seen by cross-attention (the A1111 hypernetwork size for attn2)
    attention_widths: tuple[int, ...]  # UNet channel widths with attention (self-attention context widths)
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell along each side
    scaling_factor: float  # diffusers: z = (latent - shift_factor) * scaling_factor
    shift_factor: float
    prediction_type: str  # "epsilon" | "v_prediction"
    text_layer: str  # "last" | "penultimate": which CLIP layer conditions the UNet
    # Transformer layers whose output is the context. None = all layers (SD1's last hidden state). SD2 uses the
    # penultimate layer (23) of OpenCLIP ViT-H's 24, then the final layer norm.
    text_layers_used: int | None
    default_resolution: int  # native image side of the family's models (for its default prediction type)
    other_prediction_resolution: int | None = None  # native side of the models with the other prediction type
    loadable: bool = True  # False: facts are listed for other modules but this package cannot load it yet
    # Text encoders whose (B, 77, width) outputs are concatenated into the context (SDXL: CLIP-L then OpenCLIP bigG).
    text_encoders: tuple[str, ...] = ("text_encoder",)
    # Whether the final layer norm is applied when the context comes from an inner layer (SD1 clip skip and SD2:
    # yes; SDXL feeds hidden_states[-2] raw).
    text_final_norm: bool = True
    # Width of the pooled text embedding the UNet also receives (SDXL: text_encoder_2's projected pooled output,
    # `added_cond_kwargs["text_embeds"]`); None: the UNet sees only the context.
    pooled_dim: int | None = None
    # SDXL micro-conditioning: `added_cond_kwargs["time_ids"]` = (original h, w, crop top, left, target h, w).
    uses_time_ids: bool = False
    # The VAE overflows in fp16 (NaN / black images): run it in float32 unless the user gives an fp16-safe one.
    vae_force_upcast: bool = False
    # The data check (callbacks/vae_check.py) warns when the mean round-trip PSNR of a user's images through the
    # family's VAE is below this many dB: well below what the VAE reaches on its own kind of images. SD 1.x/2.x's
    # kl-f8 VAE reaches 23.4 +- 3.8 dB on COCO-2017 val at 256 px and 26.0 +- 4.4 on LAION-Aesthetics; SDXL's 24.7
    # +- 3.9 on COCO (/work/shared/spec/vae-decoder.md section 2): their levels sit about 1.5 standard deviations
    # below the COCO mean, an expectation (no real weights here). The tiny base's is measured
    # (benchmarks/vae_round_trip.py, docs/benchmarks.md "VAE round-trip check").
    vae_warn_psnr: float = 18.0

    @property
    def config_dir(self) -> Path:
        """diffusers-layout folder of shipped configs (unet/, vae/, text_encoder/, scheduler/)."""
        return CONFIGS_DIR / self.name

    def native_resolution(self, prediction_type: str | None = None) -> int:
        """The image side the family's models were trained at, for a model of `prediction_type` (None = default).

        SD 2.x is the one family whose two kinds differ: the 768-v models are v-prediction, the 512 "base"
        models epsilon.
        """
        if prediction_type not in (None, self.prediction_type) and self.other_prediction_resolution:
            return self.other_prediction_resolution
        return self.default_resolution


FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily(
            name="tiny",
            context_dim=48,  # differs from the UNet widths 32/64 so self- and cross-attn modules are distinct
            attention_widths=(32, 64),
            latent_channels=4,
            vae_scale_factor=8,
            scaling_factor=0.18215,
            shift_factor=0.0,
            prediction_type="epsilon",
            text_layer="last",
            text_layers_used=None,
            default_resolution=64,
            # measured at 64 px (benchmarks/vae_round_trip.py): datasets/sample 27.5 dB (worst 24.1), plain base
            # shapes 28.8 (worst 23.9); fine noise 18.4, text-like line work 8.5, an orange gradient with black
            # outlines 7.0. The style suite (benchmarks/style_suite.py) at 22: warned are the four styles this VAE
            # erases (outline 15.1, warm grade 14.6, cel shading 21.4, film grain 21.7) and, falsely, diagonal stripes
            # (20.6, which it holds); quiet on the vignette (22.2). At 20 the stripes would pass but grain and cel
            # shading too: a missed warning costs a wasted run, a false one a look at the panel, so 22.
            vae_warn_psnr=22.0,
        ),
        ModelFamily(
            name="sd15",
            context_dim=768,
            attention_widths=(320, 640, 1280),
            latent_channels=4,
            vae_scale_factor=8,
            scaling_factor=0.18215,
            shift_factor=0.0,
            prediction_type="epsilon",
            text_layer="last",
            text_layers_used=None,
            default_resolution=512,
        ),
        ModelFamily(
            name="sd21",
            context_dim=1024,
            attention_widths=(320, 640, 1280),
            latent_channels=4,
            vae_scale_factor=8,
            scaling_factor=0.18215,
            shift_factor=0.0,
            prediction_type="v_prediction",  # SD 2.x 768-v; the 512 "base" models are epsilon (override it)
            text_layer="penultimate",
            text_layers_used=23,
            default_resolution=768,
            other_prediction_resolution=512,  # SD 2.x 512 "base" (epsilon)
        ),
        ModelFamily(
            name="sdxl",
            context_dim=2048,
            attention_widths=(640, 1280),
            latent_channels=4,
            vae_scale_factor=8,
            scaling_factor=0.13025,
            shift_factor=0.0,
            prediction_type="epsilon",
            text_layer="penultimate",  # hidden_states[-2] of each encoder, without the final layer norm
            text_layers_used=None,
            default_resolution=1024,
            text_encoders=("text_encoder", "text_encoder_2"),
            text_final_norm=False,
            pooled_dim=1280,
            uses_time_ids=True,
            vae_force_upcast=True,
            vae_warn_psnr=19.0,  # expected: 24.7 - 1.5 x 3.9 dB (COCO-2017 val, 256 px)
        ),
        # SDXL's shape at toy size, for tests and laptops: two text encoders (32 + 48 = context 80), pooled 48,
        # time_ids, no attention at the first level, self-attention widths 64/96 (as 640/1280 on SDXL). Weights
        # come from a diffusers folder (model.path); configs ship in configs/tiny_sdxl.
        ModelFamily(
            name="tiny_sdxl",
            context_dim=80,
            attention_widths=(64, 96),
            latent_channels=4,
            vae_scale_factor=8,
            scaling_factor=0.13025,
            shift_factor=0.0,
            prediction_type="epsilon",
            text_layer="penultimate",
            text_layers_used=None,
            default_resolution=64,
            text_encoders=("text_encoder", "text_encoder_2"),
            text_final_norm=False,
            pooled_dim=48,
            uses_time_ids=True,
            vae_force_upcast=True,
        ),
    )
}

PREDICTION_TYPES = ("epsilon", "v_prediction")


def text_layer_index(family: ModelFamily, depth: int, clip_skip: int = 1) -> int:
    """Which hidden state of a `depth`-layer text encoder is the context (hidden_states[k] = output of layer k).

    SD1: the last layer; SD2: layer 23 of OpenCLIP ViT-H (the shipped config has 23 layers); SDXL: the
    penultimate layer of each encoder. clip_skip (A1111 "stop at last layers") moves clip_skip - 1 layers earlier.
    """
    used = family.text_layers_used or (depth - 1 if family.text_layer == "penultimate" else depth)
    return used - (clip_skip - 1)


def get_family(name: str) -> ModelFamily:
    """The family called `name`; a ValueError names the key `model.family` and the allowed names."""
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is unknown; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[name]
