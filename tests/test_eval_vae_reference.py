"""`eval-vae --reference-model REF`: every metric (PSNR, SSIM, LPIPS, rFID, colour) compares each model's output with
REF's own reconstruction of the image instead of the image; figures computed here by hand with stand-in VAEs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.taesd import textured_taesd
from helpers.vae import SAMPLE, fitted_tiny_vae, pull_to_grey
from safetensors.torch import save_file
from scipy import linalg
from test_vae_eval import direct_scores, protocol_crop, reconstruct_directly

from hyperlit.cli import main
from hyperlit.models.loader import embedded_tiny_vae
from hyperlit.vae.export import save_diffusers_folder
from hyperlit.vae.lpips import LPIPS, vgg16_features
from hyperlit.vae.taesd_layout import save_taesd_files

RES, LIMIT = 16, 5


@pytest.fixture(scope="module")
def vaes(tmp_path_factory) -> dict[str, Path]:
    """Two stand-ins: a VAE fitted to the sample images (the reference) and the same pulled toward grey."""
    root = tmp_path_factory.mktemp("ref_vaes")
    return {
        "fitted": save_diffusers_folder(fitted_tiny_vae(), root / "fitted"),
        "grey": save_diffusers_folder(pull_to_grey(fitted_tiny_vae()), root / "grey"),
    }


def eval_json(capsys, *argv: str, limit: int = LIMIT, res: int = RES) -> tuple[int, dict]:
    code = main(["eval-vae", "--data", str(SAMPLE), "--resolution", str(res), "--limit", str(limit), "--json", *argv])
    out = capsys.readouterr().out
    return code, json.loads(out) if out else {}


def crops(limit: int = LIMIT, res: int = RES) -> list[np.ndarray]:
    return [protocol_crop(p, res) for p in sorted(SAMPLE.glob("*.png"))[:limit]]


def saturation(images: list[np.ndarray]) -> float:
    """Mean over pixels of (max - min) / max of the RGB values in [0, 1] (0 where max is 0)."""
    x = np.stack(images).astype(np.float64) / 255
    hi, lo = x.max(-1), x.min(-1)
    return float(np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-12), 0).mean())


def test_every_image_metric_is_against_the_reference_models_reconstruction(vaes, tmp_path, capsys) -> None:
    torch.manual_seed(1)
    vgg = tmp_path / "vgg16.safetensors"
    save_file({f"features.{k}": v.contiguous() for k, v in vgg16_features().state_dict().items()}, str(vgg))
    code, report = eval_json(
        capsys, "--model-path", str(vaes["grey"]), "--reference-model", str(vaes["fitted"]), "--lpips-weights", str(vgg)
    )
    assert code == 0
    score = report["models"][0]
    assert report["reference"]["model"] == str(vaes["fitted"])
    assert "own reconstruction of each input" in report["protocol"]

    fitted, grey, lpips = fitted_tiny_vae(), pull_to_grey(fitted_tiny_vae()), LPIPS(weights=vgg)
    refs, outs = [], []
    psnrs, ssims, lps = [], [], []
    for x in crops():
        ref, y = reconstruct_directly(fitted, x), reconstruct_directly(grey, x)
        refs.append(ref)
        outs.append(y)
        for scores, value in zip((psnrs, ssims, lps), direct_scores(ref, y, lpips), strict=True):
            scores.append(value)
    assert score["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-3)
    assert score["ssim"] == pytest.approx(np.mean(ssims), abs=1e-4)
    assert score["lpips"] == pytest.approx(np.mean(lps), rel=1e-4)
    colour = score["colour"]
    assert colour["saturation_ratio"] == pytest.approx(saturation(outs) / saturation(refs), rel=1e-9)
    ref_means = np.stack(refs).astype(np.float64).reshape(-1, 3).mean(0) / 255
    out_means = np.stack(outs).astype(np.float64).reshape(-1, 3).mean(0) / 255
    assert colour["mean_shift"] == pytest.approx(list(out_means - ref_means), abs=1e-9)

    # the same model against the inputs gives other figures: the reference really replaced them
    code, plain = eval_json(capsys, "--model-path", str(vaes["grey"]))
    assert abs(plain["models"][0]["psnr"] - score["psnr"]) > 0.5
    inputs = [x.astype(np.float64) / 255 for x in crops()]
    outs01 = [b.astype(np.float64) / 255 for b in outs]
    direct = [10 * np.log10(1 / np.mean((a - b) ** 2)) for a, b in zip(inputs, outs01, strict=True)]
    assert plain["models"][0]["psnr"] == pytest.approx(np.mean(direct), abs=1e-3)


def test_the_reference_listed_as_a_model_matches_itself(vaes, capsys) -> None:
    fitted = str(vaes["fitted"])
    code, report = eval_json(capsys, "--model-path", fitted, "--model", "tiny", "--reference-model", fitted)
    assert code == 0
    rows = {row["label"]: row for row in report["models"]}
    assert rows[fitted]["psnr"] == float("inf") and rows[fitted]["ssim"] == pytest.approx(1.0)
    assert rows[fitted]["colour"]["mean_shift"] == [0.0, 0.0, 0.0]
    assert 5 < rows["tiny"]["psnr"] < 60


def test_a_taesd_decoder_alone_decodes_the_reference_models_latents(tmp_path, capsys) -> None:
    """The quality goal's measurement: a tiny decoder against the full decoder's image of the same latents."""
    model = textured_taesd(0)
    save_taesd_files(model, tmp_path, "taesd", ("decoder",))
    decoder = tmp_path / "taesd_decoder.safetensors"
    code, report = eval_json(capsys, "--model-path", str(decoder), "--reference-model", "tiny", res=32, limit=3)
    assert code == 0
    row = report["models"][0]
    assert "latents from tiny" in row["source"]
    teacher = embedded_tiny_vae()
    scale, shift = float(teacher.config.scaling_factor), float(teacher.config.shift_factor or 0.0)
    psnrs = []
    for x in crops(3, 32):
        pixels = torch.from_numpy(x).permute(2, 0, 1)[None].double().div(127.5).sub(1).float()
        with torch.no_grad():
            z = teacher.encode(pixels).latent_dist.mode()
            full = teacher.decode(z).sample
            tiny = model.decode((z - shift) * scale).sample
        a, b = (np.round((np.clip(v[0].double().numpy(), -1, 1) + 1) * 127.5) / 255 for v in (full, tiny))
        psnrs.append(10 * np.log10(1 / np.mean((a - b) ** 2)))
    assert row["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-4)


class ChannelMeans(torch.nn.Module):
    """A stand-in feature network with well-spread features: each image's channel means (and their products), so the
    Fréchet distance is far from zero and from its value against the inputs (random Inception features are ~1e-6)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = images.double().mean(dim=(2, 3)) / 255 * 10
        return torch.cat([m, m[:, :1] * m[:, 1:2]], dim=1)


