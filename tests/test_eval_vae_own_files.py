"""`eval-vae` reads hyperlit's own single-file VAE export without extra flags (the file says its GroupNorm groups),
and `--model-path NEW --fail-if-worse OLD` scores OLD as well without listing it twice (a CI gate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.images import make_folder
from helpers.models import make_tiny_vae

from hyperlit.cli import main
from hyperlit.vae.describe import describe_vae
from hyperlit.vae.export import save_single_file
from hyperlit.vae.load import load_vae


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vae_files")
    old = make_tiny_vae(seed=0)  # norm_num_groups=4: not SD's 32, so a reader that assumes 32 fails
    new = make_tiny_vae(seed=0)
    with torch.no_grad():
        for p in new.decoder.parameters():
            p.add_(0.5 * torch.randn_like(p))  # a much worse decoder
    return {
        "old": save_single_file(old, root / "old.vae.safetensors"),
        "new": save_single_file(new, root / "new.vae.safetensors"),
        "data": make_folder(root / "images", n=4, size=(32, 32)),
        "old_vae": old,
    }


def test_own_export_loads_without_flags_bit_for_bit(exported):
    vae = load_vae(exported["old"])
    assert vae.config.norm_num_groups == 4
    reference = exported["old_vae"].state_dict()
    assert vae.state_dict().keys() == reference.keys()
    assert all(torch.equal(vae.state_dict()[k], reference[k]) for k in reference)
    assert describe_vae(exported["old"])["norm_num_groups"] == 4


def test_fail_if_worse_scores_the_reference_without_listing_it_twice(exported, capsys):
    argv = ["eval-vae", "--data", str(exported["data"]), "--resolution", "32", "--json"]
    code = main([*argv, "--model-path", str(exported["new"]), "--fail-if-worse", str(exported["old"])])
    report = json.loads(capsys.readouterr().out)
    assert code == 1  # the noisy decoder is worse than the reference
    rows = {row["label"]: row for row in report["models"]}
    assert set(rows) == {str(exported["new"]), str(exported["old"])}
    assert rows[str(exported["old"])]["psnr"] > rows[str(exported["new"])]["psnr"]
    code = main([*argv, "--model-path", str(exported["old"]), "--fail-if-worse", str(exported["old"])])
    assert code == 0 and len(json.loads(capsys.readouterr().out)["models"]) == 1


def test_fail_if_worse_that_is_neither_a_model_nor_a_file_is_one_line(exported, capsys):
    code = main(["eval-vae", "--data", str(exported["data"]), "--model-path", str(exported["new"]),
                 "--fail-if-worse", "/nonexistent/old.safetensors"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--fail-if-worse" in err and "/nonexistent/old.safetensors" in err
