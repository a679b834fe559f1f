"""`hyperlit inspect` on every VAE kind: diffusers folder, LDM single file, full SD checkpoint, a .vae.pt."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hyperlit.cli import main
from hyperlit.models.tiny import build_tiny
from hyperlit.vae.export import diffusers_to_ldm, save_diffusers_folder, save_single_file


@pytest.fixture(scope="module")
def vae():
    return build_tiny(0)[1]


def inspect_json(capsys, path: Path) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ldm(vae) -> dict[str, torch.Tensor]:
    return diffusers_to_ldm(vae.state_dict(), len(vae.config.up_block_types))


def params(vae) -> int:
    return sum(t.numel() for t in vae.state_dict().values())


def test_diffusers_folder(vae, tmp_path: Path, capsys) -> None:
    folder = save_diffusers_folder(vae, tmp_path / "vae")
    info = inspect_json(capsys, folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert info["kind"] == "diffusers folder" and info["layout"] == "diffusers"
    assert info["latent_channels"] == 4 and info["block_out_channels"] == [16, 32, 32, 32]
    assert info["quant_conv"] and info["post_quant_conv"] and not info["full_checkpoint"]
    assert info["scaling_factor"] == pytest.approx(0.18215) and info["shift_factor"] is None
    assert info["parameters"] == params(vae)
    assert info["sha256"] == sha(weights) and info["a1111_short_hash"] == sha(weights)[:10]
    # the whole model folder (vae/ subfolder) is found too
    (tmp_path / "model").mkdir()
    save_diffusers_folder(vae, tmp_path / "model" / "vae")
    assert inspect_json(capsys, tmp_path / "model")["parameters"] == params(vae)


def test_ldm_single_file_from_the_exporter(vae, tmp_path: Path, capsys) -> None:
    path = save_single_file(vae, tmp_path / "tiny.vae.safetensors")
    info = inspect_json(capsys, path)
    assert info["kind"] == "single-file VAE" and info["layout"] == "ldm" and info["key_prefix"] is None
    assert info["latent_channels"] == 4 and info["block_out_channels"] == [16, 32, 32, 32]
    assert info["scaling_factor"] == pytest.approx(0.18215)  # carried in the exporter's metadata
    assert info["parameters"] == params(vae) and info["dtypes"] == ["float32"]
    assert info["a1111_short_hash"] == sha(path)[:10]


def test_full_checkpoint_with_first_stage_model_prefix(vae, tmp_path: Path, capsys) -> None:
    sd = {f"first_stage_model.{k}": v for k, v in ldm(vae).items()}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 8)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 5}, path)
    info = inspect_json(capsys, path)
    assert info["full_checkpoint"] and info["key_prefix"] == "first_stage_model."
    assert info["kind"].startswith("full SD checkpoint") and info["layout"] == "ldm"
    assert info["parameters"] == params(vae)  # the VAE part only
    assert info["scaling_factor"] is None  # a .ckpt carries none
    assert info["sha256"] == sha(path)


def test_vae_pt_with_training_leftovers(vae, tmp_path: Path, capsys) -> None:
    sd = ldm(vae)
    sd["loss.logvar"] = torch.zeros(())
    sd["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / "tiny.vae.pt"
    torch.save(sd, path)
    info = inspect_json(capsys, path)
    assert info["kind"] == "single-file VAE" and info["parameters"] == params(vae)
    assert info["training_leftovers"] == 2
    # the table form names the layout and says the factors are not carried
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layout" in out and "ldm" in out and "not carried" in out and f"{params(vae):,}" in out


def test_diffusers_layout_single_file_and_16_channel_vae(tmp_path: Path, capsys) -> None:
    from diffusers import AutoencoderKL

    flux = AutoencoderKL(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    path = tmp_path / "flux.safetensors"
    save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, str(path))
    info = inspect_json(capsys, path)
    assert info["layout"] == "diffusers" and info["latent_channels"] == 16
    assert not info["quant_conv"] and not info["post_quant_conv"] and info["block_out_channels"] == [8, 16]


def test_pickled_code_is_never_executed(tmp_path: Path, capsys) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"decoder.conv_in.weight": torch.zeros(1), "obj": Path("x")}, path)  # needs unpickling a class
    assert main(["inspect", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err
