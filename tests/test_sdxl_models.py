"""SDXL loading and conditioning: tiny SDXL-shaped folder and sgm single file, full-size shapes on the meta device."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from helpers.tiny_sdxl import build_parts, write_folder, write_tokenizers
from test_models import assert_same_weights, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

from hyperlit.attention import unet_attention_widths
from hyperlit.hypernetwork import HypernetworkConfig
from hyperlit.models import FAMILIES, load_components, validate_model_config
from hyperlit.models.components import plain_sizes
from hyperlit.models.sampling import SampleRequest, build_pipeline, sample_image
from hyperlit.models.single_file import FrozenParts, convert_checkpoint
from hyperlit.tasks.hypernetwork.build import resolve_sizes

SDXL = FAMILIES["sdxl"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="module")
def comps(folder):
    return load_components(family="tiny_sdxl", path=str(folder))


def sgm_state_dict(parts: FrozenParts) -> dict[str, torch.Tensor]:
    """Stability's sgm single-file layout, written independently of diffusers' sgm -> diffusers converter."""
    te1 = {f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in parts.text_encoder.state_dict().items()}
    te2 = open_clip_to_ldm(parts.text_encoder_2, "conditioner.embedders.1.model.")
    return {**unet_to_ldm(parts.unet), **vae_to_ldm(parts.vae), **te1, **te2}


def test_folder_loads_both_encoders_and_keeps_vae_in_fp32(folder):
    c = load_components(family="tiny_sdxl", path=str(folder), dtype="float16")
    assert c.text_encoder_2 is not None and c.tokenizer_2.pad_token == "!"
    assert c.unet.dtype == c.text_encoder.dtype == c.text_encoder_2.dtype == torch.float16
    assert c.vae.dtype == torch.float32  # SDXL's VAE overflows in fp16: upcast unless a fixed VAE is given
    assert c.unet.config.addition_embed_type == "text_time"
    assert not any(p.requires_grad for m in c.modules() for p in m.parameters())


def test_vae_path_replaces_the_vae_and_follows_dtype(folder, tmp_path):
    other = build_parts(seed=7).vae
    other.save_pretrained(tmp_path / "fixed_vae")
    c = load_components(family="tiny_sdxl", path=str(folder), dtype="bfloat16", vae_path=str(tmp_path / "fixed_vae"))
    assert c.vae.dtype == torch.bfloat16  # the user's fp16-fixed VAE is trusted in the low-precision dtype
    assert torch.equal(c.vae.encoder.conv_in.weight.float(), other.encoder.conv_in.weight.bfloat16().float())
    with pytest.raises(FileNotFoundError, match=r"model.vae_path=/nope does not exist"):
        validate_model_config(family="tiny_sdxl", path=str(folder), vae_path="/nope")


def test_condition_equals_the_diffusers_sdxl_pipeline(comps):
    """Context = both penultimate layers concatenated, pooled = text_encoder_2's projection, time_ids = sizes."""
    pipe = StableDiffusionXLPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
        tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet,
        scheduler=EulerDiscreteScheduler.from_config(comps.noise_scheduler.config),
    )  # fmt: skip
    captions = ["a red cat", "an astronaut, riding a horse, in the style of the painter"]
    ref_context, _, ref_pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    sizes = torch.tensor([[96, 128, 0, 16, 64, 64], [64, 64, 8, 0, 64, 64]])
    cond = comps.condition(captions, sizes)
    assert cond.context.shape == (2, 77, 80)
    torch.testing.assert_close(cond.context, ref_context.float())
    added = cond.unet_kwargs["added_cond_kwargs"]
    torch.testing.assert_close(added["text_embeds"], ref_pooled.float())
    ref_time = pipe._get_add_time_ids(
        (96, 128), (0, 16), (64, 64), torch.float32, comps.text_encoder_2.config.projection_dim
    )
    torch.testing.assert_close(added["time_ids"][0], ref_time[0])
    # the UNet call the task makes
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = comps.unet(x, torch.tensor([10, 500]), cond.context, **cond.unet_kwargs).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    # time_ids matter: another crop gives another prediction
    other = comps.condition(captions, sizes.flip(0))
    assert not torch.allclose(out, comps.unet(x, torch.tensor([10, 500]), other.context, **other.unet_kwargs).sample)


