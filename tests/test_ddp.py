"""DDP on the CPU with real processes (gloo), launch checks, and webdataset coverage across ranks.

The two end-to-end tests run `train.py trainer=ddp_cpu` as a subprocess; Lightning's ddp launcher starts rank 1
by re-running the command. A test-only callback (tests/helpers/ddp_probe.py) writes, per rank, the hypernetwork digest
after every optimizer step and the captions of every batch.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers.config import compose_config
from helpers.ddp_probe import state_digest
from helpers.paths import REPO_ROOT, SAMPLE_DIR

from hyperlit import distributed, files
from hyperlit.hypernetwork import Hypernetwork
from hyperlit.tasks.hypernetwork.build import hypernetwork_config


def _sample_captions() -> list[str]:
    """One caption per sample image: its .txt, or A1111's rule for images without one (the file name without
    the leading number)."""
    captions = []
    for image in sorted(SAMPLE_DIR.glob("*.png")):
        txt = image.with_suffix(".txt")
        captions.append(txt.read_text().strip() if txt.is_file() else image.stem.split("-", 1)[1])
    return captions


SAMPLE_CAPTIONS = _sample_captions()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(
        OMP_NUM_THREADS="1",  # two processes on two cores: one thread each
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "tests"), env.get("PYTHONPATH", "")]),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        HYPERLIT_CACHE_DIR=str(tmp_path / "cache"),
    )
    return env


def _train(
    tmp_path: Path, *overrides: str, timeout: int = 240, val_count: int = 0, steps: int = 6
) -> subprocess.CompletedProcess:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    command = [
        sys.executable,
        str(REPO_ROOT / "train.py"),
        "trainer=ddp_cpu",
        "hypernet=linear_121",
        "logger=csv",
        f"train.max_steps={steps}",
        f"hydra.run.dir={tmp_path / 'out'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "~callbacks.progress",
        "trainer.enable_progress_bar=false",
        "callbacks.preview.steps=2",
        "data.batch_size=2",
        f"data.val_count={val_count}",  # 0: the tests below count every sample image
        "callbacks.ema.enabled=false",  # the final file is compared with the ranks' live weights
        "data.tag_dropout=0.0",  # captions identify the samples; the tiny family's dropout would empty some
        "+callbacks.probe._target_=helpers.ddp_probe.DDPProbe",
        f"+callbacks.probe.dirpath={tmp_path / 'probe'}",
        *overrides,
    ]
    result = subprocess.run(command, cwd=work, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _probes(tmp_path: Path) -> list[dict]:
    return [json.loads((tmp_path / "probe" / f"probe-rank{r}.json").read_text()) for r in (0, 1)]


def _digests(tmp_path: Path) -> list[list[str]]:
    return [(tmp_path / "probe" / f"digest-rank{r}.txt").read_text().split("\n")[:-1] for r in (0, 1)]


def _source_caption(prompt: str) -> str:
    """The sample caption a prompt was made from (templates wrap [filewords] in other words)."""
    matches = sorted((c for c in SAMPLE_CAPTIONS if c in prompt), key=len)
    assert matches, prompt
    return matches[-1]  # "orange triangle" (a file name) is also part of "orange triangle, sky background, ..."


def _assert_each_sample_once_per_epoch(probes: list[dict], epochs: int, steps_per_epoch: int) -> None:
    assert len(set(SAMPLE_CAPTIONS)) == len(SAMPLE_CAPTIONS) == 16  # captions identify the samples
    for epoch in range(epochs):
        seen = Counter(
            _source_caption(prompt)
            for probe in probes
            for batch in probe["batches"]
            if batch["epoch"] == epoch
            for prompt in batch["captions"]
        )
        assert seen == Counter(SAMPLE_CAPTIONS), f"epoch {epoch}: {seen}"
    # Both ranks took the same number of steps in every epoch (a DDP hang otherwise).
    per_rank = [Counter(b["epoch"] for b in probe["batches"]) for probe in probes]
    assert per_rank[0] == per_rank[1] == Counter({e: steps_per_epoch for e in range(epochs)})


def _assert_identical_hypernetworks(tmp_path: Path, final_pt: Path, steps: int = 6) -> None:
    rank0, rank1 = _digests(tmp_path)
    assert [line.split()[0] for line in rank0] == [str(s) for s in range(1, steps + 1)]
    assert rank0 == rank1  # after every optimizer step, not only at the end
    assert len({line.split()[1] for line in rank0}) == steps  # and training changed it at every step
    # The file rank 0 exported is that same network (an independent path: the A1111 .pt reader).
    assert rank0[-1].split()[1] == state_digest(files.load_hypernetwork(final_pt))


@pytest.mark.slow
def test_two_processes_on_folder_data(tmp_path):
    _train(
        tmp_path,
        "callbacks.preview.every=4",
        "callbacks.export.save_every=4",
        "callbacks.checkpoint.every_n_train_steps=4",
        steps=8,
    )
    out = tmp_path / "out"
    probes = _probes(tmp_path)
    assert [(p["global_rank"], p["world_size"], p["strategy"]) for p in probes] == [
        (0, 2, "DDPStrategy"),
        (1, 2, "DDPStrategy"),
    ]
    _assert_identical_hypernetworks(tmp_path, out / "hypernetworks" / "linear_121.pt", steps=8)

    # 16 images, batch 2, 2 ranks: 4 steps per epoch on each rank; 8 steps = 2 epochs.
    _assert_each_sample_once_per_epoch(probes, epochs=2, steps_per_epoch=4)

    # The cache was filled once (prepare_data, before the other rank's setup) and both ranks only read it.
    assert [(p["setup_vae_calls"], p["setup_text_calls"]) for p in probes] == [(0, 0), (0, 0)]

    # One set of outputs, in the one run dir both ranks share; previews ran mid-training without a deadlock.
    assert sorted(p.name for p in (out / "hypernetworks").iterdir()) == [
        "linear_121-4.pt",
        "linear_121-8.pt",
        "linear_121.hyperlit.safetensors",
        "linear_121.pt",
    ]
    grids = sorted(p.name for p in (out / "images").iterdir())
    assert grids == ["linear_121-0.png", "linear_121-4.png", "linear_121-8.png"]  # step 0, every 4, the end
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]  # save_top_k=0: last only
    assert [p.parent.name for p in tmp_path.rglob(".hydra")] == ["out"]
    assert list((tmp_path / "work").iterdir()) == []  # no second run dir from rank 1
    assert not list(tmp_path.rglob("*.tmp*"))


@pytest.mark.slow
def test_two_processes_keep_one_average_and_rank_0_exports_it(tmp_path):
    """callbacks.ema under DDP: every rank updates its average from the same weights, so the averages agree after
    every step, and the file rank 0 writes is that average (not the last step's weights)."""
    _train(tmp_path, "callbacks.ema.enabled=true", "callbacks.ema.decay=0.5", "callbacks.preview.every=0",
           "callbacks.preview.at_end=false", steps=4)  # fmt: skip
    rank0, rank1 = _digests(tmp_path)
    assert rank0 == rank1
    averages = [(tmp_path / "probe" / f"average-rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert [line.split()[0] for line in averages[0]] == ["1", "2", "3", "4"]
    assert averages[0] == averages[1]
    final = state_digest(files.load_hypernetwork(tmp_path / "out" / "hypernetworks" / "linear_121.pt"))
    assert final == averages[0][-1].split()[1] and final != rank0[-1].split()[1]


@pytest.mark.slow
def test_two_processes_on_webdataset_shards(tmp_path):
    from hyperlit.data import make_shards

    shards = make_shards(SAMPLE_DIR, tmp_path / "shards", resolution=64, samples_per_shard=4, name="linear_121")
    assert len(shards) == 4
    urls = str(tmp_path / "shards" / "shard-{000000..000003}.tar")
    _train(
        tmp_path,
        "data=webdataset",
        f"data.urls='{urls}'",
        "data.epoch_length=16",
        "data.num_workers=0",
        "data.resolution=64",
        "callbacks.preview.every=0",
        steps=8,  # default shuffle buffer (1000)
    )
    out = tmp_path / "out"
    _assert_identical_hypernetworks(tmp_path, out / "hypernetworks" / "linear_121.pt", steps=8)
    # Finite shards, no resampling: split by node, every sample exactly once per epoch across the two ranks
    # (16 samples in 4 shards, 2 shards per rank, batch 2: 4 steps per epoch; 8 steps = 2 epochs).
    _assert_each_sample_once_per_epoch(_probes(tmp_path), epochs=2, steps_per_epoch=4)
    # rank 0 alone writes, and only the final files: with the tiny family's dropout (0.5) the ComfyUI inference copy too
    assert sorted(p.name for p in (out / "hypernetworks").iterdir()) == [
        "linear_121.comfyui.pt",
        "linear_121.hyperlit.safetensors",
        "linear_121.pt",
    ]
    assert [p.parent.name for p in tmp_path.rglob(".hydra")] == ["out"]


def _val_losses(run_dir: Path) -> dict[int, str]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(row["step"]): row["val/loss"] for row in csv.DictReader(f) if row.get("val/loss")}


@pytest.mark.slow
def test_val_loss_is_the_same_with_one_and_two_processes(tmp_path):
    start = tmp_path / "start.pt"
    config = hypernetwork_config(compose_config("train", ["hypernet=linear_121"]).hypernet)
    network = Hypernetwork(config, sizes=[48, 32, 64])  # every width of the tiny model
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    files.save_hypernetwork(network, start)
    common = (
        f"hypernet.init_from={start}", "train.max_steps=2", "callbacks.preview.every=0",
        "callbacks.preview.at_end=false", "callbacks.export.save_every=0", "callbacks.validation.every=1",
    )  # fmt: skip
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    _train(tmp_path / "one", *common, "trainer.devices=1", val_count=2)
    _train(tmp_path / "two", *common, val_count=2)
    one, two = _val_losses(tmp_path / "one" / "out"), _val_losses(tmp_path / "two" / "out")
    assert sorted(one) == sorted(two) == [0, 1, 2]
    # The same start weights score the same whatever the world size: every rank scores every held-out image.
    assert one[0] == two[0]


# --- webdataset splitting without processes: the DataModule told its rank as Lightning would ---


def _rank_batches(urls: str, rank: int, epoch: int = 0, **options) -> list[dict]:
    from helpers.fakes import FakeEncoder

    from hyperlit.data import WebDataModule

    options = {"resolution": 64, "batch_size": 2, "num_workers": 0, "epoch_length": 12, **options}
    dm = WebDataModule(urls=urls, encoder=FakeEncoder(), **options)
    dm.trainer = type("T", (), {"global_rank": rank, "world_size": 2, "current_epoch": epoch})()
    dm.setup("fit")
    return list(dm.train_dataloader())


def _shards(tmp_path: Path, n: int, per_shard: int) -> str:
    from helpers.images import make_folder

    from hyperlit.data import make_shards

    make_shards(make_folder(tmp_path / "d", n=n), tmp_path / "s", samples_per_shard=per_shard)
    return str(tmp_path / "s" / f"shard-{{000000..{(n + per_shard - 1) // per_shard - 1:06d}}}.tar")


def test_uneven_shards_still_give_every_rank_the_same_number_of_steps(tmp_path):
    urls = _shards(tmp_path, n=10, per_shard=3)  # shards of 3, 3, 3, 1 samples: rank 0 holds 6, rank 1 holds 4
    counts = [len(_rank_batches(urls, rank, epoch_length=10, shuffle_buffer=0)) for rank in (0, 1)]
    assert counts == [3, 3]  # ceil(10 / (2 * 2)); rank 1 wraps around its shards instead of running dry


def test_resampled_streams_are_endless_and_differ_per_rank(tmp_path):
    urls = _shards(tmp_path, n=8, per_shard=2)
    batches = [_rank_batches(urls, rank, epoch_length=40, resampled=True, shuffle_buffer=0) for rank in (0, 1)]
    assert [len(b) for b in batches] == [10, 10]  # 40 samples > 8 in the shards: endless, exact per rank
    shas = [[s for b in rank_batches for s in b["sha"]] for rank_batches in batches]
    assert shas[0] != shas[1]


def test_default_shuffle_buffer_keeps_each_sample_once_per_epoch(tmp_path):
    # The sample shuffle buffer (default 1000) must not pull samples of the next pass into this epoch.
    urls = _shards(tmp_path, n=12, per_shard=3)
    orders = []
    for epoch in (0, 1):
        order = [s for rank in (0, 1) for b in _rank_batches(urls, rank, epoch) for s in b["sha"]]
        assert len(order) == 12 and len(set(order)) == 12, Counter(order)
        orders.append(order)
    assert set(orders[0]) == set(orders[1]) and orders[0] != orders[1]  # reshuffled per epoch


def test_two_passes_in_one_epoch_still_shuffle_within_each_pass(tmp_path):
    urls = _shards(tmp_path, n=8, per_shard=2)
    seen = Counter(s for rank in (0, 1) for b in _rank_batches(urls, rank, epoch_length=16) for s in b["sha"])
    assert len(seen) == 8 and set(seen.values()) == {2}  # every sample exactly twice: two whole passes


# --- errors at the door ---


def _fail_if_model_loads(monkeypatch):
    import hyperlit.models

    def boom(**kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(hyperlit.models, "load_components", boom)


def test_torchrun_world_that_does_not_match_devices_is_an_error_before_the_model_loads(train_cfg, monkeypatch):
    from hyperlit.runner import run

    _fail_if_model_loads(monkeypatch)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "0",
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"trainer.devices=4: torchrun started 2 process\(es\) per node"):
        run(train_cfg("trainer=ddp_cpu", "trainer.devices=4"))
    with pytest.raises(ValueError, match=r"trainer.num_nodes=1: .* 2 node\(s\); set trainer.num_nodes=2"):
        run(train_cfg("trainer=ddp_cpu", "trainer.devices=2"))


def test_slurm_nodes_and_tasks_that_do_not_match_are_errors(train_cfg, monkeypatch):
    from hyperlit.runner import run

    _fail_if_model_loads(monkeypatch)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for key, value in {
        "SLURM_NTASKS": "8",
        "SLURM_JOB_NAME": "hn",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_PROCID": "0",
    }.items():
        monkeypatch.setenv(key, value)
    assert distributed.launcher() == "slurm"
    with pytest.raises(ValueError, match=r"trainer.num_nodes=1: the SLURM job has 2 node\(s\)"):
        run(train_cfg("trainer=ddp_cpu", "trainer.devices=4"))
    with pytest.raises(ValueError, match=r"trainer.devices=2: the SLURM job runs 4 task\(s\) per node"):
        run(train_cfg("trainer=multinode", "trainer.accelerator=cpu", "trainer.num_nodes=2", "trainer.devices=2"))
    # The matching numbers pass the check (and would then load the model).
    distributed.check_launch({"strategy": "ddp", "devices": 4, "num_nodes": 2})


def test_webdataset_url_matching_no_shard_is_an_error_before_the_model_loads(train_cfg, monkeypatch, tmp_path):
    from hyperlit.runner import run

    _fail_if_model_loads(monkeypatch)
    pattern = str(tmp_path / "missing" / "shard-{000000..000003}.tar")
    with pytest.raises(FileNotFoundError, match="data.urls") as err:
        run(train_cfg("data=webdataset", f"data.urls='{pattern}'", "data.resolution=64"))
    assert "shard-000000.tar" in str(err.value)


def test_multirun_with_the_relaunching_ddp_strategy_is_refused():
    for trainer in (
        {"strategy": "ddp", "devices": 2},
        {"strategy": "auto", "devices": 2},
        {"strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy"}, "devices": [0, 1]},
        {"strategy": "ddp", "devices": 1, "num_nodes": 2},
    ):
        with pytest.raises(ValueError, match="trainer.strategy=ddp_spawn"):
            distributed.check_launch(trainer, multirun=True)
    for trainer in (
        {"strategy": "ddp_spawn", "devices": 2},
        {"strategy": "ddp", "devices": 1},
        {"strategy": "auto", "devices": 1},
    ):
        distributed.check_launch(trainer, multirun=True)
    distributed.check_launch({"strategy": "ddp", "devices": 2}, multirun=False)


@pytest.mark.slow
def test_multirun_with_ddp_from_the_command_line_says_what_to_use(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "-m",
            "trainer=ddp_cpu",
            "hypernet=swish_121,linear_121",
            f"hydra.sweep.dir={tmp_path / 'multi'}",
            "logger=none",
        ],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "cannot run inside a Hydra multirun" in result.stderr and "ddp_spawn" in result.stderr
    assert not list(tmp_path.rglob("*.pt"))


class _FakeStrategy:
    def __init__(self, rank0: tuple) -> None:
        self.rank0 = rank0

    def broadcast(self, obj, src=0):
        return self.rank0

    def reduce_boolean_decision(self, decision, all=True):
        return decision


def test_ranks_that_disagree_on_the_run_dir_or_config_fail_together():
    check = distributed.RankAgreement({"a": 1}, "/runs/00-00-01")
    trainer = type("T", (), {"world_size": 2, "global_rank": 1})()
    trainer.strategy = _FakeStrategy(("/runs/00-00-00", check.digest))
    with pytest.raises(RuntimeError, match="rank 1 writes to /runs/00-00-01, rank 0 to /runs/00-00-00"):
        check.setup(trainer, None, "fit")
    trainer.strategy = _FakeStrategy(("/runs/00-00-01", distributed.config_digest({"a": 2})))
    with pytest.raises(RuntimeError, match="different config"):
        check.setup(trainer, None, "fit")
    trainer.strategy = _FakeStrategy(("/runs/00-00-01", check.digest))
    check.setup(trainer, None, "fit")  # agreement: no error


def test_rank_helpers_follow_the_launchers(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.env_rank() == 0 and distributed.is_global_zero() and distributed.launcher() is None
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.env_rank() == 1 and distributed.launcher() == "lightning"
    monkeypatch.setenv("RANK", "3")
    assert distributed.env_rank() == 3 and not distributed.is_global_zero()
    assert distributed.processes_per_node("0,1,2") == 3
    assert distributed.processes_per_node([0, 1]) == 2
    assert distributed.processes_per_node("auto") is None
    assert distributed.processes_per_node(-1, "cpu") is None


def test_only_global_rank_zero_writes_the_hydra_folder(monkeypatch):
    def output_subdir() -> str | None:
        return compose_config("train", return_hydra_config=True).hydra.output_subdir

    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert output_subdir() == ".hydra"
    monkeypatch.setenv("RANK", "1")  # torchrun's second process
    assert output_subdir() is None
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_PROCID", "0")  # srun's first task
    assert output_subdir() == ".hydra"


@pytest.mark.slow
def test_torchrun_processes_share_one_run_dir(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed beside this python")
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            str(REPO_ROOT / "train.py"),
            "trainer=ddp_cpu",
            "hypernet=linear_121",
            "logger=none",
            "train.max_steps=3",
            f"hydra.run.dir={tmp_path / 'out'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "callbacks.preview.every=0",
            "callbacks.preview.at_end=false",
            "data.batch_size=2",
            "~callbacks.progress",
            "trainer.enable_progress_bar=false",
            "+callbacks.probe._target_=helpers.ddp_probe.DDPProbe",
            f"+callbacks.probe.dirpath={tmp_path / 'probe'}",
        ],
        cwd=work,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = _digests(tmp_path)
    assert len(rank0) == 3 and rank0 == rank1
    assert [p["global_rank"] for p in _probes(tmp_path)] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "out" / "hypernetworks").iterdir()) == [
        "linear_121.hyperlit.safetensors",
        "linear_121.pt",
    ]
    assert [p.parent.name for p in tmp_path.rglob(".hydra")] == ["out"] and list(work.iterdir()) == []
