"""hyperlit.models.components beyond the end-to-end tests: sizes, moving conditioning and networks between devices,
latent scaling with a shift, token padding, the final norm of an inner text layer, conditioning of families with
only one of SDXL's extra inputs, and what each cache fingerprint does and does not depend on.

References are computed another way: by hand (scaling, sizes), by transformers called directly (hidden states and
final norm), by the tokenizer called with SD's 77 tokens spelled out. Devices other than the CPU are stood in for
by PyTorch's meta device (no data, but every tensor records where it is).
"""

from __future__ import annotations

import copy
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from hyperlit.models import load_components
from hyperlit.models.components import Conditioning, SDComponents, TextEmbedding, plain_sizes


def tiny(**kwargs) -> SDComponents:
    """A fresh tiny model (0.3 s): fingerprints are cached per object, so each variant gets its own."""
    return load_components(family="tiny", tiny_random=True, seed=0, **kwargs)


def with_family(comps: SDComponents, **changes) -> SDComponents:
    return dataclasses.replace(comps, family=dataclasses.replace(comps.family, **changes))


def test_plain_sizes_are_one_row_of_height_width_0_0_height_width_by_default():
    assert torch.equal(plain_sizes(48, 80), torch.tensor([[48, 80, 0, 0, 48, 80]], dtype=torch.long))
    assert torch.equal(plain_sizes(48, 80, 3), torch.tensor([[48, 80, 0, 0, 48, 80]] * 3, dtype=torch.long))


