"""datasets/make_base.py: its word-level tokenizer, and a miniature run that is deterministic for a seed."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.scripts import load_script
from safetensors.torch import load_file
from transformers import AutoTokenizer

from hyperlit.demo.shapes import BACKGROUNDS, draw, judge, random_scene, train_combos

REPO = Path(__file__).resolve().parents[1]


def make_base():
    return load_script(REPO / "datasets" / "make_base.py")


def test_merges_make_every_caption_word_one_token(tmp_path):
    mb = make_base()
    words = mb.caption_words()
    tok = mb.build_tokenizer(tmp_path / "tok")
    for word in words:
        assert tok.tokenize(word) == [word + "</w>"]
    # a word it never learned still tokenizes, byte by byte, with no unknown token
    ids = tok("a zebra")["input_ids"]
    assert tok.unk_token_id not in ids[1:-1] and len(ids) == 2 + 1 + len("zebra")
    assert mb.learn_merges(["ab", "abc"]) == mb.learn_merges(["abc", "ab"])  # order of words does not matter


def run(out: Path, seed: int) -> dict:
    cmd = [sys.executable, str(REPO / "datasets" / "make_base.py"), "--out", str(out), "--seed", str(seed),
           "--vae-steps", "2", "--vae-batch", "2", "--images", "40", "--unet-steps", "3", "--unet-batch", "4",
           "--snapshot-every", "0", "--vae-polish-steps", "2", "--decoder-steps", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    return {p.parent.name: load_file(p) for p in out.glob("*/*.safetensors")}


@pytest.mark.slow
def test_miniature_run_is_deterministic_for_a_seed(tmp_path):
    a, b, c = run(tmp_path / "a", 0), run(tmp_path / "b", 0), run(tmp_path / "c", 1)
    assert set(a) == {"unet", "vae", "text_encoder"}
    for part in a:
        assert a[part].keys() == b[part].keys()
        assert all(a[part][k].equal(b[part][k]) for k in a[part]), part
    assert not a["unet"]["conv_in.weight"].equal(c["unet"]["conv_in.weight"])


def test_the_committed_tokenizer_is_the_one_make_base_builds(tmp_path):
    """The committed base was made with --striped-share > 0: its vocabulary has "striped" as one token; without
    stripes the word list is the plain one."""
    mb = make_base()
    ours = mb.build_tokenizer(tmp_path / "tok", striped=True)
    committed = AutoTokenizer.from_pretrained(REPO / "hyperlit" / "models" / "tiny_base" / "tokenizer")
    assert ours.get_vocab() == committed.get_vocab()
    text = "a purple triangle on a striped background, zebra"
    assert ours(text)["input_ids"] == committed(text)["input_ids"]
    assert committed.tokenize("striped") == ["striped</w>"]
    assert "striped" not in mb.caption_words() and "striped" in mb.caption_words(striped=True)


def test_striped_share_draws_that_share_of_striped_backgrounds_and_nothing_at_zero():
    mb = make_base()
    # share 0 draws exactly what make_base drew before the option (plain backgrounds only): the reference is that
    # loop, written out here
    rng, combos, reference = random.Random(5), train_combos(), []
    for i in range(60):
        scene = random_scene(rng, *combos[i % len(combos)], rng.choice(list(BACKGROUNDS)))
        reference.append((scene.caption, draw(scene, jitter=10, rng=rng)))
    plain, caps = mb.base_images(60, random.Random(5), 0.0)
    assert caps == [c for c, _ in reference] and plain.equal(mb.to_tensor([im for _, im in reference]))
    pixels, captions = mb.base_images(400, random.Random(5), 0.25)
    striped = [i for i, c in enumerate(captions) if c.endswith("on a striped background")]
    assert 0.18 < len(striped) / len(captions) < 0.32
    assert all(c.rsplit(" on a ", 1)[1].split()[0] in [*BACKGROUNDS, "striped"] for c in captions)
    # the bands are there (rows 16-31 and 48-63 grey, on white) and are not the checkered style
    grey = pixels[striped[0]].mean(0)  # [-1, 1]
    top, band = grey[:16].median(), grey[16:32].median()
    assert top > 0.8 and -0.05 < band < 0.45
    image = ((pixels[striped[0]].permute(1, 2, 0) + 1) / 2).numpy()
    assert not judge(image).checker


@pytest.mark.parametrize("share", ["1.5", "-0.1"])
def test_a_striped_share_outside_0_to_1_is_refused_before_training(tmp_path, share):
    cmd = [sys.executable, str(REPO / "datasets" / "make_base.py"), "--out", str(tmp_path / "out"),
           "--striped-share", share]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"--striped-share={float(share)} is not allowed; use a share from 0 to 1" in done.stderr
    assert "Traceback" not in done.stderr and "stage 1" not in done.stdout  # refused at the door
    assert not (tmp_path / "out").exists()
