"""`hyperlit eval-vae`: metrics against direct computations, the protocol's crop, models side by side, the colour
warning, the panel, --fail-if-worse and errors at the door."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.vae import SAMPLE, fitted_tiny_vae, pull_to_grey
from PIL import Image
from scipy import linalg
from scipy.signal import convolve2d

from hyperlit.cli import main
from hyperlit.models.loader import TINY_BASE_DIR
from hyperlit.vae.colour import ColourLimits, colour_stats, compare_colours
from hyperlit.vae.evaluate import load_eval_images
from hyperlit.vae.export import save_diffusers_folder
from hyperlit.vae.inception import FIDInceptionV3
from hyperlit.vae.lpips import LPIPS, vgg16_features

RES = 16


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["eval-vae", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vaes")
    fitted = save_diffusers_folder(fitted_tiny_vae(), root / "fitted")
    grey = save_diffusers_folder(pull_to_grey(fitted_tiny_vae()), root / "grey")
    return {"fitted": fitted, "grey": grey}


def protocol_crop(path: Path, size: int) -> np.ndarray:
    """Resize the short side to ``size`` (bicubic) and centre-crop, computed here with PIL alone."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = size / min(w, h)
    rw, rh = round(w * s), round(h * s)
    img = img.resize((rw, rh), Image.BICUBIC)
    left, top = (rw - size) // 2, (rh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def direct_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Gaussian SSIM (11×11, σ 1.5) on HxWx3 floats in [0, 1] at every pixel (borders reflect-padded, as
    torchmetrics does), mean over pixels and channels."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    k = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for c in range(3):
        x, y = (np.pad(v[..., c], 5, mode="reflect") for v in (a, b))
        mx, my = convolve2d(x, k, "valid"), convolve2d(y, k, "valid")
        sxx = convolve2d(x * x, k, "valid") - mx * mx
        syy = convolve2d(y * y, k, "valid") - my * my
        sxy = convolve2d(x * y, k, "valid") - mx * my
        values.append((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))).mean())
    return float(np.mean(values))


def direct_scores(reference: np.ndarray, image: np.ndarray, lpips) -> tuple[float, float, float]:
    """PSNR, SSIM and LPIPS of an 8-bit image against its 8-bit reference, each computed here directly."""
    a, b = reference.astype(np.float64) / 255, image.astype(np.float64) / 255
    ta, tb = (torch.from_numpy(v).permute(2, 0, 1)[None].float() * 2 - 1 for v in (a, b))
    return 10 * np.log10(1.0 / np.mean((a - b) ** 2)), direct_ssim(a, b), float(lpips(tb, ta))