def test_condition_needs_sizes_and_sd1_ignores_them(comps):
    with pytest.raises(ValueError, match=r"model.family=tiny_sdxl needs per-sample sizes"):
        comps.condition(["a"])
    sd1 = load_components(family="tiny")
    cond = sd1.condition(["a"], plain_sizes(64, 64))
    assert cond.unet_kwargs == {} and torch.equal(cond.context, sd1.encode_text(["a"]))


def test_encoder_fingerprints_differ_by_family(comps):
    sd1 = load_components(family="tiny")
    assert comps.fingerprint("text_encoder") != sd1.fingerprint("text_encoder")
    assert comps.fingerprint("vae") != sd1.fingerprint("vae")


def test_auto_sizes_cross_first_then_self(comps):
    assert resolve_sizes(HypernetworkConfig(), comps.unet) == [80, 64, 96]  # as [2048, 640, 1280] on SDXL


def test_full_size_sdxl_auto_sizes_are_2048_640_1280():
    parts = build_parts(SDXL.config_dir, meta=True)
    assert unet_attention_widths(parts.unet) == {"self": [640, 1280], "cross": [2048]}
    assert resolve_sizes(HypernetworkConfig(), parts.unet) == [2048, 640, 1280]


def test_tiny_sgm_single_file_roundtrip(comps, folder, tmp_path):
    parts = FrozenParts(comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2)
    path = tmp_path / "tiny_sdxl.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sgm_state_dict(parts).items()}, path)
    c = load_components(family="tiny_sdxl", path=str(path), tokenizer_path=str(folder))
    for a, b in zip(parts.modules(), c.modules(), strict=True):
        assert_same_weights(a, b)
    assert c.checkpoint_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10] and c.checkpoint_name == "tiny_sdxl"
    assert not any(t.is_meta for m in c.modules() for t in [*m.parameters(), *m.buffers()])
    sizes = plain_sizes(64, 64, 2)
    a, b = comps.condition(["x", "y z"], sizes), c.condition(["x", "y z"], sizes)
    assert torch.equal(a.context, b.context)
    assert torch.equal(
        a.unet_kwargs["added_cond_kwargs"]["text_embeds"], b.unet_kwargs["added_cond_kwargs"]["text_embeds"]
    )


