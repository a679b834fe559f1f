"""TAESD files: madebyollin's layout read by a reference module written here, the diffusers folder, inspect."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from hyperlit.cli import main
from hyperlit.vae.export import save_diffusers_folder
from hyperlit.vae.taesd_layout import (
    from_madebyollin,
    load_taesd_part,
    match_layout,
    save_taesd_files,
    tiny_autoencoder,
    to_madebyollin,
)

# ---------------------------------------------------------------- the reference, from the published layout facts
# madebyollin's taesd.py (README "Internally, TAESD is a bunch of Conv+Relu resblocks and 2x upsample layers"):
# every conv is 3x3 padding 1 unless said; a residual block is Sequential(conv, ReLU, conv, ReLU, conv) named `conv`,
# a 1x1 bias-free `skip` when widths differ, then a ReLU named `fuse` on the sum. Encoder: conv(3, 64), block,
# then three times [conv(64, 64, stride 2, no bias), block x3], then conv(64, C). Decoder: a tanh(x/3)*3 clamp,
# conv(C, 64), ReLU, then three times [block x3, nearest 2x upsample, conv(64, 64, no bias)], then block,
# conv(64, 3). Images in [0, 1] on both sides.


class RefClamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3.0 * torch.tanh(x / 3.0)


class RefBlock(nn.Module):
    def __init__(self, c: int = 64) -> None:
        super().__init__()
        layers = [nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
        self.conv = nn.Sequential(*layers, nn.Conv2d(c, c, 3, padding=1))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.skip(x) + self.conv(x))


def reference_encoder(c: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1), RefBlock()]
    for _ in range(3):
        layers += [nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False), RefBlock(), RefBlock(), RefBlock()]
    return nn.Sequential(*layers, nn.Conv2d(64, c, 3, padding=1))


def reference_decoder(c: int) -> nn.Sequential:
    layers: list[nn.Module] = [RefClamp(), nn.Conv2d(c, 64, 3, padding=1), nn.ReLU()]
    for _ in range(3):
        layers += [RefBlock(), RefBlock(), RefBlock(), nn.Upsample(scale_factor=2)]
        layers.append(nn.Conv2d(64, 64, 3, padding=1, bias=False))
    return nn.Sequential(*layers, RefBlock(), nn.Conv2d(64, 3, 3, padding=1))


def trained_like(latent_channels: int, seed: int = 0) -> AutoencoderTiny:
    """A tiny autoencoder with every weight drawn at a visible scale (so a swapped layer changes the output)."""
    torch.manual_seed(seed)
    model = tiny_autoencoder(latent_channels)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return model.eval()


@pytest.mark.parametrize("channels", [4, 16])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_madebyollin_files_load_into_the_reference_with_the_same_outputs(tmp_path, channels, suffix):
    model = trained_like(channels)
    written = save_taesd_files(model, tmp_path, "taesd", metadata={"hyperlit.source_scaling_factor": "0.18215"})
    assert sorted(p.name for p in written) == sorted(
        f"taesd_{part}.{ext}" for part in ("encoder", "decoder") for ext in ("safetensors", "pth")
    )
    enc, dec = reference_encoder(channels), reference_decoder(channels)
    for part, ref in (("encoder", enc), ("decoder", dec)):
        path = tmp_path / f"taesd_{part}{suffix}"
        state = load_file(path) if suffix == ".safetensors" else torch.load(path, weights_only=True)
        ref.load_state_dict(state, strict=True)  # every key, every shape: what A1111 / taesd.py do
    images01 = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, channels, 4, 5, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        ours_z = model.encode(images01 * 2 - 1).latents  # diffusers takes [-1, 1]
        ours_x = (model.decode(z).sample + 1) / 2  # and returns [-1, 1]
        ref_z, ref_x = enc(images01), dec(z)
    assert ref_z.shape == (2, channels, 4, 5) and ref_x.shape == (2, 3, 32, 40)
    torch.testing.assert_close(ref_z, ours_z, atol=1e-6, rtol=0)
    torch.testing.assert_close(ref_x, ours_x, atol=1e-6, rtol=0)
    assert ref_x.std() > 0.01 and ref_z.std() > 0.01  # not a degenerate comparison of zeros
    if channels == 4:  # the parameter counts madebyollin's README publishes for taesd's encoder and decoder
        assert sum(p.numel() for p in enc.parameters()) == 1_222_532
        assert sum(p.numel() for p in dec.parameters()) == 1_222_531


def test_file_metadata_and_the_keys_clients_read(tmp_path):
    model = trained_like(4)
    save_taesd_files(
        model, tmp_path, "taesdxl", parts=("decoder",), metadata={"hyperlit.source_scaling_factor": "0.13"}
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taesdxl_decoder.pth", "taesdxl_decoder.safetensors"]
    with safe_open(str(tmp_path / "taesdxl_decoder.safetensors"), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["hyperlit.layout"] == "taesd-decoder" and meta["hyperlit.source_scaling_factor"] == "0.13"
    # the Clamp holds index 0: the first conv is 1, the last 19 (with a bias); no prefix
    assert "0.weight" not in keys and {"1.weight", "1.bias", "3.conv.0.weight", "19.weight", "19.bias"} <= keys
    assert "7.weight" in keys and "7.bias" not in keys  # the bias-free conv after the first upsample
    assert not any(k.startswith(("decoder.", "layers.")) for k in keys)


def test_layout_conversion_round_trip_and_recognition():
    model = trained_like(4)
    sd = model.state_dict()
    for part in ("encoder", "decoder"):
        theirs = to_madebyollin(sd, part)
        back = from_madebyollin(theirs, part)
        assert back.keys() == {k for k in sd if k.startswith(f"{part}.")}
        assert all(torch.equal(back[k], sd[k]) for k in back)
        found = match_layout({k: tuple(v.shape) for k, v in theirs.items()})
        assert found is not None and (found.part, found.latent_channels) == (part, 4)
    decoder = to_madebyollin(sd, "decoder")
    assert match_layout({k: tuple(v.shape) for k, v in list(decoder.items())[:-1]}) is None  # a key missing
    bad = {k: tuple(v.shape) for k, v in decoder.items()} | {"1.weight": (32, 4, 3, 3)}
    assert match_layout(bad) is None  # a wrong width
    with pytest.raises(ValueError, match="not part of madebyollin's TAESD decoder layout"):
        from_madebyollin({"0.weight": torch.zeros(1)}, "decoder")


def test_loading_a_half_checks_part_and_channels():
    model = trained_like(4)
    state = to_madebyollin(model.state_dict(), "decoder")
    fresh = tiny_autoencoder(4)
    load_taesd_part(fresh, state, "decoder", "x.pth")
    assert torch.equal(fresh.decoder.layers[-1].weight, model.decoder.layers[-1].weight)
    with pytest.raises(ValueError, match="x.pth: not a TAESD encoder"):
        load_taesd_part(fresh, state, "encoder", "x.pth")
    with pytest.raises(ValueError, match="for 4 latent channels, but the model has 16"):
        load_taesd_part(tiny_autoencoder(16), state, "decoder", "x.pth")


def test_diffusers_folder_loads_with_from_pretrained_and_decodes_the_same(tmp_path):
    model = trained_like(16)
    folder = save_diffusers_folder(model, tmp_path / "diffusers")
    loaded = AutoencoderTiny.from_pretrained(folder, local_files_only=True).eval()
    cfg = loaded.config
    assert cfg.latent_channels == 16 and cfg.scaling_factor == 1.0 and cfg.shift_factor == 0.0
    assert cfg.latent_magnitude == 3 and cfg.latent_shift == 0.5 and cfg.force_upcast is False
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(z).sample, model.decode(z).sample)
        assert torch.equal(loaded.encode(x).latents, model.encode(x).latents)


def inspect_json(capsys, path) -> dict:
    assert main(["inspect", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_recognises_every_taesd_file(tmp_path, capsys):
    model = trained_like(4)
    save_taesd_files(model, tmp_path, "taesd", metadata={"hyperlit.source_scaling_factor": "0.18215"})
    folder = save_diffusers_folder(model, tmp_path / "diffusers")
    for part in ("encoder", "decoder"):
        for ext in ("safetensors", "pth"):
            info = inspect_json(capsys, tmp_path / f"taesd_{part}.{ext}")
            assert info["kind"] == f"TAESD {part} (madebyollin layout)" and info["layout"] == "taesd"
            assert info["latent_channels"] == 4
            assert info["parameters"] == sum(v.numel() for v in getattr(model, part).state_dict().values())
            if ext == "safetensors":
                assert info["source_scaling_factor"] == pytest.approx(0.18215)
    info = inspect_json(capsys, folder)
    assert info["kind"] == "diffusers folder (AutoencoderTiny)" and info["layout"] == "taesd"
    assert info["scaling_factor"] == 1.0 and info["latent_magnitude"] == 3.0 and info["latent_shift"] == 0.5
    assert info["parameters"] == sum(v.numel() for v in model.state_dict().values())
    assert main(["inspect", str(tmp_path / "taesd_decoder.pth")]) == 0
    table = capsys.readouterr().out
    assert "TAESD decoder (madebyollin layout)" in table and "models/vae_approx" in table
