"""VAE-decoder training step: cached posteriors vs encoding every step, as a ratio measured in one process.

    python benchmarks/vae_step.py                 # tiny VAE and an SD-sized VAE (random weights) at 256 px
    python benchmarks/vae_step.py --no-lpips      # without the (random) LPIPS-VGG term
    python benchmarks/vae_step.py --only tiny --steps 10

A step is what VAEDecoderTask.training_step does: posterior -> sample -> decode -> generator gradient
(reconstruction + LPIPS + adaptive GAN term) -> G update -> D update on the detached reconstruction.
Arms alternate (A B A B ...) so machine noise hits both; the median step time of each arm is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

from hyperlit.tasks.vae.module import VAEDecoderTask  # noqa: E402
from hyperlit.vae.config import DiscConfig, LossConfig, PerceptualConfig, VAETaskConfig  # noqa: E402
from hyperlit.vae.lpips import LPIPS  # noqa: E402

VAES = {
    "tiny": dict(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8),
    # SD 1.x/2.x kl-f8 shape: 83.7 M parameters
    "sd": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
}


def build(name: str, lpips: bool) -> VAEDecoderTask:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4,
        **VAES[name],
    )  # fmt: skip
    cfg = VAETaskConfig(
        loss=LossConfig("l1", 1.0, PerceptualConfig(weight=1.0 if lpips else 0.0, random_backbone=True)),
        disc=DiscConfig(start=0, warmup_steps=0, ramp_steps=0),
    )
    return VAEDecoderTask(vae, cfg, LPIPS(random_backbone=True) if lpips else None, perceptual_is_random=True)


def one_step(task: VAEDecoderTask, opts: tuple, x: torch.Tensor, index: torch.Tensor, cached: bool) -> None:
    opt_g, opt_d = opts
    mean, logvar = task.posterior(x, index if cached else None)
    x_hat = task.decode(task.latents(mean, logvar))
    g_grad, _ = task.generator_output_grad(x, x_hat)
    d_loss, _ = task.disc_loss(x, x_hat)
    opt_g.zero_grad(set_to_none=True)
    (x_hat * g_grad).sum().backward()
    opt_g.step()
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()


def bench(name: str, steps: int, batch: int, res: int, lpips: bool) -> tuple[float, float]:
    task = build(name, lpips)
    opts = tuple(task.configure_optimizers())
    x = torch.rand(batch, 3, res, res) * 2 - 1
    index = torch.arange(batch)
    one_step(task, opts, x, index, cached=True)  # warm-up; also fills the cache (the one-off encode)
    one_step(task, opts, x, index, cached=False)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(steps):
        for cached in (True, False):
            t = time.perf_counter()
            one_step(task, opts, x, index, cached)
            times[cached].append(time.perf_counter() - t)
    return statistics.median(times[True]), statistics.median(times[False])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per arm")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--only", choices=sorted(VAES), default=None)
    ap.add_argument("--no-lpips", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.resolution} px, LPIPS {'off' if args.no_lpips else 'on (random VGG16)'}")
    print(f"{'vae':<6}{'cached s/step':>15}{'encode s/step':>15}{'encode/cached':>15}")
    for name in [args.only] if args.only else list(VAES):
        cached, encode = bench(name, args.steps, args.batch, args.resolution, not args.no_lpips)
        print(f"{name:<6}{cached:>15.3f}{encode:>15.3f}{encode / cached:>14.2f}x", flush=True)


if __name__ == "__main__":
    main()
