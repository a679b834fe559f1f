"""`python train.py --help` lists the groups with their options and the main keys with their conf comments;
`hyperlit --help` is plain text and points to `python train.py` for training."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers.paths import CONF_DIR, REPO_ROOT
from omegaconf import OmegaConf

from hyperlit.cli import main as hyperlit_main
from hyperlit.config_help import help_text


def _comment_of(text: str, key: str) -> str:
    """The comment on the line of `key:` in a conf file's text (the first such line), computed another way."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(f"{key}:") and " #" in stripped:
            return stripped.split(" #", 1)[1].strip()
    return ""


def test_train_help_lists_every_group_option_and_marks_the_default():
    text = help_text(CONF_DIR, "train")
    for group, default in (("hypernet", "swish_121"), ("model", "tiny"), ("data", "sample"), ("logger", "wandb")):
        line = next(line for line in text.splitlines() if line.split()[:1] == [group])
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        assert line.split(None, 1)[1].split("  (")[0] == ", ".join(f"{o}*" if o == default else o for o in options)
    assert "hydra" not in [line.split()[0] for line in text.splitlines() if line.startswith("  ")]


def test_train_help_gives_each_main_key_its_default_and_comment():
    text = help_text(CONF_DIR, "train")
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and "=" in line.split()[0]}
    train_yaml = (CONF_DIR / "train.yaml").read_text()
    train = OmegaConf.load(CONF_DIR / "train.yaml").train
    for key in ("max_steps", "learning_rate", "lr_scheduler", "noise_offset", "min_snr_gamma", "compile"):
        row = next(r for k, r in rows.items() if k.startswith(f"train.{key}="))
        value = row.split()[0].split("=", 1)[1]  # as written in the file; the same value once parsed
        assert OmegaConf.create({"v": OmegaConf.create(f"v: {value}").v}).v == train[key]
        assert row.endswith(_comment_of(train_yaml, key)) and _comment_of(train_yaml, key)
    hypernet_yaml = (CONF_DIR / "hypernet" / "swish_121.yaml").read_text()
    assert rows["hypernet.activation=swish"].endswith(_comment_of(hypernet_yaml, "activation"))
    assert rows["seed=42"].endswith(_comment_of(train_yaml, "seed"))
    assert "train.optimizer.*" in text  # a mapping with a comment: the optimizer can be replaced
    assert len(text.splitlines()) < 70


def test_vae_help_lists_the_loss_presets_and_the_loss_keys():
    text = help_text(CONF_DIR, "vae")
    assert "usage: python train.py --config-name vae" in text
    assert re.search(r"^  vae_loss +fp16_fix, ft_ema\*, ft_mse", text, re.MULTILINE)
    loss_yaml = (CONF_DIR / "vae_loss" / "ft_ema.yaml").read_text()
    assert re.search(rf"^  loss.reconstruction=l1 +{re.escape(_comment_of(loss_yaml, 'reconstruction'))}$", text, re.M)


@pytest.mark.slow
def test_the_command_line_help_is_ours_not_hydras(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "--help"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == help_text(CONF_DIR, "train")
    assert "Powered by Hydra" not in result.stdout and "== Config ==" not in result.stdout
    assert not (tmp_path / "outputs").exists()  # nothing ran


def test_hyperlit_help_is_plain_and_names_train_py(capsys):
    with pytest.raises(SystemExit) as exit_info:
        hyperlit_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "`" not in out and "python train.py" in out
    for command in ("inspect", "convert", "make-shards", "generate", "eval-vae"):
        with pytest.raises(SystemExit):
            hyperlit_main([command, "--help"])
        text = capsys.readouterr().out
        assert "``" not in text, command
        if command == "generate":  # --model sdxl works (tests/test_generate_sdxl.py): the help names it
            flat = " ".join(text.split())  # argparse wraps the help
            assert "sd15, sd21, sdxl" in flat and "tokenizer/ + tokenizer_2/" in flat
