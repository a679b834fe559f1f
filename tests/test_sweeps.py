"""sweep.yaml (wandb) renders into valid train.py calls; Hydra multirun and an Optuna study run on the tiny model."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.config import compose_config
from helpers.paths import REPO_ROOT
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from hyperlit.callbacks.validation import METRIC, ValidationLoss
from hyperlit.files import read_file
from hyperlit.hypernetwork import HypernetworkConfig
from hyperlit.lr_schedule import base_learning_rate
from hyperlit.tasks.hypernetwork.build import hypernetwork_config

SWEEP = yaml.safe_load((REPO_ROOT / "sweep.yaml").read_text())


def render(sweep: dict, values: dict) -> list[str]:
    """The command line a wandb agent runs for these values, built with wandb's own helpers as its agent does
    (wandb/wandb_agent.py: create_sweep_command, create_sweep_command_args, then macro substitution)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    command = create_sweep_command(list(sweep["command"]))
    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros.update(env=["/usr/bin/env"], interpreter=["python"], program=[sweep["program"]])
    out: list[str] = []
    for chunk in map(str, command):
        if chunk.startswith("${") and chunk.endswith("}"):
            out += macros.get(chunk[2:-1]) or []
        else:
            out.append(chunk)
    return out


def parameter_values(spec: dict) -> list:
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    low, high = spec["min"], spec["max"]
    if spec.get("distribution") == "log_uniform_values":
        return [low, math.sqrt(low * high), high]
    return [low, (low + high) / 2, high]


def expected(value):
    return None if value == "null" else value


def test_sweep_file_is_a_bayes_sweep_over_the_hypernetwork_with_hydra_style_arguments():
    assert SWEEP["program"] == "train.py" and (REPO_ROOT / SWEEP["program"]).is_file()
    assert SWEEP["method"] == "bayes"
    assert SWEEP["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert set(SWEEP["parameters"]) == {
        "hypernet.layer_structure",
        "hypernet.activation",
        "hypernet.layer_norm",
        "hypernet.dropout_structure",
        "train.learning_rate",
        "data.batch_size",
    }
    lr = SWEEP["parameters"]["train.learning_rate"]
    assert lr["distribution"] == "log_uniform_values" and 0 < lr["min"] < lr["max"] < 1
    assert "${args_no_hyphens}" in SWEEP["command"] and "${args}" not in SWEEP["command"]
    assert "logger=wandb" in SWEEP["command"]


def test_the_metric_is_what_the_task_logs_and_run_returns():
    # run(cfg) returns cfg.optimized_metric (tests/test_train.py checks the value); the sweep must minimise it
    cfg = compose_config("train", ["paths.output_dir=/tmp/x"])
    assert cfg.optimized_metric == SWEEP["metric"]["name"] == METRIC
    # the default callbacks score the held-out images the default data holds out
    assert cfg.callbacks.validation._target_ == f"{ValidationLoss.__module__}.{ValidationLoss.__name__}"
    assert cfg.data.val_count > 0


PARAMETER_VALUES = [(key, value) for key, spec in SWEEP["parameters"].items() for value in parameter_values(spec)]


@pytest.mark.parametrize(("key", "value"), PARAMETER_VALUES, ids=[f"{k}={v}" for k, v in PARAMETER_VALUES])
def test_every_value_of_every_parameter_composes_with_train_yaml(key, value):
    command = render(SWEEP, {key: value})
    assert command[:3] == ["/usr/bin/env", "python", "train.py"]
    rendered = f"{key}={value}"
    assert rendered in command and not any(arg.startswith("-") for arg in command[3:])
    cfg = compose_config("train", [*command[3:], "paths.output_dir=/tmp/x"])
    got = OmegaConf.select(cfg, key, throw_on_missing=True)
    got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
    assert got == expected(value)
    hypernetwork_config(cfg.hypernet)  # a valid architecture
    base_learning_rate(cfg.train.learning_rate, int(cfg.train.max_steps))
    assert cfg.group == "hypernet-sweep" and list(cfg.tags) == ["sweep"] and "wandb" in cfg.logger


