"""Share of training-step time spent waiting for data, with caches and without, on the tiny model.

    HF_HUB_OFFLINE=1 python benchmarks/data_throughput.py [--steps 30] [--batch-size 4]

Every configuration runs the real hypernetwork training step (frozen tiny UNet forward + backward through
the hypernetwork, AdamW step) in this process; "data wait" is the time from asking the loader for a batch to
holding a finished batch (including, for streams without precomputed latents, the VAE and text encoding on
the device). Configurations:
  folder, disk cache warm     latents and text embeddings from the cache (a second run)
  shards, precomputed         webdataset shards made by make_shards with latent.npy / context.npy
  shards, no cache            webdataset shards with images only: VAE + text encoder every step
Goal: at most 2% data wait with caches. Also printed: folder setup time with a cold and a warm cache.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from hyperlit.data import FolderDataModule, WebDataModule, make_shards  # noqa: E402
from hyperlit.data.paths import repo_root  # noqa: E402


def build_task(seed: int):
    from hyperlit.attention import attach_hypernetworks
    from hyperlit.hypernetwork import Hypernetwork, HypernetworkConfig
    from hyperlit.models import load_components
    from hyperlit.tasks.hypernetwork.module import HypernetworkTask

    comps = load_components(family="tiny", seed=seed)
    config = HypernetworkConfig(activation="swish")
    from hyperlit.tasks.hypernetwork.build import resolve_sizes

    net = Hypernetwork(config, sizes=resolve_sizes(config, comps.unet), name="bench")
    task = HypernetworkTask(hypernetwork=net, components=comps, optimizer=torch.optim.AdamW)
    task.train()
    attach_hypernetworks(comps.unet, [net])  # what the task's on_fit_start does
    return task, comps


def measure(task, dm, steps: int, warmup: int = 2) -> tuple[float, float, int]:
    opt = torch.optim.AdamW(task.hypernetwork.parameters(), lr=1e-5)
    wait = compute = 0.0
    done = 0
    while done < steps + warmup:
        it = iter(dm.train_dataloader())
        while done < steps + warmup:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            batch = dm.on_after_batch_transfer(batch, 0)
            t1 = time.perf_counter()
            loss = task.compute_loss(batch).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            if done >= warmup:
                wait += t1 - t0
                compute += t2 - t1
            done += 1
    return wait, compute, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    task, comps = build_task(0)
    sample = repo_root() / "datasets" / "sample"
    common = dict(resolution=64, batch_size=args.batch_size, name="bench", num_workers=args.workers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        t0 = time.perf_counter()
        cold = FolderDataModule(path=str(sample), encoder=comps, cache_dir=str(cache), **common)
        cold.prepare_data()
        cold.setup("fit")
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = FolderDataModule(path=str(sample), encoder=comps, cache_dir=str(cache), **common)
        warm.prepare_data()
        warm.setup("fit")
        t_warm = time.perf_counter() - t0
        rows.append(("folder, disk cache warm", *measure(task, warm, args.steps)))

        pre = Path(tmp) / "pre"
        make_shards(sample, pre, encoder=comps, resolution=64, name="bench", samples_per_shard=4)
        urls = [str(p) for p in sorted(pre.glob("*.tar"))]
        shards = WebDataModule(urls=urls, encoder=comps, shuffle_buffer=16, **common)
        shards.setup("fit")
        rows.append(("shards, precomputed", *measure(task, shards, args.steps)))

        raw = Path(tmp) / "raw"
        make_shards(sample, raw, samples_per_shard=4)
        urls = [str(p) for p in sorted(raw.glob("*.tar"))]
        plain = WebDataModule(urls=urls, encoder=comps, shuffle_buffer=16, **common)
        plain.setup("fit")
        rows.append(("shards, no cache", *measure(task, plain, args.steps)))

    print(f"tiny model, 64 px, batch {args.batch_size}, {args.steps} measured steps, {args.workers} workers")
    print(f"{'configuration':28s} {'wait ms/step':>13s} {'step ms':>9s} {'data wait share':>16s}")
    for label, wait, compute, n in rows:
        share = wait / (wait + compute)
        print(f"{label:28s} {1000 * wait / n:13.2f} {1000 * (wait + compute) / n:9.1f} {100 * share:15.2f}%")
    print(f"folder setup: cold cache {t_cold:.2f} s, warm cache {t_warm:.2f} s (ratio {t_cold / t_warm:.1f}x)")


if __name__ == "__main__":
    main()
