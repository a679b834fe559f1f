"""fp16_fix on decoders made fp16-unsafe on purpose: PSNR of the fp16 output against the original fp32 output.

    python benchmarks/fp16_fix.py                    # every case, 300 fine-tuning steps, 32 px
    python benchmarks/fp16_fix.py --only stream --steps 100 --resolution 64 --baseline stream

Each case takes the embedded tiny base's VAE (pretrained, what `model=tiny` uses) and scales one place up by a
function-preserving rescale, `beyond` times past the edge of fp16 safety (peak = beyond x 65504 / 8): a resnet's
conv1 (a GroupNorm follows), the whole residual stream (norms read every segment), or a layer that no normalisation
follows (post_quant_conv, whose reader conv_in is scaled down to match; an attention's to_v with to_out). Three arms,
run in one process on the same images:

- fine-tune only: `closed_form=false, train_weights=true`, the method before the closed form existed (only for the
  cases named by --baseline: 300 steps on these CPUs take minutes);
- closed form alone: the exact rescale, no training step;
- closed form + fine-tune: the task's default (`vae_loss=fp16_fix`): closed form, then gains of what is left.

The score is the mean PSNR (on [0, 1]) of each decoder's fp16 decode against the ORIGINAL decoder's fp32 decode
of the validation images' posterior modes (held out from training); "nan" means the fp16 decode overflowed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from hyperlit.callbacks.fp16 import Fp16ClosedForm  # noqa: E402
from hyperlit.data.pixeldatamodule import PixelDataModule  # noqa: E402
from hyperlit.models.loader import embedded_tiny_vae  # noqa: E402
from hyperlit.tasks.vae.module import VAEDecoderTask  # noqa: E402
from hyperlit.vae.config import (  # noqa: E402
    Fp16FixConfig,
    LossConfig,
    PerceptualConfig,
    PosteriorConfig,
    VAETaskConfig,
)
from hyperlit.vae.fp16 import FP16_MAX, HEADROOM, decode_report, fp16_verdict  # noqa: E402
from hyperlit.vae.fp16_fix import make_fp16_unsafe, scale_layer  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "sample"
EDGE = FP16_MAX / HEADROOM
# name: (layer, reader for a no-norm case, beyond the edge, follows)
CASES = {
    "mid-conv1": ("decoder.mid_block.resnets.0.conv1", None, 1e2, "GroupNorm"),
    "up0-conv1": ("decoder.up_blocks.0.resnets.1.conv1", None, 1e3, "GroupNorm"),
    "up2-conv1": ("decoder.up_blocks.2.resnets.0.conv1", None, 1e4, "GroupNorm"),
    "stream": ("stream", None, 1e5, "GroupNorms (residual stream)"),
    "post-quant": ("post_quant_conv", "decoder.conv_in", 1e3, "no norm (conv_in)"),
    "to-v": ("decoder.mid_block.attentions.0.to_v", "decoder.mid_block.attentions.0.to_out.0", 1e2, "no norm (to_out)"),
}


def peak(vae: torch.nn.Module, name: str, latents: torch.Tensor) -> float:
    seen: list[float] = []
    handle = dict(vae.named_modules())[name].register_forward_hook(lambda m, i, o: seen.append(float(o.abs().max())))
    with torch.no_grad():
        vae.decode(latents)
    handle.remove()
    return max(seen)


def make_unsafe(vae: torch.nn.Module, case: str, latents: torch.Tensor) -> float:
    layer, reader, beyond, _ = CASES[case]
    if layer == "stream":
        factor = beyond * EDGE / peak(vae, "decoder.mid_block.resnets.0", latents)
        make_fp16_unsafe(vae, factor)
    else:
        factor = beyond * EDGE / peak(vae, layer, latents)
        scale_layer(vae, layer, factor, reader)
    return factor


def fp16_psnr(vae: torch.nn.Module, latents: torch.Tensor, reference: torch.Tensor) -> float:
    with torch.no_grad():
        out = copy.deepcopy(vae).half().decode(latents.half()).sample.float()
    if not torch.isfinite(out).all():
        return float("nan")
    mse = ((out.clamp(-1, 1) - reference.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return float((-10 * torch.log10(mse)).mean())


class Snapshot(pl.Callback):
    """A copy of the decoder when fitting starts, after the closed form (which runs in the callback before it)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.vae = copy.deepcopy(pl_module.vae)


def run_task(vae: torch.nn.Module, steps: int, resolution: int, closed_form: bool, train_weights: bool, root: Path):
    dm = PixelDataModule(str(SAMPLE), resolution=resolution, batch_size=2, val_count=4, fixed_crops=True)
    cfg = VAETaskConfig(
        max_steps=steps,
        loss=LossConfig(
            perceptual=PerceptualConfig(weight=0.0),
            kind="fp16_fix",
            fp16_fix=Fp16FixConfig(closed_form=closed_form, train_weights=train_weights),
        ),
        posterior=PosteriorConfig(cache=True, sample=True),
    )
    task = VAEDecoderTask(vae, cfg, None)
    snapshot = Snapshot()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Fp16ClosedForm(), snapshot],
        default_root_dir=root,
    )  # fmt: skip
    trainer.fit(task, datamodule=dm)
    return task, snapshot.vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CASES), action="append", default=None)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument(
        "--baseline", choices=sorted(CASES), action="append", default=None,
        help="cases that also run the fine-tune-only arm (default: none; each takes minutes on a busy CPU)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    dm = PixelDataModule(str(SAMPLE), resolution=args.resolution, batch_size=4, val_count=4, fixed_crops=True)
    dm.setup("fit")
    original = embedded_tiny_vae().eval()
    pixels = torch.cat([b["pixels"] for b in dm.val_dataloader()])
    with torch.no_grad():
        latents = original.encode(pixels).latent_dist.mode()
        reference = original.decode(latents).sample
    print(f"tiny base VAE, {len(pixels)} held-out images at {args.resolution} px, {args.steps} fine-tuning steps")
    header = f"{'case':<11} {'follows':<29} {'factor':>8} {'unsafe':>7} {'ft only':>8} {'closed':>8} {'closed+ft':>9}"
    print(header + "  closed-form fp32 change, peak x 8 after")
    for case in args.only or list(CASES):
        start = time.perf_counter()
        unsafe = copy.deepcopy(original)
        factor = make_unsafe(unsafe, case, latents)
        with tempfile.TemporaryDirectory() as tmp:
            ft_only = None
            if case in (args.baseline or []):
                ft_only, _ = run_task(copy.deepcopy(unsafe), args.steps, args.resolution, False, True, Path(tmp))
            both, closed = run_task(copy.deepcopy(unsafe), args.steps, args.resolution, True, False, Path(tmp))
        decoders = (unsafe, ft_only.vae if ft_only else None, closed, both.vae)
        scores = [fp16_psnr(v, latents, reference) if v is not None else None for v in decoders]
        report = both.fp16_report
        verdict = fp16_verdict(decode_report(both.vae, latents, torch.float32))
        print(
            f"{case:<11} {CASES[case][3]:<29} {factor:>8.1e} "
            + " ".join(
                f"{s:>{w}.1f}" if s is not None else f"{'-':>{w}}" for s, w in zip(scores, (7, 8, 8, 9), strict=True)
            )
            + f"  {report.fp32_change:.1e}, {verdict.peak * HEADROOM:.3g} "
            + f"({'well below' if verdict.well_below else 'NOT below'} 65504; {both.step} steps; "
            + f"{time.perf_counter() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
