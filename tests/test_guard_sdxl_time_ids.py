"""SDXL `time_ids` for non-square sizes: (original h, w, crop top, left, target h, w) per /work/shared/spec/sdxl.md,
checked through `components.condition` against diffusers' own SDXL rule (`_get_add_time_ids`) and against the
pixels the data pipeline actually produced."""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from helpers.tiny_sdxl import write_folder
from PIL import Image

from hyperlit.callbacks.validation import validation_loss
from hyperlit.data.heldout import HeldOut
from hyperlit.data.images import place, to_pixels
from hyperlit.models import load_components
from hyperlit.models.components import plain_sizes


@pytest.fixture(scope="module")
def comps(tmp_path_factory):
    return load_components(family="tiny_sdxl", path=str(write_folder(tmp_path_factory.mktemp("tiny_sdxl"))))


def diffusers_time_ids(comps, original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> list:
    """diffusers' SDXL time_ids for (h, w) sizes and a (top, left) crop."""
    pipe = StableDiffusionXLPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
        tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet,
        scheduler=EulerDiscreteScheduler.from_config(comps.noise_scheduler.config), add_watermarker=False,
    )  # fmt: skip
    dim = comps.text_encoder_2.config.projection_dim
    return pipe._get_add_time_ids(original, crop, target, torch.float32, dim)[0].tolist()


def time_ids(cond) -> torch.Tensor:
    return cond.unet_kwargs["added_cond_kwargs"]["time_ids"]


def test_a_cropped_non_square_training_image_gives_height_first_time_ids(comps):
    source = Image.new("RGB", (200, 100))  # PIL sizes are (w, h): a wide image
    placement = place(source.size, (64, 48), "crop")  # target 64 wide, 48 high
    pixels = to_pixels(source, placement)
    assert pixels.shape == (3, 48, 64)  # the target the model really sees, read off the tensor
    # scale max(64/200, 48/100) = 0.48 -> 96x48, centre crop (96 - 64) / 2 = 16 px from the left, none from the top
    got = time_ids(comps.condition(["a wide image"], torch.tensor([placement.sizes()])))[0].tolist()
    assert got == [100, 200, 0, 16, 48, 64]
    assert got == diffusers_time_ids(comps, (100, 200), (0, 16), (48, 64))


def test_plain_sizes_of_a_non_square_image_match_diffusers(comps):
    """`plain_sizes` (no source image, no crop): what validation and to-lora condition on."""
    got = time_ids(comps.condition(["a"], plain_sizes(48, 80, batch=2)))
    assert got.tolist() == [diffusers_time_ids(comps, (48, 80), (0, 0), (48, 80))] * 2
    assert got[0].tolist() == [48, 80, 0, 0, 48, 80]


class Recorder(torch.nn.Module):
    """A stand-in task: the real components, a loss that records the conditioning it is handed."""

    def __init__(self, comps) -> None:
        super().__init__()
        self.components = comps
        self.hypernetwork = torch.nn.Linear(1, 1)
        self.hypernetwork.multiplier = 1.0
        self.conds: list = []

    def loss_at(self, latents, noise, timesteps, cond):
        self.conds.append(cond)
        return torch.zeros(latents.shape[0])


def test_validation_of_a_non_square_held_out_image_is_conditioned_on_its_own_size(comps):
    module = Recorder(comps)
    item = HeldOut(key="k", latents=torch.zeros(4, 6, 10), caption="c", prompt="p")  # 48 high, 80 wide in pixels
    validation_loss(module, [item], timesteps=2)
    assert time_ids(module.conds[0]).tolist() == [diffusers_time_ids(comps, (48, 80), (0, 0), (48, 80))] * 2