def test_single_file_needs_both_tokenizers(folder, tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.x": torch.zeros(1)}, path)
    with pytest.raises(FileNotFoundError, match=r"model.tokenizer_path is not set: .*tokenizer/ and tokenizer_2/"):
        validate_model_config(family="tiny_sdxl", path=str(path))
    with pytest.raises(
        FileNotFoundError, match=r"model.tokenizer_path=.*needs a folder with tokenizer/ and tokenizer_2/"
    ):
        validate_model_config(family="tiny_sdxl", path=str(path), tokenizer_path=str(folder / "tokenizer"))
    write_tokenizers(tmp_path / "toks")
    assert validate_model_config(
        family="tiny_sdxl", path=str(path), tokenizer_path=str(tmp_path / "toks")
    ).tokenizer_2_path


def test_tiny_sdxl_folder_refused_as_sdxl(folder):
    with pytest.raises(
        ValueError,
        match=r"unet cross_attention_dim is 80, but model.family=sdxl expects 2048 \(it looks like tiny_sdxl",
    ):
        validate_model_config(family="sdxl", path=str(folder))


def test_full_size_sgm_conversion_shapes_on_meta():
    """Stability's SDXL base layout at full size, as meta tensors: every key converts to the shipped configs."""
    parts = build_parts(SDXL.config_dir, meta=True)
    sd = sgm_state_dict(parts)
    # facts of the real sgm file
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert sd["model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"].shape == (640, 2048)
    assert "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_k.weight" in sd
    assert sd["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert sd["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert sd["conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight"].shape == (768, 3072)
    assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in sd)  # no attention at 320
    got = convert_checkpoint(sd, SDXL, SDXL.config_dir, Path("sdxl_base.safetensors"))
    for want, have in zip(parts.modules(), got.modules(), strict=True):
        shapes = {k: tuple(v.shape) for k, v in want.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in have.state_dict().items()}
    counts = [sum(p.numel() for p in m.parameters()) for m in got.modules()]
    assert counts[0] == 2_567_463_684  # SDXL base UNet
    assert got.text_encoder_2.text_projection.weight.shape == (1280, 1280)
    assert got.unet.add_embedding.linear_1.in_features == 2816


def _request(height: int = 64, width: int = 64) -> SampleRequest:
    latents = torch.randn(1, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(3))
    return SampleRequest("a red cat", "blurry", height, width, 3, 5.0, latents)


def test_sdxl_sampling_equals_the_diffusers_pipeline_on_prompts(comps):
    """Previews/generation condition through components.condition; same image as diffusers' own SDXL call."""
    sched = EulerDiscreteScheduler.from_config(comps.noise_scheduler.config)
    req = _request(64, 96)
    ours = np.asarray(sample_image(comps, sched, req))
    pipe = build_pipeline(comps, EulerDiscreteScheduler.from_config(comps.noise_scheduler.config))
    ref = pipe(
        prompt=req.prompt, negative_prompt=req.negative_prompt, height=64, width=96, num_inference_steps=3,
        guidance_scale=5.0, latents=req.latents, output_type="pil",
    ).images[0]  # fmt: skip
    assert isinstance(pipe, StableDiffusionXLPipeline) and ours.shape == (64, 96, 3)
    assert np.abs(ours.astype(int) - np.asarray(ref).astype(int)).max() <= 1


def test_sd1_sampling_unchanged():
    sd1 = load_components(family="tiny")
    sched = EulerDiscreteScheduler.from_config(sd1.noise_scheduler.config)
    req = _request()
    ours = np.asarray(sample_image(sd1, sched, req))
    pipe = build_pipeline(sd1, EulerDiscreteScheduler.from_config(sd1.noise_scheduler.config))
    ref = pipe(
        prompt_embeds=sd1.encode_text([req.prompt]), negative_prompt_embeds=sd1.encode_text([req.negative_prompt]),
        height=64, width=64, num_inference_steps=3, guidance_scale=5.0, latents=req.latents, output_type="pil",
    ).images[0]  # fmt: skip
    assert np.abs(ours.astype(int) - np.asarray(ref).astype(int)).max() <= 1


def test_sdxl_sampling_with_fp16_unet_and_fp32_vae(folder):
    """The VAE stays float32 (SDXL overflows fp16) while the UNet runs in bfloat16 (CPU has no fp16 conv)."""
    c = load_components(family="tiny_sdxl", path=str(folder), dtype="bfloat16")
    image = sample_image(c, EulerDiscreteScheduler.from_config(c.noise_scheduler.config), _request())
    assert image.size == (64, 64) and c.vae.dtype == torch.float32


def test_tiny_sdxl_has_the_conditioning_facts_of_sdxl():
    """Tests on tiny_sdxl stand for SDXL only if every rule they exercise is SDXL's."""
    tiny = FAMILIES["tiny_sdxl"]
    facts = ("text_encoders", "text_layer", "text_layers_used", "text_final_norm", "uses_time_ids",
             "vae_force_upcast", "prediction_type", "scaling_factor", "shift_factor", "latent_channels")  # fmt: skip
    for fact in facts:
        assert getattr(tiny, fact) == getattr(SDXL, fact), fact


@pytest.mark.parametrize("name", ["sdxl", "tiny_sdxl"])
def test_shipped_sdxl_configs_match_family_facts(name):
    fam = FAMILIES[name]
    read = lambda sub, file="config.json": json.loads((fam.config_dir / sub / file).read_text())  # noqa: E731
    unet, vae, te1, te2 = read("unet"), read("vae"), read("text_encoder"), read("text_encoder_2")
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"] == fam.context_dim
    assert te2["projection_dim"] == fam.pooled_dim
    assert unet["addition_embed_type"] == "text_time"
    assert unet["projection_class_embeddings_input_dim"] == fam.pooled_dim + 6 * unet["addition_time_embed_dim"]
    assert unet["down_block_types"][0] == "DownBlock2D"  # no attention at the first level
    assert tuple(unet["block_out_channels"][1:]) == fam.attention_widths
    assert vae["scaling_factor"] == fam.scaling_factor and vae["force_upcast"] is fam.vae_force_upcast
    assert read("scheduler", "scheduler_config.json")["prediction_type"] == fam.prediction_type
