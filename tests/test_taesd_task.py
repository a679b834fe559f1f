"""TAESD task: the distillation loss falls, the teacher stays bit-identical, resume is exact, 16 channels, exports."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny
from helpers.config import compose_config
from helpers.paths import REPO_ROOT
from helpers.taesd_probe import weights_digest
from hydra.utils import instantiate
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from hyperlit.callbacks.ema import EMA
from hyperlit.callbacks.taesd_export import TAESDExport
from hyperlit.data.pixeldatamodule import PixelDataModule
from hyperlit.models.loader import embedded_tiny_vae
from hyperlit.tasks.taesd.build import build
from hyperlit.tasks.taesd.module import TAESDTask, teacher_checksum
from hyperlit.vae.config import PerceptualConfig, PosteriorConfig
from hyperlit.vae.export import save_diffusers_folder
from hyperlit.vae.lpips import LPIPS
from hyperlit.vae.taesd_config import (
    DecoderLossConfig,
    DistillConfig,
    TAESDDiscConfig,
    TAESDOptimizerConfig,
    TAESDTaskConfig,
)
from hyperlit.vae.taesd_layout import from_madebyollin
from hyperlit.vae.taesd_read import TRAINED_PARTS

# An SD-shaped VAE (4 levels: factor 8, as TAESD's layout) small enough to train in seconds.
TINY_VAE8 = dict(
    block_out_channels=[8, 8, 8, 8],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=4,
)


def make_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**{**TINY_VAE8, **overrides})


def make_task(
    vae=None,
    max_steps: int = 4,
    seed: int = 0,
    halves=("encoder", "decoder"),
    latent_crop=None,
    schedule: TAESDOptimizerConfig | None = None,
    scenes: int = 0,
    **disc,
) -> TAESDTask:
    cfg = TAESDTaskConfig(
        max_steps=max_steps,
        taesd=DistillConfig("encoder" in halves, "decoder" in halves, latent_crop=latent_crop, extra_scenes=scenes),
        posterior=PosteriorConfig(cache=not scenes, sample=True),  # scenes are new every step: nothing to cache
        loss=DecoderLossConfig("mse", 1.0, PerceptualConfig(weight=0.1, random_backbone=True)),
        disc=TAESDDiscConfig(**{"start": 0, "warmup_steps": 1, "ramp_steps": 1, "ndf": 8, "n_layers": 2, **disc}),
        optimizer=schedule or TAESDOptimizerConfig(),
    )
    torch.manual_seed(1234)  # the random LPIPS backbone is the same in every task built here
    lpips = LPIPS(random_backbone=True)
    torch.manual_seed(seed)  # the student's and D's initial weights
    optimizer = lambda params, **kw: torch.optim.Adam(params, **{"lr": 1e-3, **kw})  # noqa: E731
    return TAESDTask(vae if vae is not None else make_vae(), cfg, lpips, True, optimizer, seed=7)


def images(tmp_path, n=6, size=24):
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # smooth colour fields: something a decoder can copy
        yy, xx = np.mgrid[0:size, 0:size] / size
        arr = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), xx * yy], -1) * 0.5 + 0.5
        arr = arr * (0.6 + 0.4 * rng.random(3))
        Image.fromarray((arr * 255).astype(np.uint8)).save(d / f"{i:02d}.png")
    return d


def datamodule(tmp_path, resolution=16):
    return PixelDataModule(str(images(tmp_path)), resolution=resolution, batch_size=2, val_count=2, fixed_crops=True)


def fit(task, tmp_path, dm, callbacks=(), ckpt_path=None, val=False, max_steps=-1):
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=-1,
        max_steps=max_steps,  # counts G and D updates: 2 per task step
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        val_check_interval=2,
        limit_val_batches=1 if val else 0,
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


@torch.no_grad()
def distillation_errors(task: TAESDTask, x: torch.Tensor) -> tuple[float, float]:
    """(encoder latent MSE, decoder image MSE against the teacher's image), computed here from the definitions."""
    vae = task.vae
    mean = vae.encode(x).latent_dist.mean
    z = (mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    teacher = vae.decode(z / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample.clamp(-1, 1)
    enc = F.mse_loss(task.taesd.encode(x).latents, z).item()
    dec = F.mse_loss(task.taesd.decode(z).sample, teacher).item()
    return enc, dec


def fixed_images(tmp_path) -> torch.Tensor:
    dm = datamodule(tmp_path)
    dm.setup()
    return torch.stack([dm.train_set[i]["pixels"] for i in range(4)])


def test_training_lowers_the_distillation_loss_and_keeps_the_teacher(tmp_path):
    vae = embedded_tiny_vae()  # the tiny base: what `--config-name taesd` learns by default
    task = make_task(vae, max_steps=30)
    before_state = {k: v.clone() for k, v in task.vae.state_dict().items()}
    checksum = teacher_checksum(task.vae)
    x = fixed_images(tmp_path)
    enc0, dec0 = distillation_errors(task, x)
    disc0 = [p.detach().clone() for p in task.disc.parameters()]
    trainer = fit(task, tmp_path, datamodule(tmp_path), val=True)
    enc1, dec1 = distillation_errors(task, x)
    assert task.step == 30 and trainer.global_step == 60  # one G and one D update per task step
    assert enc1 < 0.5 * enc0 and dec1 < 0.5 * dec0, (enc0, enc1, dec0, dec1)
    # frozen means frozen: every teacher weight bit-identical, never in an optimizer
    assert teacher_checksum(task.vae) == checksum == task.teacher_checksum
    assert all(torch.equal(v, before_state[k]) for k, v in task.vae.state_dict().items())
    optimized = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in task.vae.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(disc0, task.disc.parameters(), strict=True))
    metrics = trainer.callback_metrics
    assert {"val/psnr", "val/ssim", "val/encoder_mse", "val/decoder_mse", "val/loss"} <= set(metrics)
    assert "train/d_weight" in metrics and "val/lpips_vgg" not in metrics  # a random LPIPS is never reported
    assert float(metrics["train/loss"]) == float(metrics["train/total"]) > 0


@pytest.mark.parametrize("half", ["encoder", "decoder"])
def test_one_half_trains_and_the_other_stays(tmp_path, half):
    task = make_task(max_steps=2, halves=(half,))
    other = "decoder" if half == "encoder" else "encoder"
    still = {k: v.clone() for k, v in getattr(task.taesd, other).state_dict().items()}
    moved = {k: v.clone() for k, v in getattr(task.taesd, half).state_dict().items()}
    fit(task, tmp_path, datamodule(tmp_path))
    assert all(torch.equal(v, still[k]) for k, v in getattr(task.taesd, other).state_dict().items())
    assert any(not torch.equal(v, moved[k]) for k, v in getattr(task.taesd, half).state_dict().items())
    assert (task.disc is None) == (half == "encoder")
    assert {n.split(".")[1] for n, _ in task.ema_parameters()} == {half}


def test_the_decoder_learns_from_the_teachers_image_of_the_same_latents():
    """The decoder's target is the frozen decoder's image of exactly the latents the student decodes."""
    task = make_task()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, logvar = task.posterior(x)
    z = task.sample_latents(mean, logvar)
    assert not torch.equal(z, task.to_unet_scale(mean))  # a posterior sample ...
    assert torch.equal(z, task.sample_latents(mean, logvar))  # ... drawn from (seed, step): the same again
    seen = {}
    original = task.student_decode
    task.student_decode = lambda latents: seen.setdefault("student", latents) is not None and original(latents)
    surrogate, logs, (target, _, _) = task.generator_losses(x, mean, z)
    assert torch.equal(seen["student"], z)
    vae = task.vae
    expected = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
    assert torch.allclose(target, expected, atol=1e-6)
    assert logs["encoder_mse"] > 0 and logs["rec"] > 0


def test_a_latent_crop_is_the_same_window_of_the_teachers_whole_image():
    task = make_task(latent_crop=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # 4 x 4 latent cells
    mean, logvar = task.posterior(x)
    z = task.sample_latents(mean, logvar)
    seen = {}
    original = task.student_decode
    task.student_decode = lambda latents: seen.setdefault("student", latents) is not None and original(latents)
    task.step = 3
    _, _, (target, x_hat, z_seen) = task.generator_losses(x, mean, z)
    assert z_seen.shape[-2:] == (2, 2) and x_hat.shape[-2:] == target.shape[-2:] == (16, 16)
    whole = task.teacher_decode(z)  # the teacher decodes the whole latent image, then the window is cut
    windows = [(t, le) for t in range(3) for le in range(3) if torch.equal(z[..., t : t + 2, le : le + 2], z_seen)]
    assert len(windows) == 1
    t, le = windows[0]
    assert torch.equal(target, whole[..., 8 * t : 8 * t + 16, 8 * le : 8 * le + 16])
    task.step = 3
    assert torch.equal(task.generator_losses(x, mean, z)[2][2], z_seen)  # drawn from (seed, step)


def state(task: TAESDTask) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.state_dict().items() if k.startswith(("taesd.", "disc."))}


SCHEDULES = {
    "constant": None,
    "cosine+warmup": TAESDOptimizerConfig(lr_scheduler="cosine", lr_warmup_steps=1),
    "disc_lr+linear": TAESDOptimizerConfig(disc_lr=2e-3, lr_scheduler="linear"),
    "cosine+scenes": TAESDOptimizerConfig(lr_scheduler="cosine"),  # with taesd.extra_scenes=2: drawn per step
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_resume_is_exact(tmp_path, name):
    """Two steps, a checkpoint, a fresh process-like start (other init, other RNG state), two more steps: the same
    weights, D, EMA, optimizer and learning-rate schedule state as four uninterrupted steps, bit for bit."""
    schedule, scenes = SCHEDULES[name], 2 if name.endswith("+scenes") else 0
    straight = make_task(max_steps=4, schedule=schedule, scenes=scenes)
    ema_a = EMA(decay=0.5)
    trainer_a = fit(straight, tmp_path / "a", datamodule(tmp_path / "a"), [ema_a])

    # interrupted after two steps of the four-step schedule
    first = make_task(max_steps=4, schedule=schedule, scenes=scenes)
    trainer = fit(first, tmp_path / "b", datamodule(tmp_path / "b"), [EMA(decay=0.5)], max_steps=4)
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    ckpt = torch.load(tmp_path / "b.ckpt", weights_only=False)
    assert not any(k.startswith(("vae.", "lpips.")) for k in ckpt["state_dict"])  # the teacher stays out
    assert ckpt["taesd_task"]["step"] == 2 and len(ckpt["optimizer_states"]) == 2
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 2  # stepped once per generator update

    # other weights: all must come from the checkpoint
    resumed = make_task(max_steps=4, seed=99, schedule=schedule, scenes=scenes)
    torch.manual_seed(12345)  # and another process RNG state
    ema_b = EMA(decay=0.5)
    trainer_b = fit(resumed, tmp_path / "c", datamodule(tmp_path / "b"), [ema_b], ckpt_path=tmp_path / "b.ckpt")
    assert resumed.step == 4
    a, b = state(straight), state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert ema_a.shadow.keys() == ema_b.shadow.keys()
    assert all(torch.equal(ema_a.shadow[k], ema_b.shadow[k]) for k in ema_a.shadow)
    for opt_a, opt_b in zip(trainer_a.optimizers, trainer_b.optimizers, strict=True):
        assert opt_a.param_groups[0]["lr"] == opt_b.param_groups[0]["lr"]
    assert trainer_a.lr_scheduler_configs[0].scheduler.state_dict()["last_epoch"] == 4
    assert trainer_b.lr_scheduler_configs[0].scheduler.state_dict()["last_epoch"] == 4


@pytest.mark.parametrize(("name", "warmup", "rate"), [
    ("cosine", 0, lambda k, n, w: 0.5 * (1 + math.cos(math.pi * k / n))),
    ("linear", 2, lambda k, n, w: k / w if k < w else (n - k) / (n - w)),
    ("constant", 2, lambda k, n, w: min(1.0, k / w)),
])  # fmt: skip
def test_the_generator_follows_the_schedule_and_d_keeps_its_rate(tmp_path, name, warmup, rate):
    """Each generator update uses base * rate(k) for k = 0, 1, ... (the textbook formulas, written here), and D's
    optimizer keeps train.disc_lr (or the base rate) throughout."""
    n = 5
    task = make_task(max_steps=n, schedule=TAESDOptimizerConfig(lr_scheduler=name, lr_warmup_steps=warmup))
    used: list[tuple[float, float]] = []
    original = task._update

    def record(opt, loss):
        used.append((opt.param_groups[0]["lr"], opt is task._opts()[0]))
        original(opt, loss)

    task._update = record
    fit(task, tmp_path, datamodule(tmp_path))
    g_rates = [lr for lr, is_g in used if is_g]
    d_rates = [lr for lr, is_g in used if not is_g]
    expected = [1e-3 * rate(k, n, warmup) for k in range(n)]
    assert g_rates == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert len(d_rates) == n and all(lr == 1e-3 for lr in d_rates)


def test_a_checkpoint_without_schedule_state_does_not_resume_a_schedule(tmp_path):
    """A checkpoint written before the task had schedules would restart the schedule at step 0: refused."""
    task = make_task(max_steps=1)
    fit(task, tmp_path, datamodule(tmp_path)).save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=False)
    ckpt["lr_schedulers"] = []
    torch.save(ckpt, tmp_path / "old.ckpt")
    constant = make_task(max_steps=2)  # a constant rate has nothing to lose
    fit(constant, tmp_path, datamodule(tmp_path), ckpt_path=tmp_path / "old.ckpt")
    assert constant.step == 2
    cosine = make_task(max_steps=2, schedule=TAESDOptimizerConfig(lr_scheduler="cosine"))
    with pytest.raises(ValueError, match="holds no learning-rate schedule state"):
        fit(cosine, tmp_path, datamodule(tmp_path), ckpt_path=tmp_path / "old.ckpt")


def test_resume_against_another_vae_is_refused(tmp_path):
    task = make_task(max_steps=1)
    fit(task, tmp_path, datamodule(tmp_path)).save_checkpoint(tmp_path / "a.ckpt")
    other = make_task(make_vae(seed=3), max_steps=2)
    with pytest.raises(ValueError, match="distils a different VAE"):
        fit(other, tmp_path, datamodule(tmp_path), ckpt_path=tmp_path / "a.ckpt")


def test_export_writes_ema_weights_in_every_format(tmp_path):
    task = make_task(max_steps=2)
    ema = EMA(decay=0.5, warmup=False)
    export = TAESDExport(str(tmp_path / "out"), name="taesd", save_every=1)
    fit(task, tmp_path, datamodule(tmp_path), [ema, export])
    out = tmp_path / "out"
    final = {"diffusers", "taesd.disc.safetensors"} | {
        f"taesd_{p}.{e}" for p in ("encoder", "decoder") for e in ("safetensors", "pth")
    }
    assert {p.name for p in out.iterdir()} == final | {"step-1", "step-2"}
    assert {p.name for p in (out / "step-1").iterdir()} == final
    loaded = AutoencoderTiny.from_pretrained(out / "diffusers", local_files_only=True)
    w = ema.shadow["taesd.decoder.layers.18.weight"]  # the last conv (DecoderTiny.layers[18])
    assert torch.equal(loaded.decoder.layers[18].weight, w)  # the EMA weights, not the live ones
    assert not torch.equal(w, task.taesd.decoder.layers[18].weight)
    assert torch.equal(load_file(out / "taesd_decoder.safetensors")["19.weight"], w)  # his index = ours + 1
    assert torch.equal(torch.load(out / "taesd_encoder.pth", weights_only=True)["14.weight"],
                       ema.shadow["taesd.encoder.layers.14.weight"])  # fmt: skip
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # no temporary file left
    with safe_open(str(out / "diffusers" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.metadata()[TRAINED_PARTS] == "encoder,decoder"  # eval-vae trusts the folder's encoder


def test_sixteen_channel_vae_trains_end_to_end_from_config(tmp_path, caplog):
    vae = make_vae(1, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                   scaling_factor=0.3611, shift_factor=0.1159)  # fmt: skip
    save_diffusers_folder(vae, tmp_path / "flux-vae")
    cfg = compose_config("taesd", [
        "model=sd15", f"model.path={tmp_path}/flux-vae", "vae.latent_channels=16", "vae.use_quant_conv=false",
        "loss.perceptual.weight=0", f"data.path={images(tmp_path)}", "data.resolution=16", "data.num_workers=0",
        "data.batch_size=2", "data.val_count=2", "train.max_steps=2", f"callbacks.export.dirpath={tmp_path}/out",
        "disc.ndf=8", "disc.n_layers=2", "train.optimizer.lr=0.00123", "seed=7",
    ])  # fmt: skip
    parts = build(cfg)
    with caplog.at_level("INFO", logger="hyperlit.tasks.taesd.build"):
        module = parts.load_module()
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("TAESD task: ")]
    assert line.startswith("TAESD task: distilling the encoder and decoder of ") and f"{tmp_path}/flux-vae" in line
    checksum = module.teacher_checksum[:12]
    assert line.endswith(f" into a tiny autoencoder (16 latent channels, teacher checksum {checksum})")
    assert module.seed == 7
    assert module.latent_channels == 16 and module.shift == pytest.approx(0.1159)
    optimizer = module.optimizer_factory([torch.zeros(1, requires_grad=True)])  # train.optimizer, not the default
    assert optimizer.defaults["lr"] == 0.00123 and optimizer.defaults["amsgrad"] is True
    assert module.disc.main[0].in_channels == 3 + 16  # D sees the 16 latent channels beside the image
    callbacks = [instantiate(cfg.callbacks[name]) for name in ("ema", "export")]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, callbacks=callbacks)  # fmt: skip
    trainer.fit(module, datamodule=parts.datamodule)
    assert module.step == 2
    exported = AutoencoderTiny.from_pretrained(tmp_path / "out" / "diffusers", local_files_only=True)
    assert exported.config.latent_channels == 16
    assert load_file(tmp_path / "out" / "taesd_decoder.safetensors")["1.weight"].shape == (64, 16, 3, 3)
    assert load_file(tmp_path / "out" / "taesd_encoder.safetensors")["14.weight"].shape == (16, 64, 3, 3)


def test_the_vae_must_downsample_by_eight(tmp_path):
    vae = make_vae(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                   up_block_types=["UpDecoderBlock2D"] * 2)  # fmt: skip
    save_diffusers_folder(vae, tmp_path / "vae")
    cfg = compose_config("taesd", ["model=sd15", f"model.path={tmp_path}/vae", "loss.perceptual.weight=0"])
    with pytest.raises(ValueError) as refused:
        build(cfg).load_module()
    assert str(refused.value).startswith("the VAE from ") and str(tmp_path / "vae") in str(refused.value)  # names it
    assert str(refused.value).endswith(
        " downsamples by 2, but TAESD's layout downsamples by 8; use an SD-family VAE (4 levels)"
    )


def test_ddp_overrides_for_separate_g_and_d_backward():
    from hyperlit.tasks.teacher import ddp_overrides

    assert ddp_overrides(compose_config("taesd", []), "group") == {}
    cpu = compose_config("taesd", ["trainer=ddp_cpu"])
    assert ddp_overrides(cpu, "batch") == {"strategy": "ddp_find_unused_parameters_true"}
    gpu = compose_config("taesd", ["trainer=ddp"])
    assert ddp_overrides(gpu, "batch") == {"strategy": "ddp_find_unused_parameters_true", "sync_batchnorm": True}
    assert ddp_overrides(gpu, "group") == {"strategy": "ddp_find_unused_parameters_true"}


@pytest.mark.slow
def test_train_py_run_on_the_embedded_default(tmp_path):
    from hyperlit.runner import build_run, fit

    cfg = compose_config("taesd", [
        f"paths.output_dir={tmp_path}", "logger=none", "train.max_steps=3", "data.resolution=32",
        "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "~callbacks.progress",
        "trainer.enable_progress_bar=false",
    ])  # fmt: skip
    assert cfg.task == "taesd" and cfg.model.family == "tiny"
    built = build_run(cfg)
    value = fit(built, cfg)  # optimized_metric: val/loss
    assert value == pytest.approx(float(built.trainer.callback_metrics["val/loss"]))
    out = tmp_path / "taesd"
    assert (out / "taesd_decoder.safetensors").is_file() and (out / "taesd_encoder.pth").is_file()
    reloaded = AutoencoderTiny.from_pretrained(out / "diffusers", local_files_only=True)
    assert reloaded.config.latent_channels == 4 and reloaded.config.scaling_factor == 1.0


@pytest.mark.slow
def test_two_processes_train_the_same_student(tmp_path):
    """DDP on the CPU (gloo, 2 processes): the ranks hold the same decoder after every update, and the file rank 0
    exported (without EMA) is that decoder."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    tests = os.pathsep.join([str(REPO_ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PYTHONPATH=tests)  # fmt: skip
    command = [
        sys.executable, str(REPO_ROOT / "train.py"), "--config-name", "taesd", "trainer=ddp_cpu", "logger=none",
        "train.max_steps=3", "data.resolution=32", "data.batch_size=2", "disc.ndf=8", "loss.perceptual.weight=0",
        "disc.warmup_steps=0", "disc.ramp_steps=0", "callbacks.ema=null", "~callbacks.progress",
        "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", f"hydra.run.dir={tmp_path / 'out'}",
        "+callbacks.probe._target_=helpers.taesd_probe.TAESDProbe", f"+callbacks.probe.dirpath={tmp_path / 'probe'}",
    ]  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rank0, rank1 = ((tmp_path / "probe" / f"digest-rank{r}.txt").read_text().split("\n")[:-1] for r in (0, 1))
    assert [line.split()[0] for line in rank0] == ["1", "2", "3"]
    assert rank0 == rank1 and len({line.split()[1] for line in rank0}) == 3
    exported = from_madebyollin(load_file(tmp_path / "out" / "taesd" / "taesd_decoder.safetensors"), "decoder")
    assert weights_digest({k.removeprefix("decoder."): v for k, v in exported.items()}) == rank0[-1].split()[1]
