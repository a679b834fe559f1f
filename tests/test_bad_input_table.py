"""Every bad value or file on the command line, for either task, ends with one `hyperlit: error:` line and exit 2.

In-process cases call the function `python train.py` runs (`train.entry`) with every weight loader replaced by
one that fails the test: the error must come before any weights load. A few cases run `python train.py` itself.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys

import pytest
import torch
from helpers.config import QUIET_RUN, compose_config
from helpers.paths import REPO_ROOT
from helpers.scripts import load_script
from safetensors.torch import save_file

from hyperlit import files, models
from hyperlit.errors import bad_input_message
from hyperlit.tasks.vae import build as vae_build  # the module, whose loaders are replaced

UNSAFE_ADVICE = re.compile(r"weights_only\W*(=|set to)\W*False", re.IGNORECASE)

BASE = {
    "train": QUIET_RUN,
    "vae": QUIET_RUN,
}

# (config, overrides, the key or file the message must name first)
CASES = [
    ("train", ["data.batch_size=0"], "data.batch_size"),
    ("train", ["trainer.precision=8-mixed"], "trainer.precision"),
    ("train", ["trainer.devices=0"], "trainer.devices"),
    ("train", ["trainer.accelerator=abacus"], "trainer.accelerator"),
    ("train", ["+trainer.num_nodes=0"], "trainer.num_nodes"),
    ("train", ["hypernet.activation=sparkle"], "hypernet.activation"),
    ("train", ["+hypernet.actvation=relu"], "hypernet.actvation"),
    ("train", ["hypernet.input_noise=-0.5"], "hypernet.input_noise"),
    ("train", ["train.max_steps=0"], "train.max_steps"),
    ("train", ["train.prediction_type=x0"], "train.prediction_type"),
    ("train", ["train.gradient_checkpointing=yes"], "train.gradient_checkpointing"),
    ("train", ["train.min_timestep=-1"], "train.min_timestep"),
    ("train", ["train.min_timestep=2.5"], "train.min_timestep"),
    ("train", ["train.min_timestep=600", "train.max_timestep=600"], "train.max_timestep"),
    ("train", ["train.compile=1"], "train.compile"),
    ("train", ["train.optimizer._target_=torch.optim.NoSuchOptimizer"], "train.optimizer._target_"),
    ("train", ["data=folder", "data.path=/nonexistent/images"], "data.path"),
    ("train", ["ckpt_path=/nonexistent/last.ckpt"], "ckpt_path"),
    ("train", ["hypernet.init_from=/nonexistent/style.pt"], "hypernet.init_from"),
    ("train", ["model=sd15"], "model.family=sd15 needs model.path"),
    ("train", ["model.dtype=float8"], "model.dtype"),
    ("train", ["task=gan"], "task"),
    ("vae", ["data.batch_size=0"], "data.batch_size"),
    ("vae", ["data.path=/nonexistent/images"], "data.path"),
    ("vae", ["trainer.precision=8-mixed"], "trainer.precision"),
    ("vae", ["disc.loss=wgan"], "disc.loss"),
    ("vae", ["+disc.strat=3"], "disc.strat"),
    ("vae", ["train.optimizer.lr=-1"], "train.optimizer"),
    ("vae", ["train.max_steps=0"], "train.max_steps"),
    ("vae", ["callbacks.ema.decay=1.5"], "callbacks.ema"),
    ("vae", ["callbacks.export.dtype=int8"], "callbacks.export"),
    ("vae", ["model=sd15"], "model.path"),
    ("vae", ["model=sd15", "model.path=/nonexistent/vae.safetensors"], "model.path"),
    ("vae", ["loss.perceptual.weights=/nonexistent/vgg16.pth"], "loss.perceptual.weights"),
]


def _load_entry():
    return load_script(REPO_ROOT / "train.py", "hyperlit_train_entry").entry


@pytest.fixture
def no_weights(monkeypatch):
    """Every way a run reads weights fails the test (an AssertionError is a bug, not bad input: it propagates)."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was reported")

    monkeypatch.setattr(models, "load_components", refuse)
    monkeypatch.setattr(vae_build, "load_vae", refuse)
    monkeypatch.setattr(vae_build, "embedded_tiny_vae", refuse)
    monkeypatch.setattr(files, "read_file", refuse)
    monkeypatch.delenv("HYPERLIT_DEBUG", raising=False)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hyperlit: error:")]


