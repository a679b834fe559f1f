"""hyperlit.models: tiny model, diffusers folder and single-file loading, family rules, errors at the door."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import safetensors.torch
import torch
from helpers.paths import CONF_DIR
from omegaconf import OmegaConf

from hyperlit.models import FAMILIES, SDComponents, get_family, load_components, validate_model_config
from hyperlit.models.family import CONFIGS_DIR
from hyperlit.models.single_file import load_single_file
from hyperlit.models.tiny import byte_level_vocab


@pytest.fixture(scope="module")
def tiny() -> SDComponents:
    return load_components(family="tiny", tiny_random=True, seed=0)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- diffusers -> LDM key layout, test-only, written independently of diffusers' LDM -> diffusers converter ----
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip


def _ldm_layer(kind: str, rest: str) -> str:
    """resnets are sub-layer 0 of an LDM block (with renamed parts), attentions sub-layer 1 (same names)."""
    if kind == "attentions":
        return f"1.{rest}"
    part, _, leaf = rest.partition(".")
    return f"0.{_RESNET[part]}.{leaf}"


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    per = unet.config.layers_per_block  # down blocks have `per` layers + a downsampler; up blocks `per + 1`
    sd = unet.state_dict()
    out = {}
    for key, t in sd.items():
        head, _, leaf = key.rpartition(".")
        if head in _TOP:
            new = f"{_TOP[head]}.{leaf}"
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * (per + 1) + int(m[3])}.{_ldm_layer(m[2], m[4])}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * (per + 1)}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
            index = 1 if m[1] == "attentions" else 2 * int(m[2])
            new = f"middle_block.{index}.{_ldm_layer(m[1], m[3])[2:]}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * (per + 1) + int(m[3])}.{_ldm_layer(m[2], m[4])}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            has_attn = any(k.startswith(f"up_blocks.{b}.attentions.") for k in sd)
            new = f"output_blocks.{b * (per + 1) + per}.{2 if has_attn else 1}.conv.{m[2]}"
        else:
            raise AssertionError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + new] = t
    return out


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    n = len(vae.config.block_out_channels)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, t in vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        # LDM numbers decoder levels bottom-up (up.0 is the full-resolution one), diffusers top-down
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.", new)
        new = re.sub(r"(decoder\.up\.\d+\.)resnets\.", r"\1block.", new).replace("upsamplers.0.", "upsample.")
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            head, _, leaf = new.rpartition(".")
            prefix, _, name = head.partition("mid.attn_1.")
            new = f"{prefix}mid.attn_1.{attn[name]}.{leaf}"
            if leaf == "weight" and t.ndim == 2:  # LDM attention uses 1x1 convs
                t = t[:, :, None, None]
        out["first_stage_model." + new] = t
    return out


def clip_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    return {f"cond_stage_model.transformer.text_model.{k}": v for k, v in text_encoder.state_dict().items()}


def open_clip_to_ldm(text_encoder, p: str = "cond_stage_model.model.") -> dict[str, torch.Tensor]:
    """OpenCLIP layout (SD2, SDXL's second encoder): fused in_proj, c_fc/c_proj, ln_1/ln_2, resblocks; the
    projection is stored transposed (x @ text_projection)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {}
    out[p + "token_embedding.weight"] = sd["embeddings.token_embedding.weight"]
    out[p + "positional_embedding"] = sd["embeddings.position_embedding.weight"]
    out[p + "ln_final.weight"], out[p + "ln_final.bias"] = sd["final_layer_norm.weight"], sd["final_layer_norm.bias"]
    width = text_encoder.config.hidden_size
    out[p + "text_projection"] = sd["text_projection.weight"].T if "text_projection.weight" in sd else torch.eye(width)
    for i in range(text_encoder.config.num_hidden_layers):
        s, d = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
        for leaf in ("weight", "bias"):
            out[d + f"attn.in_proj_{leaf}"] = torch.cat([sd[s + f"self_attn.{x}_proj.{leaf}"] for x in "qkv"])
            for ldm, ours in pairs.items():
                out[d + f"{ldm}.{leaf}"] = sd[s + f"{ours}.{leaf}"]
    return out


def tiny_ldm_state_dict(c: SDComponents) -> dict[str, torch.Tensor]:
    return {**unet_to_ldm(c.unet), **vae_to_ldm(c.vae), **clip_to_ldm(c.text_encoder)}


# -- tiny model -------------------------------------------------------------------------------------------------
def test_tiny_is_deterministic_and_seeded(tiny):
    again = load_components(family="tiny", tiny_random=True, seed=0)
    for a, b in ((tiny.unet, again.unet), (tiny.vae, again.vae), (tiny.text_encoder, again.text_encoder)):
        assert_same_weights(a, b)
    assert again.checkpoint_hash == tiny.checkpoint_hash and re.fullmatch(r"[0-9a-f]{10}", tiny.checkpoint_hash)
    other = load_components(family="tiny", tiny_random=True, seed=1)
    assert not torch.equal(other.unet.conv_in.weight, tiny.unet.conv_in.weight)
    assert other.checkpoint_hash != tiny.checkpoint_hash
    assert other.fingerprint("unet") != tiny.fingerprint("unet")
    assert again.fingerprint("vae") == tiny.fingerprint("vae")


def test_tiny_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_components(family="tiny")
    assert torch.equal(torch.rand(3), expected)


def test_tiny_shapes_frozen_and_family_facts(tiny):
    fam = tiny.family
    assert fam is FAMILIES["tiny"] and tiny.checkpoint_name == "tiny"
    for m in (tiny.unet, tiny.vae, tiny.text_encoder):
        assert not m.training and all(not p.requires_grad for p in m.parameters())
    assert tiny.unet.config.cross_attention_dim == fam.context_dim == tiny.text_encoder.config.hidden_size
    assert fam.context_dim not in tiny.unet.config.block_out_channels  # distinct self/cross hypernetwork modules
    assert tuple(tiny.unet.config.block_out_channels) == fam.attention_widths
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    mean, std = tiny.encode_images(pixels)
    assert mean.shape == std.shape == (2, fam.latent_channels, 64 // fam.vae_scale_factor, 64 // fam.vae_scale_factor)
    assert mean.dtype == torch.float32 and bool((std > 0).all())
    ctx = tiny.encode_text(["a photo of a cat", "x " * 200])  # second caption is truncated to 77 tokens
    assert ctx.shape == (2, 77, fam.context_dim) and ctx.dtype == torch.float32
    out = tiny.unet(tiny.scale_latents(mean), torch.tensor([1, 999]), encoder_hidden_states=ctx).sample
    assert out.shape == mean.shape
    sched = tiny.noise_scheduler.config
    assert (sched.num_train_timesteps, sched.beta_schedule, sched.beta_start, sched.beta_end) == (
        1000, "scaled_linear", 0.00085, 0.012)  # fmt: skip
    assert tiny.prediction_type == "epsilon" and sched.clip_sample is False


def test_encode_text_is_sd1_last_hidden_state(tiny):
    ids = tiny.tokenizer(["a red fox"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, 0] == tiny.tokenizer.bos_token_id and ids[0, -1] == tiny.tokenizer.eos_token_id  # padded with EOS
    with torch.no_grad():
        ref = tiny.text_encoder(ids).last_hidden_state
    assert torch.equal(tiny.encode_text(["a red fox"]), ref)


def test_penultimate_layer_rule_equals_truncated_encoder(tiny):
    """SD2's rule (output of layer N-1, then the final layer norm) must equal a model that stops there."""
    sd2_like = dataclasses.replace(tiny, family=dataclasses.replace(tiny.family, text_layers_used=1), _fingerprints={})
    truncated = copy.deepcopy(tiny.text_encoder)
    truncated.encoder.layers = truncated.encoder.layers[:1]
    truncated.config.num_hidden_layers = 1
    ids = tiny.tokenize(["penultimate"])
    with torch.no_grad():
        ref = truncated(ids).last_hidden_state
    got = sd2_like.encode_tokens(ids)
    assert torch.allclose(got, ref, atol=1e-6)
    assert not torch.allclose(got, tiny.encode_tokens(ids), atol=1e-3)
    assert sd2_like.fingerprint("text_encoder") != tiny.fingerprint("text_encoder")
    # A1111's clip skip 2 on an SD1-rule model lands on the same layer
    skipped = load_components(family="tiny", tiny_random=True, clip_skip=2)
    assert skipped.text_layers == 1 and torch.allclose(skipped.encode_tokens(ids), ref, atol=1e-6)
    assert skipped.fingerprint("text_encoder") == sd2_like.fingerprint("text_encoder")
    with pytest.raises(ValueError, match=r"text encoder has 2 layers.*model.clip_skip=3 conditions on layer 0"):
        load_components(family="tiny", tiny_random=True, clip_skip=3)


def test_latent_scaling_roundtrip_and_decode(tiny):
    z = torch.randn(2, 4, 8, 8)
    assert torch.allclose(tiny.scale_latents(z), z * 0.18215)
    assert torch.allclose(tiny.unscale_latents(tiny.scale_latents(z)), z, atol=1e-6)
    pixels = tiny.decode_latents(tiny.scale_latents(z))
    with torch.no_grad():
        ref = tiny.vae.decode(z).sample
    assert pixels.shape == (2, 3, 64, 64) and torch.allclose(pixels, ref, atol=1e-5)


def test_shipped_tokenizer_is_the_byte_level_vocab(tiny):
    vocab_file = CONFIGS_DIR / "tiny" / "tokenizer" / "vocab.json"
    assert json.loads(vocab_file.read_text(encoding="utf-8")) == byte_level_vocab()
    assert len(byte_level_vocab()) == tiny.text_encoder.config.vocab_size
    # every byte of any text has a token: no unknowns
    ids = tiny.tokenize(["Ünïcødé ✓ 東京"])[0].tolist()
    assert tiny.tokenizer.unk_token_id not in ids[1 : ids.index(tiny.tokenizer.eos_token_id)]


def test_dtype_option():
    c = load_components(family="tiny", dtype="bfloat16")
    assert {p.dtype for m in (c.unet, c.vae, c.text_encoder) for p in m.parameters()} == {torch.bfloat16}
    assert c.encode_text(["x"]).dtype == torch.float32


# -- diffusers folder and single file ----------------------------------------------------------------------------
def write_diffusers_folder(c: SDComponents, root: Path) -> Path:
    c.unet.save_pretrained(root / "unet")
    c.vae.save_pretrained(root / "vae")
    c.text_encoder.save_pretrained(root / "text_encoder")
    c.tokenizer.save_pretrained(root / "tokenizer")
    c.noise_scheduler.save_pretrained(root / "scheduler")
    return root


def test_diffusers_folder_roundtrip(tiny, tmp_path):
    folder = write_diffusers_folder(tiny, tmp_path / "my-model")
    c = load_components(family="tiny", path=str(folder))
    for a, b in ((tiny.unet, c.unet), (tiny.vae, c.vae), (tiny.text_encoder, c.text_encoder)):
        assert_same_weights(a, b)
    assert c.checkpoint_name == "my-model" and re.fullmatch(r"[0-9a-f]{10}", c.checkpoint_hash)
    assert all(not p.requires_grad for p in c.unet.parameters()) and not c.unet.training
    assert torch.equal(c.encode_text(["same text"]), tiny.encode_text(["same text"]))
    assert c.fingerprint("unet") == tiny.fingerprint("unet")  # location-independent
    # the folder's noise schedule wins over the shipped one; the family rule still decides clip_sample
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    sched["beta_end"] = 0.02
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    assert load_components(family="tiny", path=str(folder)).noise_scheduler.config.beta_end == 0.02


def test_diffusers_folder_of_wrong_family_or_without_tokenizer_is_refused(tiny, tmp_path):
    folder = write_diffusers_folder(tiny, tmp_path / "m")
    with pytest.raises(ValueError, match=r"cross_attention_dim is 48.*model.family=sd15 expects 768"):
        validate_model_config(family="sd15", path=str(folder))
    (folder / "tokenizer").rename(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer/ folder; set model.tokenizer_path"):
        validate_model_config(family="tiny", path=str(folder))
    assert (
        validate_model_config(family="tiny", path=str(folder), tokenizer_path=str(tmp_path / "tok")).source
        == "diffusers"
    )


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_ldm_roundtrip(tiny, tmp_path, suffix):
    path = tmp_path / f"tiny-ldm{suffix}"
    sd = {k: v.contiguous() for k, v in tiny_ldm_state_dict(tiny).items()}
    if suffix == ".safetensors":
        safetensors.torch.save_file(sd, path)
    else:
        torch.save({"state_dict": sd, "global_step": 7}, path)  # LDM/Lightning nesting
    c = load_components(family="tiny", path=str(path))
    for a, b in ((tiny.unet, c.unet), (tiny.vae, c.vae), (tiny.text_encoder, c.text_encoder)):
        assert_same_weights(a, b)
    assert c.checkpoint_name == "tiny-ldm"
    assert c.checkpoint_hash == hashlib.sha256(path.read_bytes()).hexdigest()[:10]  # A1111 short hash
    assert all(p.device.type == "cpu" for p in c.unet.parameters())  # nothing left on the meta device
    assert torch.equal(c.encode_text(["a"]), tiny.encode_text(["a"]))


def test_single_file_open_clip_text_encoder(tiny, tmp_path):
    """SD2 layout (OpenCLIP keys, fused qkv) goes through diffusers' OpenCLIP converter into CLIPTextModel."""
    sd = {**unet_to_ldm(tiny.unet), **vae_to_ldm(tiny.vae), **open_clip_to_ldm(tiny.text_encoder)}
    path = tmp_path / "sd2-like.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    text_encoder = load_single_file(path, FAMILIES["tiny"], CONFIGS_DIR / "tiny").text_encoder
    assert_same_weights(tiny.text_encoder, text_encoder)


def test_ckpt_with_pickled_objects_is_refused(tiny, tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Path("/")}, path)
    with pytest.raises(ValueError, match=r"evil.ckpt holds pickled objects beyond tensors \(pathlib.*weights_only"):
        load_components(family="tiny", path=str(path))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_corrupt_checkpoint_names_path(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=rf"model.path={re.escape(str(path))} is not a readable"):
        load_components(family="tiny", path=str(path))


def test_single_file_of_wrong_family_names_both(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tiny_ldm_state_dict(tiny).items()}, path)
    with pytest.raises(ValueError, match=r"context width 48.*model.family=sd15 expects 768.*model=tiny"):
        load_components(family="sd15", path=str(path), tokenizer_path=str(CONFIGS_DIR / "tiny" / "tokenizer"))


def test_single_file_with_wrong_shapes_names_both(tiny, tmp_path):
    sd = tiny_ldm_state_dict(tiny)
    key = "model.diffusion_model.out.2.weight"
    sd[key] = torch.zeros(8, *sd[key].shape[1:])
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    with pytest.raises(
        ValueError,
        match=r"UNet weights do not match.*conv_out.weight: checkpoint \(8, 32, 3, 3\) vs model \(4, 32, 3, 3\)",
    ):
        load_components(family="tiny", path=str(path))


# -- errors at the door ------------------------------------------------------------------------------------------
def sd15_header_only(path: Path) -> Path:
    """A file whose header passes the sd15 family check (the loader reads no weights before the tokenizer check)."""
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    safetensors.torch.save_file({key: torch.zeros(320, 768, dtype=torch.float16)}, path)
    return path


def test_missing_path_names_key_and_value(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"model.path={re.escape(str(missing))} does not exist"):
        load_components(family="sd15", path=str(missing))
    with pytest.raises(ValueError, match=r"model.family=sd15 needs model.path"):
        validate_model_config(family="sd15")


def test_missing_tokenizer_names_key(tmp_path):
    path = sd15_header_only(tmp_path / "v1-5.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model.tokenizer_path is not set"):
        validate_model_config(family="sd15", path=str(path))
    with pytest.raises(FileNotFoundError, match=r"model.tokenizer_path=.*nowhere.*vocab.json"):
        validate_model_config(family="sd15", path=str(path), tokenizer_path=str(tmp_path / "nowhere"))
    spec = validate_model_config(family="sd15", path=str(path), tokenizer_path=str(CONFIGS_DIR / "tiny"))
    assert spec.source == "single_file" and spec.tokenizer_path == CONFIGS_DIR / "tiny" / "tokenizer"
    assert spec.prediction_type == "epsilon"


def test_bad_values_name_what_is_allowed(tmp_path):
    bad_ext = tmp_path / "model.bin"
    bad_ext.write_bytes(b"0")
    with pytest.raises(ValueError, match=r"extension '.bin'; allowed: .safetensors, .ckpt"):
        validate_model_config(family="sd15", path=str(bad_ext))
    with pytest.raises(ValueError, match=r"model.family='sd3' is unknown; allowed: tiny, sd15, sd21, sdxl"):
        validate_model_config(family="sd3")
    with pytest.raises(ValueError, match=r"model.dtype='int8' is not allowed; allowed: float32, float16, bfloat16"):
        validate_model_config(dtype="int8")
    with pytest.raises(ValueError, match=r"model.clip_skip=0 is not allowed; allowed: an integer >= 1"):
        validate_model_config(clip_skip=0)
    with pytest.raises(ValueError, match=r"model.source='hub' is not allowed"):
        validate_model_config(source="hub")
    with pytest.raises(ValueError, match=r"model.family=sdxl needs model.path"):
        validate_model_config(family="sdxl")
    with pytest.raises(FileNotFoundError, match=r"not a diffusers model: missing unet/config.json"):
        validate_model_config(family="sd15", path=str(tmp_path))


# -- shipped configs and Hydra -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_shipped_sd_configs_match_family_facts(name):
    fam = get_family(name)
    unet = json.loads((fam.config_dir / "unet" / "config.json").read_text())
    text = json.loads((fam.config_dir / "text_encoder" / "config.json").read_text())
    vae = json.loads((fam.config_dir / "vae" / "config.json").read_text())
    sched = json.loads((fam.config_dir / "scheduler" / "scheduler_config.json").read_text())
    assert unet["cross_attention_dim"] == text["hidden_size"] == fam.context_dim
    assert tuple(unet["block_out_channels"][:3]) == fam.attention_widths
    assert vae["latent_channels"] == unet["in_channels"] == fam.latent_channels
    assert vae["scaling_factor"] == fam.scaling_factor
    assert 2 ** (len(vae["block_out_channels"]) - 1) == fam.vae_scale_factor
    assert sched["prediction_type"] == fam.prediction_type
    assert (fam.text_layers_used or text["num_hidden_layers"]) == text["num_hidden_layers"]


def test_hydra_model_configs_instantiate_load_components():
    from hydra.utils import instantiate

    for name in ("tiny", "sd15", "sd21"):
        cfg = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
        assert cfg._target_ == "hyperlit.models.load_components" and cfg.family == name
        args = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "_target_"}
        if name == "tiny":
            assert isinstance(instantiate(cfg), SDComponents)
            validate_model_config(**args)
        else:
            with pytest.raises(ValueError, match=rf"model.family={name} needs model.path"):
                validate_model_config(**args)
