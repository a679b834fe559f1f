"""Training defaults belong to the model family (conf/family_defaults/), not to a data set: what `--cfg job` shows."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from helpers.paths import REPO_ROOT

# The values each family's file sets, written out here independently of the conf files. A user's folder
# (data=folder) gets exactly these; the command line still wins.
# SD 1.x and 2.x share one file's values; SDXL halves the rate (its 70 cross-attention layers against SD1's 16).
SD = dict(learning_rate=5e-5, max_steps=3000, lr_scheduler="cosine", lr_warmup_steps=100, min_timestep=0,
          batch_size=1, tag_dropout=0.0, ema=False, ema_decay=0.99, every=500, template="style_filewords",
          dropout=None, input_noise=0.0)  # fmt: skip
TINY = dict(learning_rate=3e-3, max_steps=2500, lr_scheduler="constant", lr_warmup_steps=0, min_timestep=250,
            batch_size=4, tag_dropout=0.1, ema=True, ema_decay=0.99, every=250, template="filewords",
            dropout=0.5, input_noise=0.0)  # fmt: skip
# The demo (data=sample on the tiny base) is the family's defaults plus conf/recipe/sample_tiny.yaml's measured recipe:
# a batch of 6, and the family's earlier 2e-3 x 2000 without dropout (the README's val/loss and grid).
DEMO = {**TINY, "batch_size": 6, "learning_rate": 2e-3, "max_steps": 2000, "dropout": None}
EXPECTED = {
    "tiny": TINY,
    "sd15": SD,
    "sd21": SD,
    "sdxl": {**SD, "learning_rate": 2.5e-5},
}


def cfg_job(*overrides: str) -> dict:
    """The composed job config as `python train.py --cfg job` prints it (a subprocess, as a user runs it)."""
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "--cfg", "job", *overrides],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    return yaml.safe_load(out.stdout)


def summary(cfg: dict) -> dict:
    train, callbacks = cfg["train"], cfg["callbacks"]
    every = {
        callbacks["preview"]["every"],
        callbacks["export"]["save_every"],
        callbacks["checkpoint"]["every_n_train_steps"],
    }
    assert len(every) == 1, every  # previews, snapshots and checkpoints at the same steps
    return dict(
        learning_rate=float(train["learning_rate"]),
        max_steps=train["max_steps"],
        lr_scheduler=train["lr_scheduler"],
        lr_warmup_steps=train["lr_warmup_steps"],
        min_timestep=train["min_timestep"],
        batch_size=cfg["data"]["batch_size"],
        tag_dropout=cfg["data"]["tag_dropout"],
        ema=callbacks["ema"]["enabled"],
        ema_decay=callbacks["ema"]["decay"],
        every=every.pop(),
        template=cfg["data"]["template"],
        dropout=cfg["hypernet"]["dropout_structure"],
        input_noise=cfg["hypernet"]["input_noise"],
    )


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_a_users_folder_gets_the_familys_defaults(family):
    model = ["model.path=/m/base.safetensors", "model.tokenizer_path=/m/tok"] if family != "tiny" else []
    cfg = cfg_job(f"model={family}", *model, "data=folder", "data.path=/d/style")
    assert summary(cfg) == EXPECTED[family]


def test_the_demo_is_the_tiny_family_plus_its_documented_batch():
    """data=sample on the tiny base: the family's defaults, and only conf/recipe/sample_tiny.yaml's batch of 6."""
    assert summary(cfg_job()) == DEMO


@pytest.mark.parametrize(
    ("overrides", "dropout"),
    [
        (["data=folder", "data.path=/d", "hypernet=swish_121_dropout"], [0, 0.3, 0]),  # the preset's own
        (["hypernet=swish_121_dropout"], [0, 0.3, 0]),  # over the demo recipe's null too
        (["data=folder", "data.path=/d", "hypernet=relu_1221_ln"], 0.5),  # no dropout of its own: the family's
        (["data=folder", "data.path=/d", "hypernet=relu_1221_ln", "hypernet.dropout_structure=0.1"], 0.1),
        (["hypernet=relu_1221_ln"], None),  # the demo: its recipe's null over the family's 0.5
        (["data=folder", "data.path=/d", "hypernet=swish_121_dropout", "hypernet.dropout_structure=null"], None),
    ],
)
def test_a_presets_own_dropout_wins_over_the_family_and_the_command_line_over_both(overrides, dropout):
    assert cfg_job(*overrides)["hypernet"]["dropout_structure"] == dropout


def test_the_command_line_wins_over_the_family():
    cfg = cfg_job(
        "data=folder",
        "data.path=/d",
        "train.learning_rate=1e-4",
        "data.batch_size=2",
        "callbacks.ema.enabled=false",
        "train.min_timestep=0",
        "data.template=style",
    )
    got = summary(cfg)
    assert (got["learning_rate"], got["batch_size"], got["ema"], got["min_timestep"]) == (1e-4, 2, False, 0)
    assert got["template"] == "style"
    assert got["max_steps"] == 2500 and got["dropout"] == 0.5  # the rest stays the family's


def test_the_vae_task_takes_no_hypernetwork_defaults():
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "--config-name", "vae", "--cfg", "job"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    cfg = yaml.safe_load(out.stdout)
    assert "tag_dropout" not in cfg.get("data", {}) and "min_timestep" not in cfg["train"]