@pytest.mark.parametrize(("config", "overrides", "key"), CASES, ids=[f"{c}:{' '.join(o)}" for c, o, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(config, overrides, key, tmp_path, no_weights, capsys):
    cfg = compose_config(config, [f"paths.output_dir={tmp_path}", *BASE[config], *overrides])
    with pytest.raises(SystemExit) as exit_info:
        _load_entry()(cfg)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"hyperlit: error: {key}"), lines[0]
    assert "Traceback" not in stderr and "weights_only=False" not in stderr


def _corrupt_files(tmp_path):
    """(overrides, key or file) for files that exist but cannot be read as what the key needs."""
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors header" * 10)
    truncated = tmp_path / "truncated.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(64, 64)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "cb": subprocess.CompletedProcess(["x"], 0)}, pickled)
    not_a_vae = tmp_path / "not_a_vae.safetensors"
    save_file({"w": torch.zeros(2)}, not_a_vae)
    bad_hypernet = tmp_path / "style.pt"
    bad_hypernet.write_bytes(b"PK\x03\x04 this is not a torch zip")
    vae = ["--config-name", "vae", "model=sd15", "loss.perceptual.weight=0"]
    return [
        ([*vae, f"model.path={garbage}"], "model.path"),
        ([*vae, f"model.path={truncated}"], "model.path"),
        ([*vae, f"model.path={pickled}"], "model.path"),
        ([*vae, f"model.path={not_a_vae}"], "model.path"),
        ([f"hypernet.init_from={bad_hypernet}"], str(bad_hypernet)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_corrupt_files_from_the_command_line(case, tmp_path):
    """Real `python train.py` processes: these files are read, so no loader is replaced; none may leak a traceback
    or torch's advice to load with weights_only=False (which would run pickled code)."""
    overrides, names = _corrupt_files(tmp_path)[case]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HYPERLIT_DEBUG", None)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *overrides, f"paths.output_dir={tmp_path / 'run'}",
         "logger=none"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-2000:]
    assert names in lines[0]
    assert "Traceback" not in result.stderr
    assert not UNSAFE_ADVICE.search(result.stderr) and "add_safe_globals" not in result.stderr


def test_torchs_unsafe_advice_never_reaches_the_user(tmp_path):
    """torch's own refusal text (which suggests weights_only=False) is replaced, whatever wraps it."""
    path = tmp_path / "pickled.ckpt"
    torch.save({"cb": subprocess.CompletedProcess(["x"], 0)}, path)
    with pytest.raises(pickle.UnpicklingError) as err:
        torch.load(path, weights_only=True)
    assert UNSAFE_ADVICE.search(str(err.value))  # the advice is there to strip
    message = bad_input_message(ValueError(f"model.path={path}: cannot be read ({err.value})"))
    assert message.startswith(f"model.path={path}: ") and "CompletedProcess" in message
    assert not UNSAFE_ADVICE.search(message) and "add_safe_globals" not in message and "\n" not in message


class BadShardError(ValueError):
    """A ValueError of this module: tracebacks name it with its module."""


class _FailingDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> None:
        try:
            {}["member"]
        except KeyError as cause:
            raise BadShardError(
                "data.urls: no usable sample in 1 shard(s); reasons with counts:\n  zero_byte: 1"
            ) from cause


def test_a_dataloader_workers_error_keeps_only_its_own_message():
    """PyTorch re-raises a worker's exception with "Caught ... in DataLoader worker process 0" and the worker's
    formatted traceback (with its chained cause) as its text; the user sees only the message."""
    with pytest.raises(BadShardError) as err:
        list(torch.utils.data.DataLoader(_FailingDataset(), num_workers=1))
    assert "DataLoader worker process 0" in str(err.value) and "KeyError" in str(err.value)
    assert (
        bad_input_message(err.value) == "data.urls: no usable sample in 1 shard(s); reasons with counts:; zero_byte: 1"
    )
    assert (
        bad_input_message(ValueError("Caught nothing: a message of our own")) == "Caught nothing: a message of our own"
    )