def test_every_combination_of_architecture_values_is_a_valid_hypernetwork():
    params = SWEEP["parameters"]
    keys = ["layer_structure", "activation", "layer_norm", "dropout_structure"]
    grids = [parameter_values(params[f"hypernet.{k}"]) for k in keys]
    combos = list(itertools.product(*grids))
    for combo in combos:
        HypernetworkConfig(**{k: expected(v) for k, v in zip(keys, combo, strict=True)})
    assert len(combos) >= 100


def test_a_parameter_that_is_not_a_config_key_is_caught():
    bogus = {**SWEEP, "parameters": {**SWEEP["parameters"], "train.lr": {"values": [1e-4]}}}
    command = render(bogus, {"train.lr": 1e-4})
    with pytest.raises(ConfigCompositionException, match="train.lr"):
        compose_config("train", [*command[3:], "paths.output_dir=/tmp/x"])


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_the_rendered_command_is_a_valid_train_py_call_and_a_bad_key_fails_before_training(tmp_path):
    values = {key: parameter_values(spec)[-1] for key, spec in SWEEP["parameters"].items()}
    command = render(SWEEP, values)
    shown = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *command[3:], "--cfg", "job", "--resolve"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    job = yaml.safe_load(shown.stdout)
    for key, value in values.items():
        node = job
        for part in key.split("."):
            node = node[part]
        assert node == expected(value), key

    failed = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "train.lr=1e-4",
            "train.max_steps=1",
            "logger=none",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode != 0
    assert failed.stderr.startswith("hyperlit: error: train.lr=1e-4: no such key")  # one line (#27)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _multirun(tmp_path: Path, *overrides: str) -> Path:
    sweep_dir = tmp_path / "multi"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            *overrides,
            "train.max_steps=2",
            "logger=csv",
            "trainer.log_every_n_steps=1",
            f"hydra.sweep.dir={sweep_dir}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "callbacks.preview.every=0",
            "callbacks.preview.at_end=false",
            "~callbacks.progress",
            "trainer.enable_progress_bar=false",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return sweep_dir


def _last_loss(job_dir: Path) -> float:
    rows = (job_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("val/loss")  # what run(cfg) returns (optimized_metric)
    values = [row.split(",")[column] for row in rows[1:] if row.split(",")[column]]
    return float(values[-1])


@pytest.mark.slow
def test_basic_multirun_runs_two_jobs_into_separate_folders(tmp_path):
    sweep_dir = _multirun(tmp_path, "-m", "hypernet=swish_121,linear_121")
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    for job, name, activation in (("0", "swish_121", "swish"), ("1", "linear_121", "linear")):
        files = sorted(p.name for p in (sweep_dir / job / "hypernetworks").iterdir())
        assert files == [f"{name}.hyperlit.safetensors", f"{name}.pt"], (job, files)
        content = read_file(sweep_dir / job / "hypernetworks" / f"{name}.pt")
        assert content.config.activation == activation and content.step == 2
        assert f"hypernet={name}" in (sweep_dir / job / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.slow
def test_optuna_study_minimises_the_value_run_returns(tmp_path):
    pytest.importorskip(
        "hydra_plugins.hydra_optuna_sweeper",
        reason="hparams_search=optuna needs hydra-optuna-sweeper (the `sweep` extra)",
    )
    sweep_dir = _multirun(
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
    )
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    overrides = [yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) for job in jobs]
    assert overrides[0] != overrides[1]  # two different trials
    for job, trial in zip(jobs, overrides, strict=True):
        name = next(o.split("=", 1)[1] for o in trial if o.startswith("hypernet="))
        assert (job / "hypernetworks" / f"{name}.pt").is_file()
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    losses = [_last_loss(job) for job in jobs]
    assert results["best_value"] == pytest.approx(min(losses), rel=1e-6)
    best_job = jobs[losses.index(min(losses))]
    best_trial = yaml.safe_load((best_job / ".hydra" / "overrides.yaml").read_text())
    for key, value in results["best_params"].items():
        assert any(o.split("=", 1)[0] == key and yaml.safe_load(o.split("=", 1)[1]) == value for o in best_trial)
