"""Every configuration mistake, also the ones Hydra finds before hyperlit's code runs, is one `hyperlit: error:`
line and exit code 2, never advice to add `+key=`; a `+key` that no part of hyperlit reads is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers.config import compose_config
from helpers.paths import REPO_ROOT
from helpers.train_without_weights import WEIGHTS_MARKER
from hydra.errors import HydraException
from omegaconf import OmegaConf

from hyperlit.config_keys import check_keys_are_read, defined_keys
from hyperlit.errors import hydra_message

GROUP_OPTIONS = {
    "train": {
        "hypernet": ["linear_121", "relu_121", "relu_1221_ln", "swish_121", "swish_121_dropout"],
        "model": ["tiny", "sd15", "sd21", "sdxl"],
        "data": ["sample", "folder", "folder_sdxl", "webdataset"],
        "trainer": ["default", "ddp", "ddp_cpu", "gpu", "multinode"],
        "logger": ["wandb", "csv", "none", "tensorboard"],
        "hparams_search": ["optuna"],
    },
    "vae": {"vae_loss": ["ft_ema", "ft_mse", "fp16_fix"], "model": ["tiny", "sd15", "sdxl"]},
}


def _hydra_error(config: str, overrides: list[str]) -> str:
    with pytest.raises(HydraException) as err:
        compose_config(config, overrides)
    return hydra_message(err.value)


def test_unknown_group_option_names_the_close_match_and_the_options():
    message = _hydra_error("train", ["hypernet=swish121"])
    assert message == (
        "hypernet=swish121: no such option; did you mean swish_121? "
        "allowed: linear_121, relu_121, relu_1221_ln, swish_121, swish_121_dropout"
    )


def test_unknown_key_suggests_the_key_never_plus():
    message = _hydra_error("train", ["train.max_step=100"])
    hint = "did you mean train.max_steps or train.max_timestep?"
    assert message.startswith(f"train.max_step=100: no such key; {hint} keys of train: ")
    assert "learning_rate" in message and "+" not in message and "\n" not in message
    message = _hydra_error("vae", ["disc.strat=3"])
    assert message.startswith("disc.strat=3: no such key; did you mean disc.start? keys of disc: ")


def test_other_hydra_mistakes_are_one_line_without_plus():
    assert _hydra_error("train", ["+seed=1"]) == "+seed=1: seed is already set; drop the + to change it (seed=1)"
    assert _hydra_error("train", ["train.max_steps=["]).startswith("train.max_steps=[: ")
    for overrides in (["nosuchgroup=x"], ["train.max_steps=["], ["~train.nokey"]):
        message = _hydra_error("train", overrides)
        assert message and "\n" not in message and "+" not in message, (overrides, message)


@pytest.mark.parametrize(("config", "group"), [(c, g) for c, groups in GROUP_OPTIONS.items() for g in groups])
def test_every_shipped_option_holds_only_keys_that_are_read(config, group):
    defined = defined_keys()
    for option in GROUP_OPTIONS[config][group]:
        check_keys_are_read(compose_config(config, [f"{group}={option}"]), defined)


def _refusal(overrides: list[str], config: str = "train") -> str:
    with pytest.raises(ValueError) as err:
        check_keys_are_read(compose_config(config, overrides))
    return str(err.value)


def test_plus_key_that_nothing_reads_is_refused_with_the_close_match():
    assert _refusal(["+train.max_step=100"]) == (
        "train.max_step: 100 is not allowed; no part of hyperlit reads this key; did you mean train.max_steps or "
        "train.max_timestep?"
    )
    assert _refusal(["+seeed=1"]).startswith(
        "seeed: 1 is not allowed; no part of hyperlit reads this key; did you mean seed"
    )
    # a constructor's argument: checked against its signature (AdamW has no momentum; the preview takes `prompts`)
    assert _refusal(["+train.optimizer.momentum=0.9"]).startswith("train.optimizer.momentum: 0.9 is not allowed")
    assert "did you mean callbacks.preview.prompts?" in _refusal(["+callbacks.preview.prompt=[a]"])
    assert _refusal(["+model.colour=red"]).startswith("model.colour: 'red' is not allowed")
    assert _refusal(["+disc.strat=3"], "vae").startswith("disc.strat: 3 is not allowed")


def test_plus_keys_that_are_read_are_accepted():
    for overrides in (
        ["train.optimizer._target_=torch.optim.SGD", "+train.optimizer.momentum=0.9"],  # the README's example
        ["+trainer.num_nodes=2"],  # a Trainer argument the default trainer file leaves out
        ["+callbacks.probe._target_=lightning.pytorch.callbacks.Timer", "+callbacks.probe.interval=step"],
        ["callbacks.preview=null"],
        ["+logger.wandb.entity=me"],  # WandbLogger takes **kwargs (wandb.init's)
    ):
        check_keys_are_read(compose_config("train", overrides))


def test_defined_keys_follow_package_headers():
    defined = defined_keys()
    assert "loss.reconstruction" in defined.paths  # conf/vae_loss/*.yaml: `# @package loss`
    assert "vae_loss.reconstruction" not in defined.paths
    assert "train.max_steps" in defined.leaves and "train" not in defined.leaves
    assert not any(p.startswith("hydra") for p in defined.paths)
    cfg = OmegaConf.create({"train": {"max_steps": 1, "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.1}}})
    check_keys_are_read(cfg, defined)


# (overrides, what the one line starts with)
COMMAND_LINES = [
    (["hypernet=swish121"], "hypernet=swish121: no such option; did you mean swish_121?"),
    (["train.max_step=100"], "train.max_step=100: no such key; did you mean train.max_steps"),
    (["+train.max_step=100"], "train.max_step: 100 is not allowed; no part of hyperlit reads this key"),
    (["+train.optimizer.lr=0.1"], "train.optimizer.lr: 0.1 is not allowed; the task sets it from train.learning_rate"),
    (["--config-name", "vae", "train.optimizer.lr=fast"], "train.optimizer: torch.optim.AdamW(lr='fast'"),
    (["train.max_steps=["], "train.max_steps=["),
]


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "start"), COMMAND_LINES, ids=[" ".join(o) for o, _ in COMMAND_LINES])
def test_the_command_line_says_one_line_and_exits_2_before_any_weights(overrides, start, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    for name in ("HYPERLIT_DEBUG", "HYDRA_FULL_ERROR", "HYPERLIT_HYDRA_ERRORS"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "helpers" / "train_without_weights.py"), *overrides,
         "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert WEIGHTS_MARKER not in result.stderr
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith(f"hyperlit: error: {start}"), lines[0]
    assert "Traceback" not in result.stderr and "+train" not in lines[0].replace(f"{overrides[0]}", "")
