"""`eval-vae`'s parts called directly, each against a reference computed another way: the table written out by hand,
--fail-if-worse's lines at its tolerances, the protocol's folder walk and refusals, one model's scores from a
stand-in VAE whose reconstructions are known (PSNR in numpy, the colour statistics of the targets, the rFID and LPIPS
calls recorded), the reference model's reconstructions batch by batch, the tiny autoencoder finder's verdicts on
every kind of path, and the decoder-alone reconstruction in the file's or the teacher's latent scale."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging
from helpers.taesd import textured_taesd
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from hyperlit.data.images import BadImage, decode_image
from hyperlit.data.skips import SkipLog
from hyperlit.vae import evaluate as ev
from hyperlit.vae import taesd_read
from hyperlit.vae.colour import ColourAccumulator, ColourCheck, ColourLimits, colour_stats
from hyperlit.vae.describe import read_shapes
from hyperlit.vae.evaluate import (
    EvalImages,
    ModelScore,
    evaluate,
    format_table,
    half_copy,
    load_eval_images,
    reconstruct,
    save_png,
    score_model,
    with_reference,
    worse_than,
)
from hyperlit.vae.export import save_diffusers_folder
from hyperlit.vae.metrics import lpips_per_image, psnr_per_image, to_uint8, unit
from hyperlit.vae.taesd_eval import TinyReconstruction, tiny_reconstruction
from hyperlit.vae.taesd_layout import save_taesd_files
from hyperlit.vae.taesd_read import TRAINED_PARTS, TAESDSource, find_taesd, load_taesd

# ---------------------------------------------------------------------------------------------------- stand-ins


class ShiftVAE(nn.Module):
    """A stand-in AutoencoderKL: the posterior mode is the input, the decode adds ``offset`` (per image: a list)."""

    def __init__(self, offsets: list[float]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.offsets = offsets
        self.seen: list[int] = []

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z):
        self.seen.append(len(z))
        start = sum(self.seen[:-1]) % len(self.offsets)  # each pass over the images starts again
        shift = torch.tensor(self.offsets[start : start + len(z)], dtype=z.dtype).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=z + shift)


def images_of(pixels: torch.Tensor, reference: torch.Tensor | None = None) -> EvalImages:
    return EvalImages([f"{i}.png" for i in range(len(pixels))], pixels, pixels.shape[-1], SkipLog(verbose=False),
                      reference, None if reference is None else "ref")  # fmt: skip


def random_pixels(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(20, 236, (n, 3, size, size), generator=g, dtype=torch.uint8)


def hand_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round((x.astype(np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)


def hand_psnr(target: np.ndarray, image: np.ndarray) -> float:
    mse = np.mean((target.astype(np.float64) / 255 - image.astype(np.float64) / 255) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(1 / mse))


def close(a, b) -> bool:
    """Colour statistics equal up to the order the sums were taken in (batch by batch or at once)."""
    return all(
        getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-9, abs=1e-12)
        for f in ("mean", "std", "saturation", "contrast")
    )


def stats(mean=(0.5, 0.5, 0.5), sat: float = 0.4, contrast: float = 0.2):
    return SimpleNamespace(mean=mean, saturation=sat, contrast=contrast)


def score(label: str, psnr: float, lpips: float | None = None, **kw) -> ModelScore:
    colour = kw.pop("colour", None) or ColourCheck(stats(), stats(), 1.0, 1.0, (0.0, 0.0, 0.0))
    return ModelScore(label, "src", psnr, kw.pop("ssim", 0.9), lpips, kw.pop("rfid", None), colour,
                      kw.pop("per_image_psnr", [psnr]), **kw)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the table


def test_the_table_is_every_column_formatted_and_aligned_as_written_out_by_hand():
    a = score("base", 31.256, 0.12345, ssim=0.87654, rfid=12.345, seconds=3.0, per_image_psnr=[30.0, 32.0, 31.0],
              colour=ColourCheck(stats(), stats(), 0.876, 1.234, (0.01, -0.052, 0.03)))  # fmt: skip
    b = score("long-model-name", 8.5, None, ssim=0.5, seconds=0.5, per_image_psnr=[],
              colour=ColourCheck(stats(), stats(), 1.0, 0.5, (0.0, 0.02, -0.01)))  # fmt: skip
    assert format_table([a, b]) == "\n".join(
        [
            "model             PSNR    SSIM   LPIPS   rFID    sat  contrast   shift  s/img",
            "---------------  -----  ------  ------  -----  -----  --------  ------  -----",
            "base             31.26  0.8765  0.1235  12.35  x0.88     x1.23  -0.052  1.000",
            "long-model-name   8.50  0.5000       -      -  x1.00     x0.50  +0.020  0.500",
        ]
    )
    # the fp16 column appears as soon as one model has an fp16 figure; "-" for the others
    b.fp16_psnr = 41.239
    assert format_table([a, b]).splitlines()[0].endswith("s/img  fp16 PSNR")
    assert [line[-9:] for line in format_table([a, b]).splitlines()[2:]] == ["        -", "    41.24"]


def test_infinite_and_missing_figures_are_written_in_lower_case():
    """One exact model has an infinite PSNR; a broken one NaN figures (an fp16 decode that overflowed)."""
    broken = score("x", float("inf"), float("nan"), ssim=float("nan"), rfid=float("nan"), fp16_psnr=float("nan"))
    assert format_table([broken]).splitlines()[2].split() == ["x", "inf", "nan", "nan", "nan", "x1.00", "x1.00",
                                                              "+0.000", "0.000", "nan"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- --fail-if-worse


def test_fail_if_worse_lines_at_and_past_the_tolerances():
    ref = score("ref", 30.0, 0.25)
    at_edges = score("edge", 29.5, 0.5)  # exactly the tolerances below: not worse
    worse = score("bad", 29.25, 0.625)
    no_lpips = score("nolp", 30.0, None)
    assert worse_than([ref, at_edges, no_lpips], "ref", 0.5, 0.25) == []
    assert worse_than([worse, ref, at_edges], "ref", 0.5, 0.25) == [
        "bad: PSNR 29.25 < ref's 30.00 - 0.5",
        "bad: LPIPS 0.6250 > ref's 0.2500 + 0.25",
    ]
    assert worse_than([score("ref", 30.0, None), worse], "ref", 0.5, 0.25) == ["bad: PSNR 29.25 < ref's 30.00 - 0.5"]
    # the defaults: 0.1 dB and 0.005 LPIPS
    assert worse_than([ref, score("a", 29.95, 0.254)], "ref") == []
    assert worse_than([ref, score("b", 29.85, 0.256)], "ref") == [
        "b: PSNR 29.85 < ref's 30.00 - 0.1",
        "b: LPIPS 0.2560 > ref's 0.2500 + 0.005",
    ]
    # a better model is not worse, and the reference is never compared with itself
    assert worse_than([ref, score("good", 40.0, 0.0)], "ref", 0.0, 0.0) == []
    with pytest.raises(ValueError) as error:
        worse_than([ref, worse], "other")
    assert str(error.value) == "--fail-if-worse: 'other' is not one of the evaluated models (ref, bad)"


# ---------------------------------------------------------------------------------------------------- the images


def square_png(path: Path, value: tuple[int, int, int], size: int = 8) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(sum(value))
    array = np.clip(g.integers(-30, 30, (size, size, 3)) + np.array(value), 0, 255).astype(np.uint8)
    Image.fromarray(array).save(path, format="PNG")
    return array


def test_the_folder_walk_sorted_recursive_limited_and_bad_files_counted(tmp_path):
    b = square_png(tmp_path / "b.png", (200, 40, 40))
    a = square_png(tmp_path / "sub" / "a.PNG", (40, 200, 40))  # an upper-case extension is an image too
    c = square_png(tmp_path / "c.png", (40, 40, 200))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rgba = np.dstack([square_png(tmp_path / "x.png", (90, 90, 90)), np.full((8, 8), 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")

    images = load_eval_images(tmp_path, 8)
    assert images.names == ["b.png", "c.png", "sub/a.PNG", "x.png"]
    assert images.resolution == 8 and images.reference is None and images.targets is images.pixels
    for got, want in zip(images.pixels, (b, c, a, rgba[..., :3]), strict=True):
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), want)  # 8 px images: no resize, no crop
    assert images.skips.counts == {"not_an_image": 1, "converted_alpha": 1}
    with pytest.raises(BadImage) as bad:  # the decoder's own words, as the report's example
        decode_image(b"not a png")
    assert images.skips.examples == {
        "not_an_image": [f"{tmp_path / 'broken.png'}: {bad.value.detail}"],
        "converted_alpha": [str(tmp_path / "x.png")],
    }
    assert images.protocol() == (
        "4 images; short side resized to 8 px (bicubic), centre crop 8x8; posterior mode; fp32 decode; outputs "
        "rounded to 8 bits; PSNR/SSIM on [0, 1]; metrics against the inputs; bad input: converted_alpha=1 "
        "(repaired), not_an_image=1 (skipped)"
    )
    limited = load_eval_images(tmp_path, 8, limit=2)
    assert limited.names == ["b.png", "c.png"] and len(limited.pixels) == 2
    referenced = EvalImages(images.names, images.pixels, 8, images.skips, images.pixels.flip(0), "ref.safetensors")
    assert "metrics against ref.safetensors's own reconstruction of each input (posterior mode, 8 bits)" in (
        referenced.protocol()
    )
    assert referenced.targets is referenced.reference


def test_bad_files_are_counted_for_the_report_not_logged_as_warnings(tmp_path, caplog):
    square_png(tmp_path / "a.png", (10, 20, 30))
    (tmp_path / "broken.png").write_bytes(b"nope")
    with caplog.at_level(logging.DEBUG):
        images = load_eval_images(tmp_path, 8)
    assert images.skips.counts == {"not_an_image": 1}
    assert [r.levelno for r in caplog.records if "broken.png" in r.getMessage()] == [logging.DEBUG]


def test_the_folder_and_resolution_are_refused_with_what_is_allowed(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_eval_images(tmp_path / "missing", 8)
    assert str(error.value) == f"--data={str(tmp_path / 'missing')!r}: not a folder of images"
    for bad in (0, 4, 12):
        with pytest.raises(ValueError) as error:
            load_eval_images(tmp_path, bad)
        assert str(error.value) == f"--resolution: {bad} is not allowed; a multiple of 8, at least 8"
    (tmp_path / "broken.png").write_bytes(b"nope")
    with pytest.raises(ValueError) as error:
        load_eval_images(tmp_path, 8)
    assert str(error.value).startswith(f"--data={str(tmp_path)!r}: no usable images (")
    with pytest.raises(BadImage) as bad:
        decode_image(b"nope")
    assert str(error.value).splitlines()[1] == f"  not_an_image: 1  e.g. {tmp_path / 'broken.png'}: {bad.value.detail}"


# ---------------------------------------------------------------------------------------------------- one model


def test_one_models_scores_against_numpy_and_the_calls_it_makes(monkeypatch):
    pixels = random_pixels(5)
    offsets = [0.0, 0.1, -0.18, 0.05, 0.3]  # image 0 exact (inf PSNR); x 127.5 none falls on a half level
    vae = ShiftVAE(offsets)
    calls: list = []

    class Recorder:
        def start_model(self) -> None:
            calls.append("start")

        def add_fake(self, y) -> None:
            calls.append(("fake", y.clone()))

        def compute(self) -> float:
            calls.append("compute")
            return 7.5

    lpips_inputs: list = []

    def lpips(pred, target):
        lpips_inputs.append((pred, target))
        return (pred - target).abs().flatten(1).mean(1)

    clock = itertools.cycle([100.0, 104.5])  # each call: start, end
    monkeypatch.setattr(ev.time, "perf_counter", lambda: next(clock))
    result = score_model("m", "path", vae, images_of(pixels), batch_size=2, lpips=lpips, rfid=Recorder())

    x = pixels.numpy().astype(np.float64) / 127.5 - 1
    recon = [hand_uint8(x[i] + offsets[i]) for i in range(5)]
    want_psnr = [hand_psnr(pixels[i].numpy(), recon[i]) for i in range(5)]
    assert want_psnr[0] == float("inf")
    assert result.per_image_psnr == pytest.approx(want_psnr, abs=1e-4)
    assert result.psnr == pytest.approx(np.mean(want_psnr[1:]), abs=1e-4)
    assert (result.label, result.source, result.seconds, result.rfid) == ("m", "path", 4.5, 7.5)
    assert vae.seen == [2, 2, 1]
    assert calls[0] == "start" and calls[-1] == "compute" and len(calls) == 5
    np.testing.assert_array_equal(torch.cat([c[1] for c in calls[1:4]]).numpy(), np.stack(recon).astype(np.uint8))
    want_lpips = [np.abs(recon[i] / 255.0 - pixels[i].numpy() / 255.0).mean() * 2 for i in range(5)]
    assert result.lpips == pytest.approx(np.mean(want_lpips), abs=1e-6)
    assert float(lpips_inputs[0][1].min()) >= -1 and float(lpips_inputs[0][0].max()) <= 1
    # the colour check: the targets' statistics against the reconstructions'
    assert close(result.colour.input, colour_stats(pixels))
    assert close(result.colour.output, colour_stats(torch.from_numpy(np.stack(recon))))
    assert result.worst(2) == sorted(range(5), key=lambda i: want_psnr[i])[:2]
    row = result.to_dict(["n0", "n1", "n2", "n3", "n4"])
    assert (
        row["worst"] == [f"n{i}" for i in sorted(range(5), key=lambda i: want_psnr[i])[:3]]
        and row["psnr"] == result.psnr
        and row["rfid"] == 7.5
    )
    assert (
        row["warnings"] == result.colour.warnings
        and row["colour"]["saturation_ratio"] == result.colour.saturation_ratio
    )
    assert (row["label"], row["source"], row["seconds"], row["fp16_psnr"], row["lpips"]) == (
        "m", "path", 4.5, None, result.lpips)  # fmt: skip
    assert row["ssim"] == result.ssim and 0 < result.ssim < 1

    # every image exact: the mean of nothing finite is inf; no LPIPS and no rFID: None
    exact = score_model("e", "p", ShiftVAE([0.0] * 5), images_of(pixels), batch_size=3)
    assert exact.psnr == float("inf") and exact.ssim == pytest.approx(1.0) and exact.lpips is None
    assert exact.rfid is None


def test_evaluate_scores_every_model_against_the_targets_and_shares_the_real_set():
    pixels = random_pixels(3, seed=1)
    reference = ShiftVAE([0.22, -0.1, 0.0])
    images = with_reference(images_of(pixels), reference, "ref", batch_size=2)
    assert images.reference_source == "ref" and reference.seen == [2, 1]
    x = pixels.numpy().astype(np.float64) / 127.5 - 1
    want_ref = np.stack([hand_uint8(x[i] + d) for i, d in enumerate([0.22, -0.1, 0.0])])
    np.testing.assert_array_equal(images.reference.numpy(), want_ref)
    assert images.pixels is pixels

    reals: list = []
    fakes: list = []

    class Recorder:
        def add_real(self, t) -> None:
            reals.append(t.clone())

        def start_model(self) -> None:
            fakes.append([])

        def add_fake(self, y) -> None:
            fakes[-1].append(y)

        def compute(self) -> float:
            return float(len(fakes))

    models = [("a", "sa", ShiftVAE([0.22, -0.1, 0.0])), ("b", "sb", ShiftVAE([0.0, 0.0, 0.1]))]
    limits = ColourLimits(max_mean_shift=0.0)
    out = evaluate(models, images, batch_size=2, rfid=Recorder(), limits=limits)
    assert [s.label for s in out] == ["a", "b"] and [s.rfid for s in out] == [1.0, 2.0]
    assert models[1][2].seen == [2, 1]  # each model in the batches asked
    assert len(reals) == 2 and torch.equal(torch.cat(reals), images.reference)  # the real set: the targets
    assert out[0].psnr == float("inf")  # model a is the reference itself
    assert out[1].per_image_psnr[2] == pytest.approx(hand_psnr(want_ref[2], hand_uint8(x[2] + 0.1)), abs=1e-4)
    assert close(out[0].colour.input, colour_stats(images.reference)) and out[1].colour.input == out[0].colour.input
    assert any(w.startswith("shifts colour") for w in out[1].colour.warnings)  # the limits reached it
    assert not any(w.startswith("shifts colour") for w in evaluate(models, images)[1].colour.warnings)  # default
    with pytest.raises(ValueError) as error:
        evaluate(models, images_of(pixels[:1]), rfid=Recorder())
    assert str(error.value) == "--inception-weights: rFID needs at least 2 images"
    assert len(evaluate(models[:1], images_of(pixels[:1]))) == 1  # one image is enough without rFID
    assert len(evaluate(models[:1], images_of(pixels[:2]), rfid=Recorder())) == 1  # two are enough with it


def test_a_given_colour_accumulator_is_the_input_side_as_it_stands():
    pixels = random_pixels(2, seed=2)
    other = ColourAccumulator()
    other.update(torch.zeros(1, 3, 4, 4, dtype=torch.uint8) + 128)
    result = score_model("m", "p", ShiftVAE([0.0, 0.0]), images_of(pixels), colour_inputs=other)
    assert result.colour.input == other.result() and not close(other.result(), colour_stats(pixels))


# ---------------------------------------------------------------------------------------------------- small helpers


def test_metric_helpers_against_numpy():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 2.0, -3.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255, 0]  # 127.5 rounds half to even: 128
    assert unit(torch.tensor([0, 51, 255], dtype=torch.uint8)).tolist() == pytest.approx([0.0, 0.2, 1.0])
    a, b = random_pixels(2, seed=3), random_pixels(2, seed=4)
    got = psnr_per_image(a, b)
    assert got.tolist() == pytest.approx([hand_psnr(a[i].numpy(), b[i].numpy()) for i in range(2)], abs=1e-4)
    seen = []
    lpips_per_image(lambda p, t: seen.append((p, t)) or torch.zeros(2), a, b)
    np.testing.assert_allclose(seen[0][0].numpy(), b.numpy() / 127.5 - 1, atol=1e-6)  # the prediction first
    np.testing.assert_allclose(seen[0][1].numpy(), a.numpy() / 127.5 - 1, atol=1e-6)


def test_save_png_writes_the_array_through_a_temporary_name(tmp_path):
    array = random_pixels(1, size=6, seed=5)[0].permute(1, 2, 0).numpy()
    out = save_png(array, tmp_path / "panel.png")
    assert out == tmp_path / "panel.png" and isinstance(out, Path)
    with Image.open(out) as img:
        assert img.format == "PNG"
        np.testing.assert_array_equal(np.asarray(img), array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["panel.png"]


def test_half_copy_is_an_fp16_copy_and_diffusers_verbosity_comes_back():
    model = nn.Linear(2, 2).train()
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.INFO)
    try:
        half = half_copy(model)
        assert diffusers_logging.get_verbosity() == logging.INFO
    finally:
        diffusers_logging.set_verbosity(previous)
    assert half.weight.dtype == torch.float16 and model.weight.dtype == torch.float32
    assert not half.training and model.training
    assert torch.equal(half.weight, model.weight.half())


# ---------------------------------------------------------------------------------------------------- TAESD files


@pytest.fixture(scope="module")
def taesd_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("taesd")
    model = textured_taesd(3)
    save_taesd_files(model, root, "t")
    return root, model


def copy_file(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst


def test_find_taesd_on_every_kind_of_path(tmp_path, taesd_files, monkeypatch):
    root, _ = taesd_files
    key = "--k"
    # a decoder beside its encoder, either suffix; the same suffix is preferred
    dec = copy_file(root / "t_decoder.pth", tmp_path / "a" / "n_decoder.pth")
    enc_st = copy_file(root / "t_encoder.safetensors", tmp_path / "a" / "n_encoder.safetensors")
    found = find_taesd(dec, key)
    assert found == TAESDSource(dec, 4, decoder=dec, encoder=enc_st)
    assert found.has_encoder and found.describe() == "TAESD decoder + n_encoder.safetensors, 4 latent channels"
    enc_pth = copy_file(root / "t_encoder.pth", tmp_path / "a" / "n_encoder.pth")
    assert find_taesd(dec, key).encoder == enc_pth
    assert find_taesd(enc_pth, key) == TAESDSource(
        dec, 4, decoder=dec, encoder=enc_pth
    )  # an encoder brings its decoder
    # a decoder alone; its scale from the metadata, a value that is not a number read as none
    meta = {"hyperlit.source_scaling_factor": "0.25", "hyperlit.source_shift_factor": "bad"}
    alone = tmp_path / "b" / "m_decoder.safetensors"
    alone.parent.mkdir()
    save_file(load_file(root / "t_decoder.safetensors"), str(alone), metadata=meta)
    got = find_taesd(alone, key)
    assert got == TAESDSource(alone, 4, decoder=alone, source_scaling=0.25, source_shift=None)
    assert got.describe() == "TAESD decoder alone, 4 latent channels" and not got.has_encoder
    plain = copy_file(root / "t_decoder.safetensors", tmp_path / "c" / "decoder.safetensors")  # no _decoder stem
    assert find_taesd(plain, key).encoder is None
    # not a TAESD: None
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    assert find_taesd(other, key) is None
    assert find_taesd(copy_file(root / "t_decoder.pth", tmp_path / "d" / "x_decoder.bin"), key) is None
    assert find_taesd(tmp_path / "c", key) is None  # a folder without config.json
    monkeypatch.setattr(taesd_read, "MAX_TORCH_FILE", 100)  # a .pth this large is not unpickled to look
    assert find_taesd(dec, key) is None
    assert find_taesd(plain, key) is not None  # safetensors headers are read whatever the size
    monkeypatch.setattr(taesd_read, "MAX_TORCH_FILE", dec.stat().st_size)  # exactly the limit: still read
    assert find_taesd(dec, key) is not None


def test_find_taesd_refusals_name_the_key_the_path_and_what_is_wrong(tmp_path, taesd_files):
    root, _ = taesd_files

    def refusal(path, error=ValueError) -> str:
        with pytest.raises(error) as caught:
            find_taesd(path, "--k")
        return str(caught.value)

    missing = tmp_path / "missing.safetensors"
    assert refusal(missing, FileNotFoundError) == f"--k={str(missing)!r}: no such file or folder"
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 20)
    with pytest.raises(Exception) as reader:  # what the header reader itself raises, named in the message
        read_shapes(broken)
    assert refusal(broken) == (
        f"--k={str(broken)!r}: cannot be read as weights ({type(reader.value).__name__}: {reader.value})"
    )
    enc = copy_file(root / "t_encoder.pth", tmp_path / "e" / "z_encoder.pth")
    assert refusal(enc) == (
        f"--k={str(enc)!r}: a TAESD encoder alone; give its decoder (<name>_decoder.safetensors/.pth beside it), "
        "which brings this encoder along"
    )
    # an unreadable partner is named with the key too, from either side
    enc_of_broken = copy_file(root / "t_encoder.pth", tmp_path / "u" / "b_encoder.pth")
    (tmp_path / "u" / "b_decoder.pth").write_bytes(b"\x00" * 20)
    assert refusal(enc_of_broken).startswith(f"--k={str(tmp_path / 'u' / 'b_decoder.pth')!r}: cannot be read as ")
    dec_of_broken = copy_file(root / "t_decoder.pth", tmp_path / "s" / "c_decoder.pth")
    (tmp_path / "s" / "c_encoder.pth").write_bytes(b"\x00" * 20)
    assert refusal(dec_of_broken).startswith(f"--k={str(tmp_path / 's' / 'c_encoder.pth')!r}: cannot be read as ")
    dec = copy_file(root / "t_decoder.pth", tmp_path / "w" / "y_decoder.pth")
    copy_file(root / "t_decoder.pth", tmp_path / "w" / "y_encoder.pth")
    assert refusal(dec) == f"--k={str(dec)!r}: y_encoder.pth beside it is not a TAESD encoder for 4 latent channels"
    save_taesd_files(textured_taesd(0, 16), tmp_path / "v", "q", ("encoder",))
    dec16 = copy_file(root / "t_decoder.pth", tmp_path / "v" / "q_decoder.pth")
    assert "q_encoder.pth beside it is not a TAESD encoder for 4 latent channels" in refusal(dec16)


def test_folders_by_config_and_trained_parts(tmp_path):
    model = textured_taesd(1, 3)
    meta = {"hyperlit.source_scaling_factor": "0.5", "hyperlit.source_shift_factor": "0.125"}
    both = save_diffusers_folder(model, tmp_path / "both", metadata=meta)
    assert find_taesd(both, "--k") == TAESDSource(both, 3, folder=both, encoder=both, source_scaling=0.5,
                                                  source_shift=0.125)  # fmt: skip
    assert find_taesd(both, "--k").describe() == "AutoencoderTiny folder, 3 latent channels"
    dec = save_diffusers_folder(model, tmp_path / "dec", metadata={TRAINED_PARTS: "decoder"})
    got = find_taesd(dec, "--k")
    assert got == TAESDSource(dec, 3, folder=dec, encoder=None)
    assert got.describe() == "AutoencoderTiny folder (decoder only: its encoder never trained), 3 latent channels"
    enc = save_diffusers_folder(model, tmp_path / "enc", metadata={TRAINED_PARTS: "encoder"})
    with pytest.raises(ValueError) as error:
        find_taesd(enc, "--k")
    assert str(error.value) == f"--k={str(enc)!r}: this AutoencoderTiny's decoder never trained (metadata ['encoder'])"
    config = json.loads((both / "config.json").read_text())
    del config["latent_channels"]  # diffusers' default: 4
    (tmp_path / "nolc").mkdir()
    (tmp_path / "nolc" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError) as error:
        find_taesd(tmp_path / "nolc", "--k")
    assert str(error.value) == f"--k={str(tmp_path / 'nolc')!r}: an AutoencoderTiny folder without " + (
        "diffusion_pytorch_model.safetensors"
    )
    copy_file(both / "diffusion_pytorch_model.safetensors", tmp_path / "nolc" / "diffusion_pytorch_model.safetensors")
    assert find_taesd(tmp_path / "nolc", "--k").latent_channels == 4
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), bin_folder / "diffusion_pytorch_model.bin")
    assert find_taesd(bin_folder, "--k") == TAESDSource(bin_folder, 4, folder=bin_folder, encoder=bin_folder)
    for text in ("{not json", json.dumps([1]), json.dumps({"_class_name": "AutoencoderKL"})):
        (tmp_path / "nolc" / "config.json").write_text(text)
        assert find_taesd(tmp_path / "nolc", "--k") is None


def test_load_taesd_reads_each_half_and_keeps_a_fresh_one_where_a_file_is_missing(tmp_path, taesd_files):
    root, model = taesd_files
    pair = find_taesd(root / "t_decoder.safetensors", "--k")
    loaded = load_taesd(pair, "--k")
    assert not loaded.training
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    dec = copy_file(root / "t_decoder.safetensors", tmp_path / "only_decoder.safetensors")
    alone = load_taesd(find_taesd(dec, "--k"), "--k")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in alone.state_dict().items() if k.startswith("decoder"))
    assert not torch.equal(alone.encoder.layers[-1].weight, model.encoder.layers[-1].weight)
    folder = save_diffusers_folder(model, tmp_path / "f")
    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.INFO)
    try:
        from_folder = load_taesd(find_taesd(folder, "--k"), "--k")
        assert diffusers_logging.get_verbosity() == logging.INFO
    finally:
        diffusers_logging.set_verbosity(previous)
    assert not from_folder.training and torch.equal(
        from_folder.decoder.layers[-1].weight, model.decoder.layers[-1].weight
    )
    gone = copy_file(root / "t_decoder.pth", tmp_path / "gone_decoder.pth")
    source = find_taesd(gone, "--k")
    gone.unlink()  # replaced after the check at the door: the error still names the key
    for load in (load_taesd, tiny_reconstruction):
        with pytest.raises(FileNotFoundError) as error:
            load(source, "--k")
        assert str(error.value) == f"--k={str(gone)!r}: file not found"
    wrong = TAESDSource(root / "t_encoder.pth", 4, decoder=root / "t_encoder.pth")
    with pytest.raises(ValueError) as error:
        load_taesd(wrong, "--k")
    assert str(error.value) == f"--k={str(root / 't_encoder.pth')!r}: not a TAESD decoder in madebyollin's layout"


# ---------------------------------------------------------------------------------------------------- decoder alone


def teacher_vae(blocks: int = 4, channels: int = 4, scaling: float = 0.3, shift: float | None = 0.2) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=channels, norm_num_groups=4,
        layers_per_block=1, scaling_factor=scaling, shift_factor=shift,
    ).eval()  # fmt: skip


def test_a_decoder_alone_decodes_the_teachers_mode_in_the_files_scale_or_the_teachers(tmp_path, taesd_files):
    root, model = taesd_files
    dec = copy_file(root / "t_decoder.safetensors", tmp_path / "d_decoder.safetensors")
    source = find_taesd(dec, "--k")
    teacher = teacher_vae()
    x = random_pixels(1, 16).float() / 127.5 - 1
    with torch.no_grad():
        mode = teacher.encode(x).latent_dist.mode()
        for src, scaling, shift in ((source, 0.3, 0.2), (TAESDSource(dec, 4, decoder=dec, source_scaling=2.0,
                                                                     source_shift=-0.5), 2.0, -0.5)):  # fmt: skip
            rec = tiny_reconstruction(src, "--k", teacher, "the VAE")
            assert isinstance(rec, TinyReconstruction) and not rec.training and rec.teacher is teacher
            assert torch.equal(rec.latents(x), (mode - shift) * scaling)
            assert torch.allclose(rec(x), model.decode((mode - shift) * scaling).sample, atol=1e-6)
        bf16 = teacher_vae().to(torch.bfloat16)  # the teacher's own dtype: the images are cast to it
        want = (bf16.encode(x.to(torch.bfloat16)).latent_dist.mode().float() - 0.2) * 0.3
        assert torch.equal(tiny_reconstruction(source, "--k", bf16, "the VAE").latents(x), want)
        no_shift = tiny_reconstruction(source, "--k", teacher_vae(shift=None), "the VAE")
        assert no_shift.shift == 0.0 and no_shift.scaling == 0.3
        pair = tiny_reconstruction(find_taesd(root / "t_decoder.pth", "--k"), "--k")
        assert pair.teacher is None and not pair.training
        assert torch.allclose(pair(x), model.decode(model.encode(x).latents).sample, atol=1e-6)
        assert torch.equal(reconstruct(pair, to_uint8(x)), to_uint8(pair(to_uint8(x).float() / 127.5 - 1)))


def test_a_decoder_alone_is_refused_without_a_teacher_of_its_width_and_factor(tmp_path, taesd_files):
    root, _ = taesd_files
    dec = copy_file(root / "t_decoder.safetensors", tmp_path / "d_decoder.safetensors")
    source = find_taesd(dec, "--k")

    def refusal(teacher) -> str:
        with pytest.raises(ValueError) as error:
            tiny_reconstruction(source, "--k", teacher, "VAE-X")
        return str(error.value)

    where = f"--k={str(dec)!r}"
    assert refusal(None) == (
        f"{where}: a TAESD decoder alone needs latents; list the full VAE it was distilled from too (--model tiny or "
        "--model-path VAE), whose encoder then feeds it"
    )
    assert refusal(teacher_vae(channels=8)) == (
        f"{where}: a TAESD decoder for 4 latent channels cannot decode VAE-X's 8-channel latents"
    )
    assert refusal(teacher_vae(blocks=3)) == (
        f"{where}: a TAESD decoder upsamples 8x, but VAE-X downsamples 4x; list the VAE it was distilled from first"
    )
    tiny_reconstruction(source, "--k", teacher_vae(blocks=4), "VAE-X")  # 4 levels: 8x, accepted
