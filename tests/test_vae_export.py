"""LDM single-file and diffusers-folder export of a VAE, checked through diffusers' own LDM conversion."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from hyperlit.vae.export import diffusers_to_ldm, save_diffusers_folder, save_single_file
from hyperlit.vae.load import check_vae_layout, ldm_vae_config, load_vae

SD_LIKE = dict(  # SD-VAE shaped, tiny: 3 levels so the reversed up-block order is visible
    block_out_channels=[8, 16, 16],
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    layers_per_block=2,
    norm_num_groups=4,
    latent_channels=4,
    scaling_factor=0.18215,
    force_upcast=False,
)
FLUX_LIKE = dict(
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)


def _vae(cfg: dict, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**cfg).eval()
    with torch.no_grad():  # non-default norms/biases so a misplaced key changes the output
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


@pytest.mark.parametrize("cfg", [SD_LIKE, FLUX_LIKE], ids=["sd", "flux"])
def test_single_file_loads_strictly_through_diffusers_and_matches_folder(tmp_path, cfg):
    vae = _vae(cfg)
    single = save_single_file(vae, tmp_path / "my.vae.safetensors")
    folder = save_diffusers_folder(vae, tmp_path / "my-vae")

    sd = load_file(single)
    assert not any(k.startswith(("loss", "model_ema", "first_stage_model")) for k in sd)
    assert sd["encoder.mid.attn_1.q.weight"].ndim == 4 and sd["decoder.mid.attn_1.proj_out.weight"].ndim == 4
    n = len(cfg["up_block_types"])
    # up-block order reversed: diffusers up_blocks.0 (lowest resolution, has an upsampler) is LDM up.{n-1}
    up0 = vae.decoder.up_blocks[0].upsamplers[0].conv.weight
    assert torch.equal(sd[f"decoder.up.{n - 1}.upsample.conv.weight"], up0)
    assert "decoder.up.0.upsample.conv.weight" not in sd
    # the highest-resolution up block narrows the channels, so its first resnet has the LDM nin_shortcut
    shortcut = vae.decoder.up_blocks[-1].resnets[0].conv_shortcut.weight
    assert torch.equal(sd["decoder.up.0.block.0.nin_shortcut.weight"], shortcut)
    assert ("quant_conv.weight" in sd) == cfg.get("use_quant_conv", True)

    # diffusers' own LDM -> diffusers conversion, then a strict load into a fresh model
    conf = AutoencoderKL.load_config(folder)
    converted = convert_ldm_vae_checkpoint(dict(sd), conf)
    reloaded = AutoencoderKL.from_config(conf).eval()
    reloaded.load_state_dict(converted, strict=True)
    from_folder = AutoencoderKL.from_pretrained(folder, local_files_only=True).eval()

    z = torch.randn(1, cfg["latent_channels"], 8, 8)
    with torch.no_grad():
        ref = vae.decode(z).sample
        a = reloaded.decode(z).sample
        b = from_folder.decode(z).sample
    assert torch.equal(a, b) and torch.equal(a, ref)

    written = json.loads((folder / "config.json").read_text())
    assert written["scaling_factor"] == cfg["scaling_factor"]
    assert written["shift_factor"] == cfg.get("shift_factor")
    assert written["force_upcast"] == cfg.get("force_upcast", True)


def test_single_file_loads_via_from_single_file(tmp_path):
    vae = _vae(SD_LIKE)
    single = save_single_file(vae, tmp_path / "x.vae.safetensors")
    folder = save_diffusers_folder(vae, tmp_path / "cfg")
    loaded = AutoencoderKL.from_single_file(str(single), config=str(folder), local_files_only=True)
    for (k, v), (k2, v2) in zip(vae.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def test_diffusers_to_ldm_rejects_foreign_keys():
    with pytest.raises(ValueError, match="cannot export VAE key 'unet.conv_in.weight'"):
        diffusers_to_ldm({"unet.conv_in.weight": torch.zeros(1)}, 4)


def test_export_in_fp16_leaves_live_model_fp32(tmp_path):
    vae = _vae(FLUX_LIKE)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    save_single_file(vae, tmp_path / "h.vae.safetensors", dtype=torch.float16)
    save_diffusers_folder(vae, tmp_path / "h", dtype=torch.float16)
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in vae.state_dict().items())
    assert load_file(tmp_path / "h.vae.safetensors")["decoder.conv_in.weight"].dtype == torch.float16
    # overwriting an existing export replaces it and leaves no temporary siblings
    save_diffusers_folder(vae, tmp_path / "h")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h", "h.vae.safetensors"]


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_load_vae_from_single_file_and_full_checkpoint(tmp_path, prefix):
    vae = _vae(SD_LIKE, seed=3)
    ldm = diffusers_to_ldm(vae.state_dict(), 3)
    full = {prefix + k: v.contiguous() for k, v in ldm.items()}
    if prefix:  # a full SD checkpoint also holds UNet and text encoder weights and training leftovers
        full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2)
        full["cond_stage_model.transformer.x"] = torch.zeros(2)
    else:
        full["loss.logvar"] = torch.zeros(())
        full["model_ema.decay"] = torch.tensor(0.999)
    path = tmp_path / ("sd.safetensors" if prefix else "v.ckpt")
    if prefix:
        save_file(full, path)
    else:
        torch.save({"state_dict": full}, path)
    loaded = load_vae(path, scaling_factor=0.18215, norm_num_groups=4)
    assert list(loaded.config.block_out_channels) == [8, 16, 16]
    for k, v in vae.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_load_vae_errors_name_path_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path='.*missing.safetensors'"):
        load_vae(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_file({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="model.path='.*bad.safetensors': not a VAE"):
        load_vae(bad)


def test_layout_check_names_both_sides():
    vae = _vae(FLUX_LIKE)
    with pytest.raises(ValueError, match="has 16 latent channels but the config expects 4"):
        check_vae_layout(vae, 4, None, "x.safetensors")
    with pytest.raises(ValueError, match="without quant convs.*expects one with quant convs"):
        check_vae_layout(vae, 16, True, "x.safetensors")
    check_vae_layout(vae, 16, False, "x.safetensors")
    assert ldm_vae_config(diffusers_to_ldm(vae.state_dict(), 2), 4)["use_quant_conv"] is False
