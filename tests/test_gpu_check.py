"""benchmarks/gpu_check.py at toy sizes on the CPU (`--device cpu --tiny`): every code path the GPU run takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers.paths import REPO_ROOT


def test_the_gpu_check_runs_on_the_cpu_and_writes_its_table(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "benchmarks" / "gpu_check.py"),
            "--device",
            "cpu",
            "--tiny",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYPERLIT_CACHE_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "gpu_check.json").read_text())
    assert record["environment"]["device"] == "cpu" and record["tiny"] is True
    status = {(c["section"], c["name"]): c["status"] for c in record["checks"]}
    assert not [key for key, value in status.items() if value == "FAIL"]
    # The tiny default run: fp32 on the CPU is the reference itself; bf16-mixed is compared with it.
    assert status[("1 tiny run", "cpu bf16-mixed")] == "PASS"
    curves = {c["name"]: c["detail"].get("val_loss") for c in record["checks"] if c["section"] == "1 tiny run"}
    reference = {int(k): v for k, v in curves["CPU fp32 reference"].items()}
    assert sorted(reference) == [0, 1, 2, 3] and len(set(reference.values())) == 4  # scored at every step; it trains
    bf16 = {int(k): v for k, v in curves["cpu bf16-mixed"].items()}
    assert bf16[0] == reference[0]  # step 0 scores the same weights in fp32 (val/loss runs outside autocast)
    for label in ("SD1.5", "SDXL"):
        section = f"{'2' if label == 'SD1.5' else '3'} {label} step"
        for row in ("bare", "default", "ckpt", "compiled", "compiled loss = eager loss", "SDPA fused kernels"):
            assert status[(section, row)] == "PASS", (section, row)
        times = next(c for c in record["checks"] if c["section"] == section and c["name"] == "time / bare")
        assert times["detail"]["bare"] == 1.0 and set(times["detail"]) == {"bare", "default", "ckpt", "compiled"}
    assert status[("4 VAE decoder step", "tiny VAE 64 px")] == "PASS"
    assert status[("6 NCCL DDP", "2-process torchrun")] == "SKIP"  # no GPU: skipped with a line saying why
    assert status[("2 SD1.5 step", "goal >= 60 images/s")] == "SKIP"
    table = (out / "gpu_check.md").read_text()
    assert "| 2 SD1.5 step | default | PASS |" in table and "images/s" in table
    assert table.strip() in result.stdout  # the summary printed is the table written
