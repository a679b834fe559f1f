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
            text_layer="penultimate",
            text_layers_used=None,  # two encoders; not loadable here, so no layer rule is encoded
            default_resolution=1024,
            loadable=False,
        ),
    )
}

PREDICTION_TYPES = ("epsilon", "v_prediction")


def get_family(name: str) -> ModelFamily:
    """The family called `name`; a ValueError names the key `model.family` and the allowed names."""
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is unknown; allowed: {', '.join(FAMILIES)}")
    return FAMILIES[name]