def reconstruct_directly(vae, image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].double().div(127.5).sub(1).float()
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample[0]
    return np.clip(np.round((y.permute(1, 2, 0).numpy().astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)


def test_protocol_resizes_short_side_and_centre_crops(tmp_path: Path) -> None:
    stripes = np.zeros((40, 80, 3), np.uint8)
    stripes[:, :20] = (255, 0, 0)
    stripes[:, 20:60] = (0, 255, 0)
    stripes[:, 60:] = (0, 0, 255)
    Image.fromarray(stripes).save(tmp_path / "wide.png")
    images = load_eval_images(tmp_path, RES)
    got = images.pixels[0].permute(1, 2, 0).numpy()
    assert got.shape == (RES, RES, 3)
    np.testing.assert_array_equal(got, protocol_crop(tmp_path / "wide.png", RES))
    assert tuple(got[RES // 2, RES // 2]) == (0, 255, 0) and got[:, :, 0].max() < 40  # the red edge is cut off


def test_metrics_equal_a_direct_computation(tmp_path: Path, models, capsys) -> None:
    vgg = tmp_path / "vgg16.safetensors"
    from safetensors.torch import save_file

    torch.manual_seed(1)
    save_file({f"features.{k}": v.contiguous() for k, v in vgg16_features().state_dict().items()}, str(vgg))
    code, out, _ = run(
        capsys,
        "--data",
        str(SAMPLE),
        "--model-path",
        str(models["fitted"]),
        "--resolution",
        str(RES),
        "--limit",
        "5",
        "--lpips-weights",
        str(vgg),
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert report["images"] == 5 and report["resolution"] == RES
    score = report["models"][0]

    vae = fitted_tiny_vae()
    lpips = LPIPS(weights=vgg)
    paths = sorted(SAMPLE.glob("*.png"))[:5]
    psnrs, ssims, lps = [], [], []
    for p in paths:
        x = protocol_crop(p, RES)
        for scores, value in zip(
            (psnrs, ssims, lps), direct_scores(x, reconstruct_directly(vae, x), lpips), strict=True
        ):
            scores.append(value)
    assert score["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-3)
    assert score["ssim"] == pytest.approx(np.mean(ssims), abs=1e-4)
    assert score["lpips"] == pytest.approx(np.mean(lps), rel=1e-4)
    assert 10 < score["psnr"] < 60  # a real reconstruction, not identity and not noise


def test_model_tiny_is_the_embedded_base_vae_that_model_tiny_trains_from(capsys) -> None:
    """--model tiny scores the base's VAE (the one `python train.py --config-name vae` fine-tunes): the same row as
    that folder given by path, and a real reconstruction of the shapes it was trained on, unlike the random one."""
    base = str(TINY_BASE_DIR / "vae")
    args = ("--data", str(SAMPLE), "--model", "tiny", "--model", "tiny-random", "--model-path", base,
            "--resolution", "64", "--limit", "4")  # fmt: skip
    code, out, _ = run(capsys, *args)
    assert code == 0
    rows = {line.split()[0]: line.split()[1:-1] for line in out.splitlines() if line.startswith(("tiny", base))}
    assert rows["tiny"] == rows[base]  # every figure but the time per image
    assert float(rows["tiny"][0]) > 20 and float(rows["tiny-random"][0]) < 12


def test_two_models_side_by_side_and_fail_if_worse(models, capsys, tmp_path: Path) -> None:
    fitted = str(models["fitted"])
    args = ("--data", str(SAMPLE), "--model", "tiny-random", "--model-path", fitted, "--resolution", str(RES),
            "--limit", "4")  # fmt: skip
    code, out, _ = run(capsys, *args)
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("tiny-random", fitted))}
    assert set(rows) == {"tiny-random", fitted}
    assert "resized to 16 px (bicubic), centre crop 16x16" in out  # the protocol is printed with the table
    assert float(rows[fitted][1]) > float(rows["tiny-random"][1]) + 5  # the fitted VAE reconstructs, the random not

    code, out, _ = run(capsys, *args, "--fail-if-worse", fitted)
    assert code == 1 and "worse than" in out and "tiny-random: PSNR" in out
    code, _, _ = run(capsys, *args, "--fail-if-worse", "tiny-random")
    assert code == 0
    # a tolerance larger than the gap accepts the worse model
    code, _, _ = run(capsys, *args, "--fail-if-worse", fitted, "--psnr-tolerance", "100")
    assert code == 0


@pytest.fixture(scope="module")
def base_vaes(tmp_path_factory) -> dict[str, Path]:
    """The embedded tiny base's VAE (trained on the shapes the sample set shows) and a copy pulled toward grey."""
    from diffusers import AutoencoderKL

    from hyperlit.models.loader import TINY_BASE_DIR

    grey = pull_to_grey(AutoencoderKL.from_pretrained(TINY_BASE_DIR / "vae"))
    return {"fitted": TINY_BASE_DIR / "vae", "grey": save_diffusers_folder(grey, tmp_path_factory.mktemp("grey"))}


def test_colour_warning_on_a_greyed_decoder_only(base_vaes, capsys) -> None:
    models = base_vaes
    code, out, _ = run(
        capsys,
        "--data",
        str(SAMPLE),
        "--model-path",
        str(models["fitted"]),
        "--model-path",
        str(models["grey"]),
        "--resolution",
        "64",
        "--json",
    )
    assert code == 0
    fitted, grey = json.loads(out)["models"]
    assert fitted["warnings"] == []
    assert any(w.startswith("desaturates") for w in grey["warnings"])
    assert any(w.startswith("loses contrast") for w in grey["warnings"])
    assert grey["colour"]["saturation_ratio"] < 0.85 <= fitted["colour"]["saturation_ratio"]


def test_colour_statistics_values() -> None:
    img = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    img[0, 0] = 255  # pure red: saturation 1
    img[0, :, 1, 1] = 128  # one grey pixel: saturation 0
    s = colour_stats(img)
    assert s.saturation == pytest.approx(0.75)
    assert s.mean[0] == pytest.approx((3 * 255 + 128) / 4 / 255)
    luma = np.array([0.299, 0.299, 0.299, 128 / 255])
    assert s.contrast == pytest.approx(luma.std())
    grey = colour_stats(torch.full((1, 3, 2, 2), 128, dtype=torch.uint8))
    check = compare_colours(s, grey, ColourLimits())
    assert check.saturation_ratio == 0 and any("shifts colour" in w for w in check.warnings)


def test_panel_shows_each_models_worst_images(models, capsys, tmp_path: Path) -> None:
    panel = tmp_path / "worst.png"
    code, out, _ = run(
        capsys,
        "--data",
        str(SAMPLE),
        "--model",
        "tiny",
        "--model-path",
        str(models["fitted"]),
        "--resolution",
        str(RES),
        "--limit",
        "6",
        "--panel",
        str(panel),
        "--panel-count",
        "2",
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    rows = report["panel"]["rows"]
    expected = []
    for m in report["models"]:
        expected += [n for n in m["worst"][:2] if n not in expected]
    assert rows == expected and 2 <= len(rows) <= 4
    grid = np.asarray(Image.open(panel))
    assert grid.shape == (RES * len(rows), RES * 3, 3)  # input | tiny | fitted
    np.testing.assert_array_equal(grid[:RES, :RES], protocol_crop(SAMPLE / rows[0], RES))
    expected = reconstruct_directly(fitted_tiny_vae(), protocol_crop(SAMPLE / rows[0], RES))
    np.testing.assert_array_equal(grid[:RES, 2 * RES :], expected)


def test_bad_images_are_skipped_and_counted(tmp_path: Path, models, capsys) -> None:
    for p in sorted(SAMPLE.glob("*.png"))[:3]:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code, out, _ = run(
        capsys, "--data", str(tmp_path), "--model-path", str(models["fitted"]), "--resolution", str(RES), "--json"
    )
    assert code == 0
    report = json.loads(out)
    assert report["images"] == 3 and report["bad_input"] == {"not_an_image": 1}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model-path", "/nonexistent/vae"], "--model-path='/nonexistent/vae': no such file"),
        (["--model", "tiny", "--resolution", "30"], "--resolution: 30 is not allowed"),
        (
            ["--model", "tiny", "--fail-if-worse", "other"],
            "--fail-if-worse='other': no such file or folder, and not a --model name",
        ),
        (["--model", "tiny", "--inception-weights", "/nonexistent.pth"], "--inception-weights='/nonexistent.pth'"),
        ([], "no model given"),
    ],
)
def test_errors_at_the_door_before_any_model_loads(extra, message, capsys, monkeypatch) -> None:
    def no_load(*_a, **_k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr("hyperlit.models.tiny.build_tiny", no_load)
    monkeypatch.setattr("hyperlit.vae.load.load_vae", no_load)
    code, _, err = run(capsys, "--data", str(SAMPLE), *extra)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.slow
def test_rfid_equals_the_frechet_formula_on_the_same_features(tmp_path: Path, models, capsys) -> None:
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():  # random but non-degenerate BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    code, out, _ = run(
        capsys,
        "--data",
        str(SAMPLE),
        "--model-path",
        str(models["fitted"]),
        "--resolution",
        str(RES),
        "--limit",
        "6",
        "--inception-weights",
        str(weights),
        "--json",
    )
    assert code == 0
    rfid = json.loads(out)["models"][0]["rfid"]

    vae = fitted_tiny_vae()
    real = np.stack([protocol_crop(p, RES) for p in sorted(SAMPLE.glob("*.png"))[:6]])
    fake = np.stack([reconstruct_directly(vae, x) for x in real])
    with torch.no_grad():
        f_real, f_fake = (net(torch.from_numpy(a).permute(0, 3, 1, 2)).double().numpy() for a in (real, fake))
    mu1, mu2 = f_real.mean(0), f_fake.mean(0)
    s1, s2 = np.cov(f_real, rowvar=False), np.cov(f_fake, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert rfid == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert rfid > 0
