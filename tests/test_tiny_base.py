"""The embedded pretrained tiny base: what `model=tiny` loads, its size and layout, and that it draws what it is asked.

The quality check is the fast form of benchmarks in datasets/make_base.py's report: prompts whose colour x shape
combination was held out of the base's training, fixed seeds, judged by hyperlit.demo.shapes.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from hyperlit.attention import unet_attention_widths
from hyperlit.demo.quality import Target, generate, load_pipeline, score
from hyperlit.demo.shapes import BACKGROUNDS, COLOURS, HELD_OUT, SHAPES, Scene, draw
from hyperlit.models import FAMILIES, load_components
from hyperlit.models.loader import TINY_BASE_DIR

MAX_BYTES = 25 * 1024 * 1024


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def test_base_folder_is_small_safetensors_and_sd_shaped():
    files = [p for p in TINY_BASE_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    weights = {p.relative_to(TINY_BASE_DIR).parent.as_posix() for p in files if p.suffix == ".safetensors"}
    assert weights == {"unet", "vae", "text_encoder"}
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]  # no pickles shipped
    sched = json.loads((TINY_BASE_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"], sched["prediction_type"]) == (
        "scaled_linear", 0.00085, 0.012, "epsilon")  # fmt: skip


def test_model_tiny_loads_the_base_and_tiny_random_the_random_model(pipe):
    base = load_components(family="tiny")
    for ours, theirs in ((base.unet, pipe.unet), (base.vae, pipe.vae), (base.text_encoder, pipe.text_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fam = FAMILIES["tiny"]
    assert base.checkpoint_name == "tiny" and base.family is fam
    # the family's facts hold for the base: attention widths, context width, latent layout
    widths = unet_attention_widths(base.unet)
    assert set(widths["self"]) == set(fam.attention_widths) and set(widths["cross"]) == {fam.context_dim}
    assert base.text_encoder.config.hidden_size == fam.context_dim and base.vae.config.latent_channels == 4
    random_model = load_components(family="tiny", tiny_random=True)
    assert random_model.checkpoint_hash != base.checkpoint_hash
    assert not torch.equal(random_model.unet.conv_in.weight, base.unet.conv_in.weight)


def test_base_tokenizer_gives_each_caption_word_one_token(pipe):
    words = ["a", "on", "background", "white", "grey", "black", "striped", *COLOURS, *SHAPES]
    for word in words:
        assert pipe.tokenizer.tokenize(word) == [word + "</w>"], word
    assert pipe.tokenizer.model_max_length == 77


def test_latents_have_the_family_scale():
    """make_base rescales the latent space so SD's fixed scaling factor gives the UNet unit-variance latents."""
    base = load_components(family="tiny")
    scenes = [Scene(c, s, b, 0.5, 0.5, 0.3) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    pixels = torch.stack([torch.from_numpy(np.asarray(draw(sc), dtype=np.float32)).permute(2, 0, 1) for sc in scenes])
    mean, _ = base.encode_images(pixels / 127.5 - 1)
    assert 0.6 < float(base.scale_latents(mean).std()) < 1.6


def test_base_draws_held_out_prompts(pipe):
    """Colour x shape combinations never trained on, two seeds each: most show the asked colour and shape."""
    targets = [Target(c, s) for c, s in HELD_OUT for _ in range(2)]
    images = generate(pipe, [t.prompt for t in targets], [i % 2 for i in range(len(targets))], steps=20, cfg=5.0)
    result = score(images, targets)
    assert result.adherence >= 0.6, result
    assert result.style <= 0.25, result  # the checkered style is not something the base draws
