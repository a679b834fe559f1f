"""How faithful is `hyperlit to-lora`? The LoRA against the hypernetwork it came from, per rank, on the demo.

    python train.py hypernet=swish_121                       # the README's first command
    python benchmarks/to_lora_fidelity.py --hypernetwork outputs/.../hypernetworks/swish_121.pt

The inputs are gathered once (datasets/sample's captions and latents, the built-in prompts) and fitted at each
setting. Each LoRA is written as `hyperlit to-lora` writes it (kohya layout, float16 unless said), loaded into the
tiny base's pipeline by diffusers' own `load_lora_weights`, and compared with the hypernetwork on that same pipeline:

- noise error: ||eps_lora - eps_hn|| / ||eps_hn - eps_base|| over the held-out prompts (real text) x random
  latents x timesteps 200/500/800: the share of the hypernetwork's change of the noise prediction that the LoRA
  misses (0 = identical, 1 = no better than the base);
- style / adherence: the demo judge's shares (hyperlit.demo) on held-out prompts x --seeds, as
  benchmarks/learning_proof.py scores the hypernetwork; the base and the hypernetwork are the baselines, measured
  in the same run with the same seeds;
- the file size against the hypernetwork file's.
Goals (issue #28): the default setting keeps style within 0.05 of the hypernetwork's and adherence no lower than
the hypernetwork's minus 0.05, in a file no larger than the hypernetwork's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperlit.attention import hypernetworks_attached
from hyperlit.demo.quality import Score, Target, generate, load_pipeline, score
from hyperlit.demo.shapes import HELD_OUT
from hyperlit.files import load_hypernetwork
from hyperlit.lora.convert import fit_all, gather, key_style, write_conversion
from hyperlit.lora.fit import FitSettings
from hyperlit.lora.inputs import read_data
from hyperlit.models import FAMILIES, load_components

REPO = Path(__file__).resolve().parents[1]
TIMESTEPS = (200, 500, 800)


@dataclass(frozen=True)
class Setting:
    label: str
    settings: FitSettings
    format: str = "kohya"
    dtype: torch.dtype = torch.float16


SETTINGS = (
    Setting("rank 1", FitSettings(rank=1, energy=None)),
    Setting("rank 2", FitSettings(rank=2, energy=None)),
    Setting("rank 4", FitSettings(rank=4, energy=None)),
    Setting("rank 8", FitSettings(rank=8, energy=None)),
    Setting("energy 0.99 (default)", FitSettings(energy=0.99)),
    Setting("energy 0.99, V bias (diffusers)", FitSettings(energy=0.99, v_bias=True), format="diffusers"),
    Setting("full rank", FitSettings(energy=1.0)),
    Setting("full rank, float32", FitSettings(energy=1.0), dtype=torch.float32),
)


def noise_inputs(pipe, seeds: int = 4) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(latents, timesteps, text context) batches: held-out prompts, fixed noise."""
    prompts = [Target(c, s).prompt for c, s in HELD_OUT]
    with torch.no_grad():
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        context = pipe.text_encoder(ids.input_ids)[0]
    batches = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        for t in TIMESTEPS:
            latents = torch.randn(len(prompts), 4, 8, 8, generator=g)
            batches.append((latents, torch.full((len(prompts),), t), context))
    return batches


def predictions(unet, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([unet(x, t, encoder_hidden_states=c).sample for x, t, c in batches])


def judge(pipe, seeds: int, steps: int, cfg: float) -> Score:
    targets = [Target(c, s) for c, s in HELD_OUT for _ in range(seeds)]
    seed_list = [i for _ in HELD_OUT for i in range(seeds)]
    return score(generate(pipe, [t.prompt for t in targets], seed_list, steps=steps, cfg=cfg), targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hypernetwork", type=Path, required=True, help="a tiny-base hypernetwork (.pt/.safetensors)")
    parser.add_argument("--data", type=Path, default=REPO / "datasets" / "sample", help="the folder it was trained on")
    parser.add_argument("--seeds", type=int, default=32, help="seeds per held-out prompt (4 prompts)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--only", nargs="*", default=None, help="labels of the settings to run (default: all)")
    parser.add_argument(
        "--judge",
        nargs="*",
        default=["energy 0.99 (default)"],
        help="labels of the settings whose images are generated and judged (the noise error is measured for all)",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    hn = load_hypernetwork(args.hypernetwork)
    components = load_components(family="tiny")
    resolution = FAMILIES["tiny"].default_resolution
    gathered = gather(hn, components, read_data(args.data, resolution), resolution)
    pipe = load_pipeline()
    batches = noise_inputs(pipe)
    base_eps = predictions(pipe.unet, batches)
    with hypernetworks_attached(pipe.unet, [hn]):
        hn_eps = predictions(pipe.unet, batches)
        hn_score = judge(pipe, args.seeds, args.steps, args.cfg)
    base_score = judge(pipe, args.seeds, args.steps, args.cfg)
    change = float((hn_eps - base_eps).norm())
    source_size = args.hypernetwork.stat().st_size
    print(f"{4 * args.seeds} samples per judged row; noise error = ||eps_lora - eps_hn|| / ||eps_hn - eps_base||")
    header = f"{'setting':<34} {'ranks k/v (mean)':>16} {'bytes':>9} {'size ratio':>10} {'noise err':>9} "
    print(header + f"{'style':>6} {'adherence':>9} {'colour':>6} {'shape':>6}")
    print(row("base (multiplier 0)", "", None, source_size, 1.0, base_score))
    print(row("hypernetwork", "", source_size, source_size, 0.0, hn_score))
    with tempfile.TemporaryDirectory() as tmp:
        for k, setting in enumerate(SETTINGS):
            if args.only and setting.label not in args.only:
                continue
            conversion = fit_all(gathered, setting.settings)
            path = Path(tmp) / f"lora{k}.safetensors"
            style = key_style(setting.format, components)
            write_conversion(path, conversion, style, setting.dtype, {"hyperlit_base_model_family": "tiny"})
            name = f"s{k}"
            pipe.load_lora_weights(tmp, weight_name=path.name, adapter_name=name)
            pipe.set_adapters([name], [1.0])
            error = float((predictions(pipe.unet, batches) - hn_eps).norm()) / change
            result = judge(pipe, args.seeds, args.steps, args.cfg) if setting.label in args.judge else None
            pipe.delete_adapters([name])
            reports = [f.report for f in conversion.fits]
            mean_k, mean_v = (sum(getattr(r, key) for r in reports) / len(reports) for key in ("rank_k", "rank_v"))
            ranks = f"{mean_k:.1f}/{mean_v:.1f}"
            print(row(setting.label, ranks, path.stat().st_size, source_size, error, result), flush=True)


def row(label: str, ranks: str, size: int | None, source_size: int, error: float, result: Score | None) -> str:
    sizes = f"{size:>9,} {size / source_size:>10.2f}" if size is not None else f"{'':>9} {'':>10}"
    shares = (
        f"{result.style:>6.3f} {result.adherence:>9.3f} {result.colour:>6.3f} {result.shape:>6.3f}"
        if result is not None
        else f"{'-':>6} {'-':>9} {'-':>6} {'-':>6}"
    )
    return f"{label:<34} {ranks:>16} {sizes} {error:>9.3f} {shares}"


if __name__ == "__main__":
    main()
