"""Runs that survive the cluster: SLURM pre-emption and requeue, ``ckpt_path=last``, torchrun elastic restarts.

Each restart path runs ``train.py`` as the cluster would, with nobody editing the command between attempts, and the
run must end bitwise equal to one that was never stopped. The faults come from tests/helpers/faults.py (a signal
sent once, mid-step); SLURM is the ``SLURM_*`` variables plus a stub ``scontrol`` on PATH that records the requeue.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.paths import REPO_ROOT
from PIL import Image

from hyperlit import files
from hyperlit.resume import CONFIG_KEY, differing_keys, newest_checkpoint, read_checkpoint

TINY_RUN = (
    "hypernet=swish_121_dropout",  # dropout masks come from the RNG too
    "logger=csv",
    "~callbacks.progress",
    "trainer.enable_progress_bar=false",
    "data.batch_size=4",
    "callbacks.preview.steps=2",
)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    drop = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "tests"), env.get("PYTHONPATH", "")]),
        HYPERLIT_CACHE_DIR=str(tmp_path / "cache"),
        **extra,
    )
    return env


def _val_losses(run_dir: Path) -> dict[int, float]:
    """step -> val/loss from the run's CSV log; a step logged by two attempts must carry the same value."""
    found: dict[int, float] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("val/loss"):
                step, value = int(row["step"]), float(row["val/loss"])
                assert found.setdefault(step, value) == value, (step, found[step], value)
    return found


def _assert_same_outputs(reference: Path, resumed: Path) -> None:
    """Exports (EMA weights when the run keeps one), previews and val/loss at the same steps, bit for bit."""
    names = sorted(p.name for p in (reference / "hypernetworks").iterdir())
    assert names == sorted(p.name for p in (resumed / "hypernetworks").iterdir())
    for name in names:
        if name.endswith(".pt"):
            a, b = (
                files.load_hypernetwork(reference / "hypernetworks" / name),
                files.load_hypernetwork(resumed / "hypernetworks" / name),
            )
            assert a.step == b.step, name
            for key, value in a.state_dict().items():
                assert torch.equal(b.state_dict()[key], value), (name, key)
    images = sorted(p.name for p in (reference / "images").iterdir())
    assert images and images == sorted(p.name for p in (resumed / "images").iterdir())
    for name in images:
        a, b = (np.asarray(Image.open(d / "images" / name)) for d in (reference, resumed))
        assert np.array_equal(a, b), name
    assert _val_losses(reference) == _val_losses(resumed)
    assert not list(resumed.rglob(".*.tmp"))


# --- SLURM: SIGUSR1 -> HPC checkpoint + scontrol requeue -> SIGTERM, SIGKILL -> the same command resumes ---

STUB_SCONTROL = """#!/bin/sh
# what `scontrol` would be asked to do, for the test to read
echo "$@" >> "$SCONTROL_LOG"
"""