def test_conditioning_to_moves_the_context_and_every_added_input():
    added = {"text_embeds": torch.ones(2, 8), "time_ids": torch.ones(2, 6)}
    cond = Conditioning(torch.ones(2, 77, 16), {"added_cond_kwargs": added, "cross_attention_kwargs": {"scale": 1}})
    moved = cond.to("meta", torch.float16)
    assert moved.context.device.type == "meta" and moved.context.dtype == torch.float16
    assert set(moved.unet_kwargs) == {"added_cond_kwargs", "cross_attention_kwargs"}
    assert moved.unet_kwargs["cross_attention_kwargs"] == {"scale": 1}
    assert set(moved.unet_kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    for value in moved.unet_kwargs["added_cond_kwargs"].values():
        assert value.device.type == "meta" and value.dtype == torch.float16
    # the original is left as it was
    assert cond.context.device.type == "cpu" and all(v.dtype == torch.float32 for v in added.values())
    plain = Conditioning(torch.ones(1, 77, 16)).to("cpu", torch.bfloat16)
    assert plain.context.dtype == torch.bfloat16 and plain.unet_kwargs == {}


def test_components_to_moves_every_network():
    comps = tiny()
    assert comps.to("meta") is comps
    for module in (comps.unet, comps.vae, comps.text_encoder):
        assert {p.device.type for p in module.parameters()} == {"meta"}


def test_latent_scaling_subtracts_the_shift_before_scaling():
    """diffusers: z_unet = (z - shift_factor) * scaling_factor (the SD3 / Flux convention); SD has shift 0."""
    comps = with_family(tiny(), scaling_factor=0.3611, shift_factor=0.1159)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(comps.scale_latents(z), (z - 0.1159) * 0.3611)
    assert torch.allclose(comps.unscale_latents(z), z / 0.3611 + 0.1159)
    assert torch.allclose(comps.unscale_latents(comps.scale_latents(z)), z, atol=1e-6)


def test_tokens_are_padded_to_the_encoders_context_whatever_the_tokenizer_says():
    """A tokenizer saved without model_max_length (transformers then says 1e30) still gives 77 tokens."""
    comps = tiny()
    loose = copy.deepcopy(comps.tokenizer)
    loose.model_max_length = 1000
    captions = ["a red circle", "word " * 200]
    ids = comps.tokenize(captions, loose)
    expected = comps.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert ids.shape == (2, 77) and torch.equal(ids, expected.input_ids)


class TextModelLayout(torch.nn.Module):
    """A CLIP text encoder laid out as transformers 4 has it: the transformer (with its final norm) under
    `text_model`, no `final_layer_norm` of its own."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.text_model = inner
        self.config = inner.config

    @property
    def device(self) -> torch.device:
        return self.text_model.device

    def forward(self, ids, **kwargs):
        return self.text_model(ids, **kwargs)


def test_an_inner_layer_gets_the_final_norm_in_either_transformers_layout():
    comps = tiny(clip_skip=2)  # A1111's clip skip 2 on the tiny 2-layer encoder: layer 1, then the final norm
    encoder = comps.text_encoder
    ids = comps.tokenize(["a blue square"])
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
        expected = encoder.final_layer_norm(out.hidden_states[1])
    assert torch.allclose(comps.encode_tokens(ids), expected, atol=1e-6)
    comps.text_encoder = TextModelLayout(encoder)
    assert torch.allclose(comps.encode_tokens(ids), expected, atol=1e-6)


def test_condition_errors_are_one_line():
    comps = tiny()
    with pytest.raises(ValueError) as error:
        comps.condition()
    assert str(error.value) == "condition() needs captions or a precomputed text embedding"
    pooled_family = with_family(comps, name="pooled", pooled_dim=8)
    with pytest.raises(ValueError) as error:
        pooled_family.condition(text=TextEmbedding(torch.zeros(1, 77, 48)))
    assert str(error.value) == "model.family=pooled needs the pooled text embedding, which is missing"


def test_a_family_with_only_time_ids_or_only_a_pooled_embedding_gets_just_that():
    comps = tiny()
    text = TextEmbedding(torch.zeros(2, 77, 48), torch.ones(2, 8))
    sizes = torch.tensor([[48, 80, 0, 0, 48, 80], [64, 64, 8, 4, 64, 64]])
    time_ids_only = with_family(comps, uses_time_ids=True).condition(text=text, sizes=sizes)
    added = time_ids_only.unet_kwargs["added_cond_kwargs"]
    assert set(added) == {"time_ids"} and torch.equal(added["time_ids"], sizes.float())
    pooled_only = with_family(comps, pooled_dim=8).condition(text=text)  # no sizes needed
    added = pooled_only.unet_kwargs["added_cond_kwargs"]
    assert set(added) == {"text_embeds"} and torch.equal(added["text_embeds"], text.pooled)
    assert comps.condition(text=text, sizes=sizes).unet_kwargs == {}  # SD1: neither


def test_time_ids_follow_the_context_to_its_device():
    comps = with_family(tiny(), uses_time_ids=True)
    cond = comps.condition(text=TextEmbedding(torch.zeros(1, 77, 48, device="meta")), sizes=plain_sizes(64, 64))
    time_ids = cond.unet_kwargs["added_cond_kwargs"]["time_ids"]
    assert time_ids.device.type == "meta" and time_ids.dtype == torch.float32


# -- fingerprints ------------------------------------------------------------------------------------------------


def test_an_unknown_component_is_a_one_line_error():
    with pytest.raises(ValueError) as error:
        tiny().fingerprint("text")
    assert str(error.value) == "unknown component 'text'; allowed: unet, vae, text_encoder, tokenizer, scheduler"


def nudged(comps: SDComponents, module: torch.nn.Module) -> SDComponents:
    with torch.no_grad():
        next(module.parameters()).add_(0.5)
    return comps


def test_each_fingerprint_follows_exactly_what_its_outputs_depend_on():
    names = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    base = tiny()
    prints = {name: base.fingerprint(name) for name in names}
    assert len(set(prints.values())) == 5  # five different things
    assert {name: tiny().fingerprint(name) for name in names} == prints  # and stable across loads

    def changed(comps: SDComponents) -> set[str]:
        return {name for name in names if comps.fingerprint(name) != prints[name]}

    unet = tiny()
    assert changed(nudged(unet, unet.unet)) == {"unet"}
    vae = tiny()
    assert changed(nudged(vae, vae.vae)) == {"vae"}
    text = tiny()
    assert changed(nudged(text, text.text_encoder)) == {"text_encoder"}
    # the tokenizer: a new token, another pad token, another tokenizer class; the text encoder's print covers it
    added = tiny()
    added.tokenizer.add_tokens(["<style>"])
    assert changed(added) == {"tokenizer", "text_encoder"}
    padded = tiny()
    padded.tokenizer.pad_token = "!"
    assert padded.tokenizer.pad_token != base.tokenizer.pad_token
    assert changed(padded) == {"tokenizer", "text_encoder"}
    other = tiny()
    other.tokenizer = copy.deepcopy(other.tokenizer)
    other.tokenizer.__class__ = type("OtherTokenizer", (type(other.tokenizer),), {})
    assert changed(other) == {"tokenizer", "text_encoder"}
    # the scheduler: its settings, not how they were given
    public = {k: v for k, v in base.noise_scheduler.config.items() if not k.startswith("_")}
    explicit = tiny()
    explicit.noise_scheduler = DDPMScheduler.from_config(public)

    def private(scheduler: DDPMScheduler) -> dict:  # diffusers' bookkeeping: class name, which values defaulted
        return {k: v for k, v in scheduler.config.items() if k.startswith("_")}

    assert private(explicit.noise_scheduler) != private(base.noise_scheduler)
    assert changed(explicit) == set()
    # keys another scheduler's file adds (a PNDM config's, as SD 1.5 ships) are kept in the order given: the
    # same keys in another order are the same settings
    extra = {"skip_prk_steps": True, "set_alpha_to_one": False}
    known = {k: v for k, v in public.items() if k not in extra}
    one, two = tiny(), tiny()
    one.noise_scheduler = DDPMScheduler.from_config({**known, **extra})
    two.noise_scheduler = DDPMScheduler.from_config({**known, **dict(reversed(extra.items()))})
    assert list(one.noise_scheduler.config) != list(two.noise_scheduler.config)
    assert one.fingerprint("scheduler") == two.fingerprint("scheduler")
    v_pred = tiny()
    v_pred.noise_scheduler = DDPMScheduler.from_config({**public, "prediction_type": "v_prediction"})
    assert changed(v_pred) == {"scheduler"}
    betas = tiny()  # trained betas given as a numpy array (not JSON): still a fingerprint, a different one
    betas.noise_scheduler = DDPMScheduler.from_config({**public, "trained_betas": np.linspace(1e-4, 0.02, 1000)})
    assert changed(betas) == {"scheduler"}
