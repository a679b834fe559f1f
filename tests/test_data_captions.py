"""Template and tag semantics against A1111's dataset rules, seeded, exact strings."""

from __future__ import annotations

import random

import pytest

from hyperlit.data.captions import (
    TEMPLATE_NAMES,
    decode_caption,
    filename_caption,
    load_template,
    make_prompt,
)


def a1111_reference(lines, caption, name, rng, shuffle, dropout):
    """A1111's create_text order written out step by step: choice, per-tag drop draw, shuffle, join, replace."""
    line = rng.choice(lines)
    kept = []
    for tag in caption.split(","):
        if dropout == 0 or rng.random() > dropout:
            kept.append(tag)
    if shuffle:
        rng.shuffle(kept)
    filewords = ",".join(kept)
    return line.replace("[filewords]", filewords).replace("[name]", name)


def test_every_role_template_exists_and_uses_placeholders():
    for name in TEMPLATE_NAMES:
        lines = load_template(name)
        assert lines and all(line == line.strip() and line for line in lines)
    assert all("[filewords]" in line for line in load_template("style_filewords"))
    assert all("[name]" in line for line in load_template("style_filewords"))
    assert all("[filewords]" not in line for line in load_template("style"))
    assert load_template("none") == ["picture"]


def test_template_from_path_and_missing_template(tmp_path):
    p = tmp_path / "mine.txt"
    p.write_text("  x [name] y [filewords]  \n\n", encoding="utf-8")
    assert load_template(str(p)) == ["x [name] y [filewords]"]
    with pytest.raises(FileNotFoundError, match="data.template"):
        load_template("no_such_template")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="no non-blank lines"):
        load_template(str(empty))


def test_fixed_prompt_exact_string():
    rng = random.Random(0)
    out = make_prompt(["a photo of [filewords] by [name]"], "cat, dog, bird", "mynet", rng, False, 0.0)
    # No shuffle/drop-out: split on ',' and re-joined with ',' leaves the caption untouched.
    assert out == "a photo of cat, dog, bird by mynet"


def test_filewords_replaced_before_name():
    # A caption containing "[name]" gets the network name too, because [filewords] is substituted first.
    out = make_prompt(["[filewords]"], "portrait of [name]", "bob", random.Random(1), False, 0.0)
    assert out == "portrait of bob"


def test_shuffle_rejoins_without_space_seeded():
    out = make_prompt(["[filewords]"], "a, b, c, d", "n", random.Random(3), True, 0.0)
    # Tags keep their own leading spaces; A1111 joins with "," only.
    assert sorted(out.split(",")) == sorted(["a", " b", " c", " d"])
    assert out == a1111_reference(["[filewords]"], "a, b, c, d", "n", random.Random(3), True, 0.0)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shuffle,dropout", [(False, 0.0), (True, 0.0), (False, 0.5), (True, 0.3)])
def test_matches_a1111_order_of_random_draws(seed, shuffle, dropout):
    lines = ["one [filewords] [name]", "two [filewords]", "three [name]"]
    caption = "red, green, blue, long tag here, x"
    got = make_prompt(lines, caption, "nm", random.Random(seed), shuffle, dropout)
    want = a1111_reference(lines, caption, "nm", random.Random(seed), shuffle, dropout)
    assert got == want


def test_dropout_exact_seeded_string():
    rng = random.Random(42)
    # random.Random(42): choice -> index 0 (one line), then draws 0.025, 0.275, 0.223, 0.737 for the 4 tags
    draws = random.Random(42)
    draws.choice(["only [filewords]"])
    kept = [t for t in ["a", "b", "c", "d"] if draws.random() > 0.5]
    out = make_prompt(["only [filewords]"], "a,b,c,d", "n", rng, False, 0.5)
    assert out == "only " + ",".join(kept)
    assert out == "only d"


def test_filename_caption_strips_leading_numbers():
    assert filename_caption("00012-a cat") == "a cat"
    # Only the leading run of digits/dashes and the whitespace after it go (A1111's ^[-\d]+\s*).
    assert filename_caption("12 - 3 dog, sitting") == "- 3 dog, sitting"
    assert filename_caption("cat 01") == "cat 01"
    assert filename_caption("2023-01-01") == ""


def test_decode_caption_utf8_bom_and_replacement():
    assert decode_caption("\ufeffhello, wörld\n".encode()) == ("hello, wörld", False)
    text, replaced = decode_caption(b"caf\xe9, tag")
    assert replaced and text == "caf\ufffd, tag"
