"""Bad input to the training job: each is a clear message naming the key or file, before any model loads."""

from __future__ import annotations

import logging
import shutil
import warnings

import pytest
from helpers.paths import REPO_ROOT, SAMPLE_DIR

from hyperlit import models
from hyperlit.runner import build_run, fit


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a model would be loaded: config errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error was raised")

    monkeypatch.setattr(models, "load_components", refuse)


def _message(cfg) -> str:
    with pytest.raises((ValueError, FileNotFoundError, NotADirectoryError)) as err:
        build_run(cfg)
    return str(err.value)


def test_missing_data_directory(train_cfg, tmp_path, no_model_loading):
    message = _message(train_cfg("data=folder", f"data.path={tmp_path / 'nope'}", "data.resolution=64"))
    assert "data.path" in message and "nope" in message


def test_empty_data_directory(train_cfg, tmp_path, no_model_loading):
    (tmp_path / "empty").mkdir()
    message = _message(train_cfg("data=folder", f"data.path={tmp_path / 'empty'}", "data.resolution=64"))
    assert "data.path" in message and "no image" in message


def test_folder_with_no_readable_image_lists_the_reasons(train_cfg, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_bytes(b"this is not a jpeg")
    cfg = train_cfg("data=folder", f"data.path={folder}", "data.resolution=64", "callbacks.preview.every=0")
    with pytest.raises(ValueError) as err:
        fit(build_run(cfg), cfg)
    message = str(err.value)
    assert "data.path" in message and "no usable image" in message
    assert "zero_byte" in message or "empty" in message


def test_unreadable_image_is_skipped_counted_and_reported(train_cfg, tmp_path, caplog):
    folder = tmp_path / "mixed"
    shutil.copytree(SAMPLE_DIR, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    cfg = train_cfg(
        "data=folder",
        f"data.path={folder}",
        "data.resolution=64",
        "callbacks.preview.every=0",
        "callbacks.preview.at_end=false",
        steps=1,
    )
    built = build_run(cfg)
    with caplog.at_level(logging.WARNING, logger="hyperlit"):
        loss = fit(built, cfg)
    assert loss is not None  # training continued
    # a PNG signature with no chunks: PIL cannot identify it (UnidentifiedImageError), so the kind is not_an_image
    assert dict(built.datamodule.skipped) == {"not_an_image": 1}
    assert any("skipped or repaired samples" in r.getMessage() for r in caplog.records)


def test_missing_model_path_names_the_key(train_cfg, no_model_loading):
    message = _message(train_cfg("model=sd15", "model.path=/models/missing.safetensors"))
    assert "model.path" in message and "/models/missing.safetensors" in message


def test_single_file_without_tokenizer_names_the_key(train_cfg, tmp_path, no_model_loading):
    checkpoint = tmp_path / "model.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(checkpoint))
    message = _message(train_cfg("model=sd15", f"model.path={checkpoint}"))
    assert "model.tokenizer_path" in message


def test_invalid_hypernetwork_option_stops_before_the_model(train_cfg, no_model_loading):
    message = _message(train_cfg("hypernet.activation=swishy"))
    assert "hypernet.activation" in message and "'swishy'" in message and "swish" in message


def test_bad_learning_rate_string_stops_before_the_model(train_cfg, no_model_loading):
    message = _message(train_cfg("train.learning_rate='1e-4:ten'"))
    assert "train.learning_rate" in message


def test_missing_init_from_and_ckpt_path_name_their_keys(train_cfg, tmp_path, no_model_loading):
    assert "hypernet.init_from" in _message(train_cfg(f"hypernet.init_from={tmp_path / 'gone.pt'}"))
    assert "ckpt_path" in _message(train_cfg(f"ckpt_path={tmp_path / 'gone.ckpt'}"))


def test_unused_sizes_warn_with_the_widths(train_cfg):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built = build_run(train_cfg("hypernet.sizes=[48,32,64,768]"))
    messages = [str(w.message) for w in caught if "hypernet.sizes" in str(w.message)]
    assert messages and "[768]" in messages[0] and "[48, 32, 64]" in messages[0]
    assert built.module.hypernetwork.sizes == [48, 32, 64, 768]


def test_wandb_without_credentials_logs_offline_with_a_sync_hint(train_cfg, tmp_path, monkeypatch, caplog):
    from lightning.pytorch.loggers import WandbLogger

    from hyperlit.runner import build_loggers

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with caplog.at_level(logging.WARNING, logger="hyperlit"):
        loggers = build_loggers(train_cfg("logger=wandb"))
    assert len(loggers) == 1 and isinstance(loggers[0], WandbLogger) and loggers[0]._offline
    assert any("wandb sync" in r.getMessage() for r in caplog.records)

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not build_loggers(train_cfg("logger=wandb"))[0]._offline


def test_the_command_line_prints_the_message_without_a_traceback(tmp_path):
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "data=folder",
            f"data.path={tmp_path / 'missing'}",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 2
    assert "hyperlit: error: data.path=" in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_sdxl_single_file_without_both_tokenizers(train_cfg, tmp_path, no_model_loading):
    ckpt = tmp_path / "sd_xl_base_1.0.safetensors"
    import safetensors.torch
    import torch

    safetensors.torch.save_file({"model.diffusion_model.x": torch.zeros(1)}, ckpt)
    message = _message(train_cfg("model=sdxl", f"model.path={ckpt}"))
    assert "model.tokenizer_path" in message and "tokenizer/ and tokenizer_2/" in message
    message = _message(train_cfg("model=sdxl", f"model.path={ckpt}", f"model.tokenizer_path={tmp_path}",
                                 f"model.vae_path={tmp_path / 'nope'}"))  # fmt: skip
    assert "model.tokenizer_path" in message  # the first problem found, before any weights load
