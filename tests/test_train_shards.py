"""`hyperlit make-shards` output trains end to end, with precomputed latents and without the VAE encoder."""

from __future__ import annotations

import tarfile

import pytest
from helpers.paths import SAMPLE_DIR

from hyperlit import files
from hyperlit.cli import main
from hyperlit.runner import build_run, fit

pytestmark = pytest.mark.slow


def test_make_shards_then_train(train_cfg, tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    assert (
        main(
            [
                "make-shards",
                str(SAMPLE_DIR),
                str(shards),
                "--model",
                "tiny",
                "--resolution",
                "64",
                "--samples-per-shard",
                "6",
            ]
        )
        == 0
    )
    tars = sorted(shards.glob("*.tar"))
    assert [t.name for t in tars] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
    assert len([n for n in names if n.endswith(".latent.npy")]) == 6
    assert len([n for n in names if n.endswith(".txt")]) == 6

    cfg = train_cfg(
        "data=webdataset",
        f"data.urls='{shards}/shard-{{000000..000002}}.tar'",
        "data.resolution=64",
        "data.num_workers=0",
        "data.batch_size=4",
        "callbacks.preview.every=0",
        "callbacks.preview.at_end=false",
        steps=3,
    )
    built = build_run(cfg)
    vae = built.module.components.vae
    calls = {"encode": 0}
    original = vae.encode

    def counting_encode(*args, **kwargs):
        calls["encode"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(vae, "encode", counting_encode)
    loss = fit(built, cfg)
    assert loss is not None
    assert built.trainer.global_step == 3
    assert calls["encode"] == 0  # the shards' latents were used
    assert files.read_file(tmp_path / "run" / "hypernetworks" / "swish_121.pt").step == 3
