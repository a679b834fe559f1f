"""What the tiny base can learn of a style at all: the suite's data, trained with more freedom than a hypernetwork.

`python benchmarks/style_ceiling.py --styles diagonal_stripes halftone_dots` writes each style's folder as
benchmarks/style_suite.py does (12 images, content-only captions), then fine-tunes the tiny base's UNet on it in
two ways, with SD's epsilon objective on the cached latents of those images and their captions:

- `full`: every UNet weight (what DreamBooth-style full fine-tuning gives: an upper bound for any adapter);
- `kv`: only the `to_k` / `to_v` projections of every attention layer (self- and cross-attention): the linear part of
  what an A1111 hypernetwork changes, as a LoRA of full rank on K and V would;
- `attn`: every weight of the attention layers (Q, K, V, out, as attention LoRAs train);
- `rest`: every weight outside the attention layers (ResNet blocks, the transformer blocks' feed-forward and
  projections, norms, time embedding, in/out convs).

Each trained UNet is judged like the suite's hypernetworks: the style's judge and the shapes judge on the held-out
prompts, 20 DPM++ 2M steps at CFG 5, the same seeds. If even `full` stays below the suite's goal, the base (its UNet
on the 8 x 8 latent grid, with this sampler) cannot draw the style from 12 images, whatever the adapter; if `full`
reaches it and `kv` does not, the limit is where a hypernetwork acts. Issue #26 asks to show such limits with numbers.

This is a measurement, not a training path of hyperlit: the loop is a dozen lines of plain torch on purpose.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from hyperlit.demo.quality import Target, generate, load_pipeline, score
from hyperlit.demo.shapes import HELD_OUT
from hyperlit.demo.styles import STYLES, style_named, style_share, write_style_set

MODES = ("full", "kv", "attn", "rest")


@dataclass(frozen=True)
class CeilingResult:
    """One style x mode row."""

    style: str
    mode: str
    trained_parameters: int
    lr: float
    steps: int
    style_1: float  # style share of the fine-tuned UNet's images at the held-out prompts
    adherence_1: float
    final_loss: float  # mean epsilon MSE of the last 100 steps
    seconds: float


def trainable(unet: torch.nn.Module, mode: str) -> list[torch.nn.Parameter]:
    """The parameters `mode` trains; every other one is frozen."""
    for p in unet.parameters():
        p.requires_grad_(mode == "full")
    if mode == "full":
        return list(unet.parameters())
    in_attention = {n for n, _ in unet.named_parameters() if ".attn1." in n or ".attn2." in n}
    picks = {
        "kv": lambda n: ".to_k." in n or ".to_v." in n,
        "attn": lambda n: n in in_attention,
        "rest": lambda n: n not in in_attention,
    }
    chosen = [p for n, p in unet.named_parameters() if picks[mode](n)]
    for p in chosen:
        p.requires_grad_(True)
    return chosen


@torch.no_grad()
def encode(pipe, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (posterior mode, UNet scale) and text contexts of the folder's images and captions."""
    images = sorted(folder.glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)) for p in images])
    pixels = pixels.permute(0, 3, 1, 2) / 127.5 - 1.0
    latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]
    tokens = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")  # fmt: skip
    context = pipe.text_encoder(tokens.input_ids)[0]
    return latents, context


def fine_tune(
    pipe,
    data: tuple[torch.Tensor, torch.Tensor],
    mode: str,
    lr: float,
    steps: int,
    batch: int,
    min_timestep: int,
    seed: int,
):
    """Train a copy of the pipeline's UNet on `encode`'s (latents, contexts); the trained UNet, its parameter count
    and final loss."""
    latents, context = data
    unet = copy.deepcopy(pipe.unet).train()
    params = trainable(unet, mode)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)  # the training schedule the sampler shares
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0, ctx = latents[idx], context[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(min_timestep, schedule.config.num_train_timesteps, (batch,), generator=g)
        noisy = schedule.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=ctx).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return unet.eval(), sum(p.numel() for p in params), sum(losses[-100:]) / len(losses[-100:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--styles", nargs="+", default=["diagonal_stripes", "halftone_dots"], choices=list(STYLES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4], help="one per mode, or one for all")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--min-timestep", type=int, default=0)
    parser.add_argument("--samples", type=int, default=64, help="samples per style, a multiple of 4")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="a JSON file for the rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lrs = args.lr * len(args.modes) if len(args.lr) == 1 else args.lr
    if len(lrs) != len(args.modes):
        parser.error(f"--lr takes 1 or {len(args.modes)} values (one per mode), got {len(args.lr)}")
    pipe = load_pipeline()
    seeds = args.samples // len(HELD_OUT)
    targets = [Target(c, s) for c, s in HELD_OUT for _ in range(seeds)]
    seed_list = [i for _ in HELD_OUT for i in range(seeds)]
    rows: list[CeilingResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.styles:
            style = style_named(name)
            folder = Path(tmp) / name
            write_style_set(style, folder)
            data = encode(pipe, folder)  # once per style, shared by every mode
            for mode, lr in zip(args.modes, lrs, strict=True):
                start = time.time()
                unet, count, loss = fine_tune(pipe, data, mode, lr, args.steps, args.batch, args.min_timestep,
                                              args.seed)  # fmt: skip
                base_unet, pipe.unet = pipe.unet, unet
                try:
                    images = generate(pipe, [t.prompt for t in targets], seed_list)
                finally:
                    pipe.unet = base_unet
                row = CeilingResult(name, mode, count, lr, args.steps, style_share(style, images),
                                    score(images, targets).adherence, loss, time.time() - start)  # fmt: skip
                rows.append(row)
                print(f"{name} {mode} (lr {lr:g}, {count} weights): style {row.style_1:.2f}, adherence "
                      f"{row.adherence_1:.2f}, loss {loss:.4f}, {row.seconds:.0f} s", flush=True)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
