"""End-to-end hypernetwork training on the tiny embedded model: files, frozen weights, resume, bad input."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.a1111_reference import a1111_load, a1111_safe_check, apply_pairs
from helpers.paths import REPO_ROOT

from hyperlit import files
from hyperlit.callbacks.validation import ValidationLoss
from hyperlit.models import load_components
from hyperlit.runner import build_run, fit, run

pytestmark = pytest.mark.slow


def _digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _ckpt_hypernetwork_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return state


def test_run_writes_a1111_files_and_keeps_the_base_model_frozen(train_cfg, tmp_path):
    cfg = train_cfg(
        "callbacks.export.save_every=2",
        "callbacks.preview.every=2",
        "callbacks.checkpoint.every_n_train_steps=2",
        steps=4,
    )
    reference = load_components(family="tiny")
    before = {name: _digest(getattr(reference, name)) for name in ("unet", "vae", "text_encoder")}

    built = build_run(cfg)
    loss = fit(built, cfg)
    out = tmp_path / "run"

    assert loss is not None and torch.isfinite(torch.tensor(loss))
    assert built.trainer.global_step == 4
    # what run(cfg) returns is val/loss (optimized_metric) of the final weights; it was also scored at step 0
    validation = next(cb for cb in built.trainer.callbacks if isinstance(cb, ValidationLoss))
    assert sorted(validation.scores) == [0, 4] and loss == validation.scores[4]
    for name in ("swish_121-2.pt", "swish_121-4.pt", "swish_121.pt", "swish_121.hyperlit.safetensors"):
        assert (out / "hypernetworks" / name).is_file(), name
    grids = sorted(p.name for p in (out / "images").glob("*.png"))
    assert grids == ["swish_121-0.png", "swish_121-2.png", "swish_121-4.png"]
    assert (out / "checkpoints" / "last.ckpt").is_file()

    # Frozen means frozen: bit-identical to a fresh build, no gradients, nothing of it in the checkpoint.
    components = built.module.components
    after = {name: _digest(getattr(components, name)) for name in ("unet", "vae", "text_encoder")}
    assert after == before
    assert not any(p.requires_grad for p in components.unet.parameters())
    ckpt_state = _ckpt_hypernetwork_state(out / "checkpoints" / "last.ckpt")
    assert ckpt_state and all(key.startswith("hypernetwork.") for key in ckpt_state)

    # The exported .pt equals the trained module, read by hyperlit's reader ...
    trained = built.module.hypernetwork
    loaded = files.load_hypernetwork(out / "hypernetworks" / "swish_121.pt")
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.cpu()), key
    assert loaded.step == 4
    assert loaded.sd_checkpoint == components.checkpoint_hash and loaded.sd_checkpoint_name == "tiny"
    # ... and by the checkpoint, a second independent path.
    for key, value in trained.state_dict().items():
        assert torch.equal(ckpt_state[f"hypernetwork.{key}"], value.cpu()), key

    # A1111's rules: the file passes its safe unpickler and its loader computes the same function.
    a1111_safe_check(out / "hypernetworks" / "swish_121.pt")
    pairs = a1111_load(out / "hypernetworks" / "swish_121.pt")
    trained.eval()
    for width in trained.sizes:
        context = torch.randn(2, 5, width)
        expected_k, expected_v = apply_pairs(pairs, context)
        k, v = trained.forward_kv(context)
        torch.testing.assert_close(k, expected_k, atol=1e-6, rtol=0)
        torch.testing.assert_close(v, expected_v, atol=1e-6, rtol=0)


def test_train_py_as_a_subprocess(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "hypernet=linear_121",
            "train.max_steps=2",
            "logger=csv",
            f"hydra.run.dir={out}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "callbacks.preview.every=0",
            "callbacks.preview.steps=2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "hypernetworks" / "linear_121.pt").is_file()
    assert (out / ".hydra" / "config.yaml").is_file()
    assert "name: linear_121" in (out / "csv" / "hparams.yaml").read_text()  # the resolved config was logged
    content = files.read_file(out / "hypernetworks" / "linear_121.pt")
    assert content.config.activation == "linear" and content.step == 2


def test_resume_continues_at_the_saved_step_with_the_saved_optimizer_state(train_cfg, tmp_path):
    common = (
        "callbacks.preview.every=0",
        "callbacks.preview.at_end=false",
        "callbacks.export.save_every=0",
        "callbacks.checkpoint.every_n_train_steps=3",
        "train.learning_rate='5e-4:4, 1e-4:6'",
    )
    first = build_run(train_cfg(*common, steps=3))
    fit(first, train_cfg(*common, steps=3))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    saved_exp_avg = saved["optimizer_states"][0]["state"][0]["exp_avg"]

    seen: dict = {}

    import lightning as L

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if "step" not in seen:
                seen["step"] = trainer.global_step
                seen["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
                seen["exp_avg"] = (
                    trainer.optimizers[0].state[next(iter(pl_module.hypernetwork.parameters()))]["exp_avg"].clone()
                )
                seen["weights"] = {k: v.clone() for k, v in pl_module.hypernetwork.state_dict().items()}

    cfg = train_cfg(*common, f"ckpt_path={last}", steps=6)
    second = build_run(cfg)
    second.trainer.callbacks.append(Probe())
    fit(second, cfg)

    assert seen["step"] == 3
    assert torch.equal(seen["exp_avg"], saved_exp_avg)
    for key, value in seen["weights"].items():
        assert torch.equal(value, saved["state_dict"][f"hypernetwork.{key}"])
    assert seen["lr"] == pytest.approx(5e-4)  # step 3 < 4: the first segment of the A1111 string
    assert second.trainer.global_step == 6  # the schedule ends at 6: training stops there
    assert second.module.hypernetwork.step == 6


def test_overfitting_a_fixed_batch_lowers_the_loss(train_cfg):
    built = build_run(train_cfg())
    module = built.module
    datamodule = built.datamodule
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    batch = {key: value[:2] for key, value in batch.items()}  # two samples keep it quick on a CPU
    module.on_fit_start()
    optimizer = torch.optim.AdamW(module.hypernetwork.parameters(), lr=3e-3)

    def loss_now() -> torch.Tensor:
        return module.compute_loss(batch, generator=torch.Generator().manual_seed(0)).mean()

    with torch.no_grad():
        initial = loss_now().item()
    for _ in range(40):
        optimizer.zero_grad()
        loss = loss_now()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = loss_now().item()
    module.on_fit_end()
    assert final < 0.8 * initial, (initial, final)  # measured: 1.207 -> 0.871


def test_init_from_continues_a_file_and_rejects_one_that_does_not_fit(train_cfg, tmp_path):
    cfg = train_cfg("callbacks.preview.every=0", "callbacks.preview.at_end=false", steps=2)
    run(cfg)
    produced = tmp_path / "run" / "hypernetworks" / "swish_121.pt"
    assert files.read_file(produced).step == 2

    copy = tmp_path / "start.pt"
    copy.write_bytes(produced.read_bytes())
    cfg2 = train_cfg(
        "callbacks.preview.every=0",
        "callbacks.preview.at_end=false",
        f"hypernet.init_from={copy}",
        f"paths.output_dir={tmp_path / 'run2'}",
        steps=2,
    )
    built = build_run(cfg2)
    start = files.load_hypernetwork(copy)
    for key, value in start.state_dict().items():
        assert torch.equal(built.module.hypernetwork.state_dict()[key], value)
    fit(built, cfg2)
    assert files.read_file(tmp_path / "run2" / "hypernetworks" / "swish_121.pt").step == 4

    bad = train_cfg(f"hypernet.init_from={copy}", "hypernet=relu_1221_ln")
    with pytest.raises(ValueError) as err:
        build_run(bad)
    message = str(err.value)
    assert "hypernet.init_from" in message and "hypernet.layer_structure" in message
    assert "hypernet.activation" in message and "hypernet.layer_norm" in message


@pytest.mark.parametrize("stop_at", [3, 4], ids=["end-of-epoch", "mid-epoch"])  # 3 batches per epoch
def test_resumed_run_reaches_the_same_weights_as_an_uninterrupted_one(train_cfg, tmp_path, stop_at):
    common = (
        "callbacks.preview.every=0",
        "callbacks.preview.at_end=false",
        "callbacks.export.save_every=0",
        "callbacks.checkpoint.every_n_train_steps=1",
        "train.learning_rate=1e-3",
        "hypernet=swish_121_dropout",
        "data.batch_size=4",  # the sample set's 14 training images in 3 batches per epoch (the demo recipe uses 6)
    )  # dropout masks come from the RNG too
    straight = build_run(train_cfg(*common, f"paths.output_dir={tmp_path / 'a'}", steps=6))
    fit(straight, train_cfg(*common, f"paths.output_dir={tmp_path / 'a'}", steps=6))

    first = train_cfg(*common, f"paths.output_dir={tmp_path / 'b'}", steps=stop_at)
    fit(build_run(first), first)
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    loader_state = torch.load(last, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"epoch": (stop_at - 1) // 3, "batches": (stop_at - 1) % 3 + 1}]  # where the plan stood
    second = train_cfg(*common, f"paths.output_dir={tmp_path / 'b'}", f"ckpt_path={last}", steps=6)
    resumed = build_run(second)
    fit(resumed, second)

    expected = straight.module.hypernetwork.state_dict()
    got = resumed.module.hypernetwork.state_dict()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