def _slurm_env(tmp_path: Path, job_id: str) -> dict[str, str]:
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "scontrol").write_text(STUB_SCONTROL)
    (stub / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "hyperlit",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    return _env(tmp_path, PATH=f"{stub}{os.pathsep}{os.environ['PATH']}", SCONTROL_LOG=str(tmp_path / "scontrol.log"),
                **slurm)  # fmt: skip


def _slurm_command(tmp_path: Path, marker: Path, steps: int, signal_step: int) -> list[str]:
    return [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        *TINY_RUN,
        f"train.max_steps={steps}",
        f"paths.log_dir={tmp_path / 'logs'}",  # the run dir is logs/slurm-<job id>: the same in every attempt
        f"data.cache_dir={tmp_path / 'cache'}",
        "callbacks.ema.enabled=true",
        "callbacks.ema.decay=0.7",
        "callbacks.export.save_every=2",
        "callbacks.preview.every=2",
        "callbacks.validation.every=1",
        "callbacks.checkpoint.every_n_train_steps=1000",  # only the HPC checkpoint to resume from
        "+callbacks.fault._target_=helpers.faults.SignalOnce",
        f"+callbacks.fault.marker={marker}",
        f"+callbacks.fault.step={signal_step}",
    ]


def _end_like_slurm(process: subprocess.Popen, requeued: Path, kill_wait: float = 20.0) -> None:
    """Once `scontrol requeue` was called: SIGTERM to the job, SIGKILL after `kill_wait` s (SLURM's KillWait)."""
    deadline = time.monotonic() + 600
    while not requeued.exists():
        assert process.poll() is None, f"the run ended without requeueing: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no requeue within 10 minutes"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=kill_wait)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_slurm_requeue_resumes_by_itself_and_ends_bitwise_equal(tmp_path):
    steps, signal_step = 6, 3
    reference_marker = tmp_path / "reference.fired"
    reference_marker.write_text("never fire\n")
    command_ref = _slurm_command(tmp_path, reference_marker, steps, signal_step)
    done = subprocess.run(command_ref, cwd=tmp_path, env=_slurm_env(tmp_path, "4241"), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    reference = tmp_path / "logs" / "slurm-4241"
    assert not list(reference.glob("hpc_ckpt_*.ckpt"))

    marker = tmp_path / "job.fired"
    command = _slurm_command(tmp_path, marker, steps, signal_step)
    env = _slurm_env(tmp_path, "4242")
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        _end_like_slurm(first, tmp_path / "scontrol.log")
    finally:
        if first.poll() is None:
            first.kill()
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    run_dir = tmp_path / "logs" / "slurm-4242"
    hpc = read_checkpoint(run_dir / "hpc_ckpt_1.ckpt")
    # SIGUSR1 arrived between step 3's backward pass and its update: saved at the end of step 3, not in the middle
    assert hpc is not None and hpc.global_step == signal_step
    assert not (run_dir / "hypernetworks" / "swish_121_dropout.pt").exists()  # killed: no final file

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {run_dir / 'hpc_ckpt_1.ckpt'} (step {signal_step})" in second.stdout
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # the second attempt was not requeued
    _assert_same_outputs(reference, run_dir)


class _FakeStrategy:
    def __init__(self, anyone: bool) -> None:
        self.anyone = anyone

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        assert all is False  # "any rank got the signal"
        return decision or self.anyone


def test_the_requeue_signal_is_handled_at_the_end_of_the_step():
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from hyperlit.callbacks.requeue import RequeueAtStepBoundary

    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))  # stands for Lightning's
    try:
        callback = RequeueAtStepBoundary(SLURMEnvironment(auto_requeue=True, requeue_signal=signal.SIGUSR1))
        trainer = type("T", (), {"world_size": 1})()
        callback.on_train_start(trainer, None)
        os.kill(os.getpid(), signal.SIGUSR1)  # mid-step: only noted
        assert calls == [] and callback.pending
        callback.on_train_batch_end(trainer, None)  # the step's end: Lightning's save + requeue, once
        callback.on_train_batch_end(trainer, None)
        assert calls == [signal.SIGUSR1] and not callback.pending
        # Several ranks: one rank saw the signal, so every rank saves at this same boundary.
        trainer = type("T", (), {"world_size": 2, "strategy": _FakeStrategy(anyone=True)})()
        callback.on_train_batch_end(trainer, None)
        assert calls == [signal.SIGUSR1] * 2
        trainer.strategy = _FakeStrategy(anyone=False)
        callback.on_train_batch_end(trainer, None)
        assert calls == [signal.SIGUSR1] * 2
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_the_run_dir_is_the_same_for_every_attempt_of_a_job(monkeypatch):
    from hyperlit.distributed import run_name

    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))] + ["RANK", "LOCAL_RANK"]:
        monkeypatch.delenv(key, raising=False)
    assert len(run_name().split("/")) == 2  # <date>/<time> when no launcher is involved
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "a1b2")
    assert run_name() == "torchrun-a1b2"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242"}.items():
        monkeypatch.setenv(key, value)
    assert run_name() == "slurm-4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert run_name() == "slurm-4240_2"
    from helpers.config import compose_config

    assert compose_config("train", return_hydra_config=True).hydra.run.dir == "outputs/slurm-4240_2"


# --- ckpt_path=last ---


def _quiet(tmp_path: Path, run: str, *overrides: str) -> list[str]:
    return [
        f"paths.output_dir={tmp_path / run}",
        "callbacks.preview.every=0",
        "callbacks.preview.at_end=false",
        "callbacks.export.save_every=0",
        "callbacks.checkpoint.every_n_train_steps=2",
        *overrides,
    ]


def test_last_without_a_checkpoint_starts_fresh_and_says_so(train_cfg, tmp_path, caplog):
    from hyperlit.resume import resume_path

    with caplog.at_level("INFO", logger="hyperlit.resume"):
        assert resume_path(train_cfg(*_quiet(tmp_path, "run"), "ckpt_path=last")) is None
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"ckpt_path=last: no checkpoint in {tmp_path / 'run'} yet; starting fresh"]


