"""datasets/make_base.py: its word-level tokenizer, and a miniature run that is deterministic for a seed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.scripts import load_script
from safetensors.torch import load_file

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
