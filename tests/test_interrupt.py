"""Ctrl-C during training: the final file is still written (as A1111 does) and every file left is complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers.paths import REPO_ROOT

from hyperlit import files

pytestmark = pytest.mark.slow


def test_interrupted_run_leaves_only_complete_files(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "train.max_steps=100000",
            "callbacks.export.save_every=2",
            "callbacks.preview.every=0",
            "callbacks.preview.at_end=false",
            "logger=none",
            f"hydra.run.dir={out}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "callbacks.checkpoint.every_n_train_steps=2",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
        # a shell starts background jobs with SIGINT ignored, and children inherit that: restore the default so
        # Ctrl-C reaches the run however the tests were started (`pytest &` hung here for the 120 s timeout)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "hypernetworks" / "swish_121-4.pt").exists():
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()

    folder = out / "hypernetworks"
    final = files.read_file(folder / "swish_121.pt")
    assert final.step >= 4
    for path in folder.iterdir():
        assert not path.name.startswith("."), f"temporary file left behind: {path.name}"
        files.read_file(path)  # every file that exists is complete and readable
    assert (out / "checkpoints" / "last.ckpt").is_file()
