"""The VAE task on an SDXL VAE (`--config-name vae model=sdxl model.path=...`): loads, trains, exports both
formats, and the fp16 report flags a decoder that overflows fp16 the way SDXL's original VAE does."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from diffusers import AutoencoderKL
from helpers.tiny_sdxl import SDXL_FAMILY, build_parts, write_folder
from hydra.utils import instantiate
from safetensors.torch import load_file

from hyperlit.callbacks.fp16 import FP16Check
from hyperlit.tasks.vae.build import build
from hyperlit.vae.fp16 import decoder_blocks


def test_sdxl_vae_config_is_the_sd_layout_with_sdxl_factors():
    vae = build_parts(SDXL_FAMILY.config_dir, meta=True).vae  # real size, no memory
    assert vae.config.scaling_factor == SDXL_FAMILY.scaling_factor == 0.13025 and vae.config.force_upcast
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # the kl-f8 SD VAE architecture
    assert [n for n, _ in decoder_blocks(vae)][-4:] == [
        "decoder.up_blocks.2", "decoder.up_blocks.3", "decoder.conv_norm_out", "decoder.conv_out"
    ]  # fmt: skip


def test_vae_task_on_an_sdxl_vae_trains_exports_and_flags_fp16_overflow(tmp_path, caplog, vae_cfg):
    folder = write_folder(tmp_path / "tiny_sdxl")
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    with torch.no_grad():  # SDXL's decoder activations exceed fp16's 65504 inside up block 0; fp32 is fine
        vae.decoder.up_blocks[0].resnets[0].conv2.weight.mul_(1e6)
    vae.save_pretrained(folder / "vae")
    cfg = vae_cfg(
        "model=sdxl", f"model.path={folder}", "loss.perceptual.weight=0", "data.resolution=32",
        "data.num_workers=0", "data.batch_size=2", "data.val_count=2",
        f"callbacks.export.dirpath={tmp_path}/out",
        steps=2,
    )  # fmt: skip
    parts = build(cfg)
    module, dm = parts.load_module(), parts.datamodule
    callbacks = [instantiate(cfg.callbacks[name]) for name in ("ema", "export", "fp16_check")]
    assert module.vae.config.scaling_factor == 0.13025
    encoder_before = {k: v.clone() for k, v in module.vae.encoder.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        limit_val_batches=1, callbacks=callbacks,
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=dm)
    assert module.step == 2
    assert all(torch.equal(v, module.vae.encoder.state_dict()[k]) for k, v in encoder_before.items())
    exported = AutoencoderKL.from_pretrained(tmp_path / "out" / "vae-ft", local_files_only=True)
    assert exported.config.scaling_factor == 0.13025
    ldm = load_file(tmp_path / "out" / "vae-ft.vae.safetensors")  # A1111 single-file layout
    assert torch.equal(ldm["decoder.conv_out.weight"], exported.decoder.conv_out.weight)
    fp16 = next(c for c in callbacks if isinstance(c, FP16Check))
    unsafe = [s.name for s in fp16.stats if not s.safe or s.max_abs > 0.5 * 65504]
    assert unsafe and unsafe[0] == "decoder.up_blocks.0"
    assert "NOT fp16-safe" in caplog.text


def test_vae_task_fine_tunes_model_vae_path_when_given(tmp_path, vae_cfg):
    """With model.vae_path (e.g. sdxl-vae-fp16-fix) the model runs that VAE, so the VAE task trains that one."""
    from hyperlit.tasks.vae.build import load_task_vae

    folder = write_folder(tmp_path / "tiny_sdxl")
    fixed = build_parts(seed=5).vae
    fixed.save_pretrained(tmp_path / "fixed")
    cfg = vae_cfg("model=sdxl", f"model.path={folder}", f"model.vae_path={tmp_path / 'fixed'}")
    vae, source, embedded = load_task_vae(cfg)
    assert source == f"model.vae_path={tmp_path / 'fixed'}" and not embedded
    assert torch.equal(vae.decoder.conv_out.weight, fixed.decoder.conv_out.weight)