@pytest.mark.slow
def test_last_resumes_from_the_newest_complete_checkpoint_and_refuses_another_config(train_cfg, tmp_path, monkeypatch):
    from hyperlit.runner import build_run, fit

    first = train_cfg(*_quiet(tmp_path, "run"), "ckpt_path=last", steps=4)
    fit(build_run(first), first)
    checkpoints = tmp_path / "run" / "checkpoints"
    saved = read_checkpoint(checkpoints / "last.ckpt")
    assert saved is not None and saved.global_step == 4 and saved.config is not None
    assert saved.config["hypernet"]["layer_structure"] == [1, 2, 1]  # the run's resolved config rides along

    # A newer-looking file that is cut off is not a checkpoint; an older complete one is not the newest.
    (tmp_path / "run" / "hpc_ckpt_1.ckpt").write_bytes((checkpoints / "last.ckpt").read_bytes()[:5000])
    older = torch.load(checkpoints / "last.ckpt", weights_only=True)
    older["global_step"] = 2
    torch.save(older, checkpoints / "step-step=2.ckpt")
    assert newest_checkpoint(tmp_path / "run", checkpoints).path == checkpoints / "last.ckpt"

    # The same command with more steps continues from step 4.
    resumed = train_cfg(*_quiet(tmp_path, "run"), "ckpt_path=last", steps=6)
    built = build_run(resumed)
    assert built.ckpt_path == str(checkpoints / "last.ckpt")
    fit(built, resumed)
    assert built.trainer.global_step == 6

    # Anything that changes the result is refused before the model loads, naming every key that differs.
    changed = train_cfg(*_quiet(tmp_path, "run"), "ckpt_path=last", "hypernet=relu_1221_ln", "seed=7", steps=8)
    import hyperlit.models
    from hyperlit.errors import bad_input_message

    def refuse(**kwargs):
        raise AssertionError("a model was loaded before the config was refused")

    monkeypatch.setattr(hyperlit.models, "load_components", refuse)
    with pytest.raises(ValueError) as err:
        build_run(changed)
    message = bad_input_message(err.value, changed)
    assert message is not None and "\n" not in message
    for key in ("hypernet.layer_structure", "hypernet.activation", "hypernet.layer_norm", "seed (42 -> 7)"):
        assert key in message, key
    assert "train.max_steps" not in message and "paths.output_dir" not in message


def test_only_keys_that_change_the_result_are_compared():
    saved = {"model": {"path": "/m/a.safetensors", "family": "sd15"}, "paths": {"output_dir": "/a"},
             "train": {"max_steps": 100, "learning_rate": 1e-5}, "callbacks": {"ema": {"decay": 0.99},
             "preview": {"every": 100}}, "data": {"path": "/d", "cache_dir": "/c1"}, CONFIG_KEY: None}  # fmt: skip
    now = {"model": {"path": "/m/b.safetensors", "family": "sd15"}, "paths": {"output_dir": "/b"},
           "train": {"max_steps": 300, "learning_rate": 1e-5}, "callbacks": {"ema": {"decay": 0.9},
           "preview": {"every": 5}}, "data": {"path": "/d", "cache_dir": "/c2", "tag_dropout": 0.1}}  # fmt: skip
    assert differing_keys(saved, now) == {
        "model.path": ("/m/a.safetensors", "/m/b.safetensors"),
        "callbacks.ema.decay": (0.99, 0.9),
        "data.tag_dropout": ("<unset>", 0.1),
        CONFIG_KEY: (None, "<unset>"),
    }


# --- torchrun elastic: one worker killed mid-run, torchrun restarts the group, ckpt_path=last continues ---


def _torchrun(tmp_path: Path, log_dir: Path, marker: Path, steps: int, kill_step: int) -> Path:
    """The issue's command, with nothing pinned but the log dir: returns the run dir (log_dir/torchrun-<run id>)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # torchrun, whether or not its script is installed beside this python
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=2",
        str(REPO_ROOT / "train.py"),
        "trainer=ddp_cpu",
        "ckpt_path=last",
        *TINY_RUN,
        "data.batch_size=2",
        f"train.max_steps={steps}",
        f"paths.log_dir={log_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "callbacks.ema.enabled=true",
        "callbacks.ema.decay=0.7",
        "callbacks.export.save_every=2",
        "callbacks.preview.every=2",
        "callbacks.validation.every=1",
        "callbacks.checkpoint.every_n_train_steps=1",
        "+callbacks.fault._target_=helpers.faults.SignalOnce",
        f"+callbacks.fault.marker={marker}",
        f"+callbacks.fault.step={kill_step}",
        "+callbacks.fault.signal_name=SIGKILL",
        "+callbacks.fault.rank=1",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    (run_dir,) = log_dir.glob("torchrun-*")  # one run dir for both workers and every restart
    (run_dir / "torchrun.log").write_text(result.stdout + result.stderr)
    return run_dir


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_ends_bitwise_equal(tmp_path):
    steps, kill_step = 4, 3
    reference_marker = tmp_path / "reference.fired"
    reference_marker.write_text("never fire\n")
    reference = _torchrun(tmp_path, tmp_path / "reference", reference_marker, steps, kill_step)
    assert "resuming" not in (reference / "torchrun.log").read_text()

    marker = tmp_path / "job.fired"
    run_dir = _torchrun(tmp_path, tmp_path / "job", marker, steps, kill_step)
    assert marker.read_text() == f"SIGKILL at step {kill_step}\n"  # rank 1 died in the middle of step 3
    log = (run_dir / "torchrun.log").read_text()
    assert "ckpt_path=last: no checkpoint in" in log  # the first attempt started fresh and said so
    # The restarted group found the newest checkpoint by itself: step 2's, or step 3's when rank 0 finished that
    # step (its gradients were already averaged when rank 1 died) and saved before torchrun stopped it.
    resumed = [f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'} (step {n})" in log for n in (2, 3)]
    assert any(resumed), log[-3000:]
    _assert_same_outputs(reference, run_dir)