def frechet(f_real: np.ndarray, f_fake: np.ndarray) -> float:
    s1, s2 = np.cov(f_real, rowvar=False), np.cov(f_fake, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((f_real.mean(0) - f_fake.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_rfid_uses_the_reference_reconstructions_as_the_real_set(vaes, tmp_path, capsys, monkeypatch) -> None:
    net = ChannelMeans()
    monkeypatch.setattr("hyperlit.vae.inception.load_inception", lambda _path: net)
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"stand-in")  # the file must exist; the loader is replaced
    argv = ("--model-path", str(vaes["grey"]), "--reference-model", str(vaes["fitted"]))
    code, report = eval_json(capsys, *argv, "--inception-weights", str(weights), limit=8)
    assert code == 0
    fitted, grey = fitted_tiny_vae(), pull_to_grey(fitted_tiny_vae())
    inputs = np.stack(crops(8))
    real = np.stack([reconstruct_directly(fitted, x) for x in inputs])
    fake = np.stack([reconstruct_directly(grey, x) for x in inputs])
    with torch.no_grad():
        f_in, f_real, f_fake = (net(torch.from_numpy(a).permute(0, 3, 1, 2)).numpy() for a in (inputs, real, fake))
    expected = frechet(f_real, f_fake)
    assert report["models"][0]["rfid"] == pytest.approx(expected, rel=1e-4)
    assert abs(frechet(f_in, f_fake) - expected) > 0.05 * expected  # against the inputs it would differ


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("unknown", "--reference-model='sd15': no such file or folder, and not a --model name (tiny, tiny-random)"),
        ("missing", "--reference-model='/nonexistent/vae': no such file or folder"),
        ("tiny_autoencoder", "a tiny autoencoder; the reference is a full VAE's reconstruction"),
    ],
)
def test_bad_reference_is_one_line_before_any_model_loads(case, needle, tmp_path, capsys, monkeypatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr("hyperlit.vae.taesd_eval.load_taesd", refuse)
    monkeypatch.setattr("hyperlit.vae.load.load_vae", refuse)
    monkeypatch.setattr("hyperlit.models.loader.embedded_tiny_vae", refuse)
    if case == "tiny_autoencoder":
        save_taesd_files(textured_taesd(0), tmp_path, "taesd")
        reference = str(tmp_path / "taesd_decoder.safetensors")
    else:
        reference = {"unknown": "sd15", "missing": "/nonexistent/vae"}[case]
    code = main(["eval-vae", "--data", str(SAMPLE), "--model", "tiny", "--reference-model", reference])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err
