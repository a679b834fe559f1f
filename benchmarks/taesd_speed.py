"""A distilled TAESD against the decoder it copies: quality on held-out images, decode time and FLOPs, in one run.

    python train.py --config-name taesd hydra.run.dir=runs/taesd      # the default run on the embedded tiny base
    python benchmarks/taesd_speed.py --taesd runs/taesd/taesd/diffusers
    python benchmarks/taesd_speed.py --taesd DIR --lpips-weights /w/vgg16.pth   # LPIPS-VGG needs real VGG16 weights

Quality: the held-out images of the training run's own split (datasets/sample, seed 42, the last --val-count of
the seeded shuffle, whole 64 px images), encoded by the frozen tiny-base VAE (posterior mode, in the UNet's scale);
PSNR / SSIM of the tiny decoder's image against the full decoder's image of the same latents (the goal: >= 30 dB),
and of both against the input; the tiny encoder's latent MSE. LPIPS only with real VGG16 weights (a random backbone
is not LPIPS). Speed: median decode time of the tiny decoder against the tiny base's decoder on the same latents, and
against an SD-shaped decoder (sd15 VAE config, random weights: speed does not depend on them) at --sd-resolution,
arms alternated so machine noise hits both; FLOPs (torch's FlopCounterMode, shapes only) at 512 px.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKL, AutoencoderTiny  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure  # noqa: E402

from hyperlit.data.pixeldatamodule import PixelDataModule  # noqa: E402
from hyperlit.models.family import get_family  # noqa: E402
from hyperlit.models.loader import embedded_tiny_vae  # noqa: E402
from hyperlit.vae.lpips import LPIPS  # noqa: E402
from hyperlit.vae.taesd_layout import tiny_autoencoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def held_out(path: str, resolution: int, val_count: int, seed: int) -> torch.Tensor:
    """The validation images of a training run with this data.path, data.val_count and seed, as [-1, 1]."""
    dm = PixelDataModule(path, resolution=resolution, batch_size=1, val_count=val_count, seed=seed)
    dm.setup()
    return torch.stack([dm.val_set[i]["pixels"] for i in range(len(dm.val_set.files))])


def psnr_ssim(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR and SSIM of [-1, 1] images, computed on [0, 1] per image then averaged."""
    a01, b01 = (a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2
    p = peak_signal_noise_ratio(a01, b01, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()
    s = structural_similarity_index_measure(a01, b01, data_range=1.0)
    return float(p), float(s)


@torch.no_grad()
def quality(taesd: AutoencoderTiny, vae: AutoencoderKL, x: torch.Tensor, lpips: LPIPS | None) -> dict:
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    z = (vae.encode(x).latent_dist.mean - shift) * scale
    full = vae.decode(z / scale + shift).sample.clamp(-1, 1)
    tiny = taesd.decode(z).sample.clamp(-1, 1)
    out = {"images": x.shape[0], "resolution": x.shape[-1]}
    out["psnr_vs_full"], out["ssim_vs_full"] = psnr_ssim(tiny, full)
    out["psnr_full_vs_input"], _ = psnr_ssim(full, x)
    out["psnr_tiny_vs_input"], _ = psnr_ssim(tiny, x)
    z_tiny = taesd.encode(x).latents
    out["encoder_latent_mse"] = float(F.mse_loss(z_tiny, z))
    out["latent_variance"] = float(z.var())
    out["psnr_full_of_tiny_latents"], _ = psnr_ssim(vae.decode(z_tiny / scale + shift).sample, full)
    out["lpips_vgg_vs_full"] = float(lpips(full, tiny).mean()) if lpips is not None else None
    return out


def decode_flops(decoder: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        decoder(latents)
    return counter.get_total_flops()


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def speed(tiny: AutoencoderTiny, full: AutoencoderKL, latents: torch.Tensor, reps: int) -> tuple[float, float]:
    """Median seconds per decode (tiny, full), the arms alternated."""
    tiny_decode = lambda: tiny.decode(latents).sample  # noqa: E731
    full_decode = lambda: full.decode(latents).sample  # noqa: E731
    tiny_decode(), full_decode()  # warm-up
    a: list[float] = []
    b: list[float] = []
    for _ in range(reps):
        a += timed(tiny_decode, 1)
        b += timed(full_decode, 1)
    return statistics.median(a), statistics.median(b)


def sd_decoder() -> AutoencoderKL:
    config = json.loads((get_family("sd15").config_dir / "vae" / "config.json").read_text())
    torch.manual_seed(0)
    return AutoencoderKL.from_config(config).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--taesd", default=None, help="an exported AutoencoderTiny folder (<run>/taesd/diffusers)")
    p.add_argument("--data", default=str(REPO / "datasets" / "sample"))
    p.add_argument("--resolution", type=int, default=64, help="held-out images are scored whole at this size")
    p.add_argument("--val-count", type=int, default=3, help="the run's data.val_count (conf/taesd_model/tiny.yaml)")
    p.add_argument("--seed", type=int, default=42, help="the run's seed (the split)")
    p.add_argument("--lpips-weights", default=None, help="torchvision VGG16 state dict for LPIPS-VGG")
    p.add_argument("--sd-resolution", type=int, default=256, help="image side for the SD-shaped decoder timing")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    vae = embedded_tiny_vae().eval()
    if args.taesd:
        taesd = AutoencoderTiny.from_pretrained(args.taesd, local_files_only=True).eval()
        lpips = LPIPS(args.lpips_weights) if args.lpips_weights else None
        x = held_out(args.data, args.resolution, args.val_count, args.seed)
        q = quality(taesd, vae, x, lpips)
        print(f"quality on {q['images']} held-out images at {q['resolution']} px (posterior mode, UNet scale):")
        print(f"  tiny decoder vs full decoder: PSNR {q['psnr_vs_full']:.2f} dB, SSIM {q['ssim_vs_full']:.4f}")
        lp = q["lpips_vgg_vs_full"]
        print(f"  LPIPS-VGG vs full decoder: {lp:.4f}" if lp is not None else "  LPIPS-VGG: not measured (no VGG16)")
        print(f"  against the input: full {q['psnr_full_vs_input']:.2f} dB, tiny {q['psnr_tiny_vs_input']:.2f} dB")
        print(
            f"  tiny encoder: latent MSE {q['encoder_latent_mse']:.4f} (latent variance {q['latent_variance']:.4f});"
            f" full decoder of its latents vs of the full encoder's: {q['psnr_full_of_tiny_latents']:.2f} dB"
        )
    else:
        taesd = tiny_autoencoder(4).eval()  # speed and FLOPs do not depend on the weights
        print("no --taesd: speed and FLOPs only (an untrained tiny autoencoder)")

    z64 = torch.randn(4, 4, args.resolution // 8, args.resolution // 8, generator=torch.Generator().manual_seed(0))
    t_tiny, t_full = speed(taesd, vae, z64, args.reps)
    print(f"decode, batch 4 at {args.resolution} px: tiny {t_tiny * 1e3:.1f} ms, tiny base's decoder "
          f"{t_full * 1e3:.1f} ms: ratio {t_full / t_tiny:.2f}x")  # fmt: skip
    sd = sd_decoder()
    zs = torch.randn(1, 4, args.sd_resolution // 8, args.sd_resolution // 8, generator=torch.Generator().manual_seed(0))
    t_tiny, t_sd = speed(taesd, sd, zs, max(1, args.reps // 2))
    print(f"decode, batch 1 at {args.sd_resolution} px: tiny {t_tiny * 1e3:.1f} ms, SD-shaped decoder "
          f"{t_sd * 1e3:.1f} ms: the tiny one is {t_sd / t_tiny:.1f}x faster")  # fmt: skip
    with torch.device("meta"):
        z512 = torch.empty(1, 4, 64, 64)
        meta_tiny, meta_sd = tiny_autoencoder(4), AutoencoderKL.from_config(sd.config)
        meta_base = AutoencoderKL.from_config(vae.config)
    f_tiny = decode_flops(lambda z: meta_tiny.decode(z).sample, z512)
    f_sd = decode_flops(lambda z: meta_sd.decode(z).sample, z512)
    f_base = decode_flops(lambda z: meta_base.decode(z).sample, z512)
    print(f"decode FLOPs at 512 px: tiny {f_tiny / 1e9:.1f} G, SD-shaped {f_sd / 1e9:.1f} G "
          f"(ratio 1/{f_sd / f_tiny:.1f}; goal <= 1/20), tiny base's decoder {f_base / 1e9:.1f} G")  # fmt: skip


if __name__ == "__main__":
    main()
