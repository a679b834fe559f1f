"""The colour statistics eval-vae reports, against numpy over all pixels at once: batches of any size and shape,
uint8 or float input, and each warning of `compare_colours` at and just past its limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperlit.vae.colour import ColourAccumulator, ColourLimits, ColourStats, colour_stats, compare_colours


def numpy_stats(images: np.ndarray) -> dict:
    """N×3×H×W floats in [0, 1]: the pooled statistics, written from their definitions."""
    px = images.transpose(1, 0, 2, 3).reshape(3, -1)
    hi, lo = px.max(0), px.min(0)
    sat = np.where(hi > 0, (hi - lo) / np.where(hi > 0, hi, 1), 0.0)
    luma = 0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2]
    return {"mean": px.mean(1), "std": px.std(1), "saturation": sat.mean(), "contrast": luma.std()}


def assert_stats(got: ColourStats, want: dict) -> None:
    np.testing.assert_allclose(got.mean, want["mean"], rtol=1e-12)
    np.testing.assert_allclose(got.std, want["std"], rtol=1e-9)
    assert got.saturation == pytest.approx(want["saturation"], rel=1e-12)
    assert got.contrast == pytest.approx(want["contrast"], rel=1e-9)


def test_batches_of_uint8_images_pool_like_all_pixels_at_once():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (n, 3, 5, 9), generator=g, dtype=torch.uint8) for n in (3, 1, 4)]
    batches[1][0, :, :2] = 0  # black pixels: saturation 0 (no division by zero)
    acc = ColourAccumulator()
    for b in batches:
        acc.update(b)
    assert_stats(acc.result(), numpy_stats(torch.cat(batches).double().numpy() / 255.0))


def test_float_images_are_clamped_to_the_unit_range_and_not_rescaled():
    x = torch.rand(2, 3, 6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.6 - 0.3
    assert x.min() < 0 and x.max() > 1
    assert_stats(colour_stats(x.float()), numpy_stats(x.float().double().clamp(0, 1).numpy()))


def test_a_single_pixel_is_enough_and_no_image_is_an_error():
    one = torch.tensor([[[[255]], [[0]], [[51]]]], dtype=torch.uint8)
    s = colour_stats(one)
    assert s.mean == pytest.approx((1.0, 0.0, 0.2)) and s.saturation == 1.0 and s.std == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"^no images were given to the colour statistics$"):
        ColourAccumulator().result()


LIMITS = ColourLimits(
    min_saturation_ratio=0.75, max_saturation_ratio=1.25, min_contrast_ratio=0.5, max_mean_shift=0.125
)  # fmt: skip  (binary fractions: the ratios at the limit are exact)


def stats(saturation: float = 0.5, contrast: float = 0.25, mean=(0.5, 0.5, 0.5)) -> ColourStats:
    return ColourStats(mean=mean, std=(0.1, 0.1, 0.1), saturation=saturation, contrast=contrast)


@pytest.mark.parametrize(
    ("output", "warnings"),
    [
        (stats(saturation=0.375), []),  # exactly 0.75x
        (stats(saturation=0.37), ["desaturates: saturation x0.74 of the input's (limit 0.75)"]),
        (stats(saturation=0.625), []),  # exactly 1.25x
        (stats(saturation=0.63), ["over-saturates: saturation x1.26 of the input's (limit 1.25)"]),
        (stats(contrast=0.125), []),  # exactly 0.5x
        (stats(contrast=0.12), ["loses contrast: contrast x0.48 of the input's (limit 0.5)"]),
        (stats(mean=(0.5, 0.625, 0.5)), []),  # exactly the limit
        (stats(mean=(0.5, 0.5, 0.375)), []),
        (stats(mean=(0.5, 0.63, 0.5)), ["shifts colour: G mean +0.130 (limit ±0.125, in [0, 1] units)"]),
        (stats(mean=(0.37, 0.5, 0.6)), ["shifts colour: R mean -0.130 (limit ±0.125, in [0, 1] units)"]),
    ],
)
def test_each_warning_at_and_just_past_its_limit(output, warnings):
    check = compare_colours(stats(), output, LIMITS)
    assert check.warnings == warnings
    assert check.saturation_ratio == pytest.approx(output.saturation / 0.5)
    assert check.contrast_ratio == pytest.approx(output.contrast / 0.25)
    assert check.mean_shift == pytest.approx(tuple(o - 0.5 for o in output.mean))


def test_grey_or_flat_inputs_give_ratios_without_dividing_by_zero():
    grey_flat = stats(saturation=0.0, contrast=0.0)
    same = compare_colours(grey_flat, grey_flat, LIMITS)
    assert (same.saturation_ratio, same.contrast_ratio, same.warnings) == (1.0, 1.0, [])
    tinted = compare_colours(grey_flat, stats(saturation=0.2, contrast=0.1), LIMITS)
    assert tinted.saturation_ratio == tinted.contrast_ratio == float("inf")
    assert tinted.warnings == ["over-saturates: saturation xinf of the input's (limit 1.25)"]


def test_the_zero_threshold_of_the_ratios_is_1e_12():
    """Below or at 1e-12 an input statistic counts as zero: an output at or below it too is ratio 1, above it inf."""
    at = compare_colours(stats(saturation=1e-12), stats(saturation=1e-12), LIMITS)
    assert at.saturation_ratio == 1.0
    zero_in = compare_colours(stats(saturation=0.0), stats(saturation=1e-12), LIMITS)
    assert zero_in.saturation_ratio == 1.0
    above = compare_colours(stats(saturation=1e-12), stats(saturation=2e-12), LIMITS)
    assert above.saturation_ratio == float("inf")


def test_default_limits_and_the_report_dict():
    assert ColourLimits() == ColourLimits(0.85, 1.20, 0.85, 0.04)
    check = compare_colours(stats(), stats(saturation=0.3))
    d = check.to_dict()
    assert d["saturation_ratio"] == pytest.approx(0.6) and d["warnings"] == check.warnings
    assert d["input"]["mean"] == (0.5, 0.5, 0.5) and d["output"]["saturation"] == 0.3
