"""The real inputs a hypernetwork sees in a base model, gathered per attention layer for the LoRA fit.

Cross-attention layers all read the same text context: its rows come from the text encoders, for the captions of
``--data`` plus a built-in prompt set (and the empty prompt, which classifier-free guidance runs every step).
Self-attention layers read their own (normed) hidden states: those are recorded by a pre-hook on each layer while
the UNet, with the hypernetwork attached at strength 1 (the states the converted model must reproduce), denoises
the data's latents at timesteps spread over the schedule.

Training rows are kept as second moments in float64 (what least squares needs, whatever the number of rows);
every fifth prompt or (image, timestep) sample is held out and kept as rows (a capped random subset) to measure
the fit on inputs it never saw.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from hyperlit.attention import hypernetworks_attached
from hyperlit.data.folder import scan_folder
from hyperlit.data.images import BadImage, decode_image, place, to_pixels
from hyperlit.data.skips import SkipLog
from hyperlit.hypernetwork import Hypernetwork
from hyperlit.models import SDComponents
from hyperlit.models.components import plain_sizes

log = logging.getLogger(__name__)

__all__ = ["BUILTIN_PROMPTS", "LayerInputs", "Moments", "TEXT", "gather_inputs", "read_data"]

TEXT = "text"  # the stream name every cross-attention layer shares
HELD_OUT_EVERY = 5  # every fifth prompt / sample is held out
HELD_OUT_ROWS = 4096  # rows kept per held-out stream
TIMESTEPS = (100, 300, 500, 700, 900)  # spread over SD's 1000 training timesteps

# Prompts that cover what users type (subjects, media, lighting, composition), so the text fit is not only the
# data's captions; the tiny base's word-level tokenizer maps unknown words to its unknown token, which is fine.
BUILTIN_PROMPTS = (
    "",
    "a photo of a cat",
    "a portrait of a woman, soft light",
    "an old man with a beard, oil painting",
    "a red car on a city street at night",
    "a mountain landscape at sunrise, highly detailed",
    "a bowl of fruit on a wooden table",
    "a castle on a hill, fantasy art",
    "a dog running on the beach",
    "a watercolor painting of flowers",
    "a futuristic city skyline, concept art",
    "a close-up of an eye, macro photography",
    "a medieval knight in armor",
    "an anime girl with blue hair",
    "a cozy living room interior",
    "a bird sitting on a branch",
    "a pencil sketch of a house",
    "a spaceship in orbit around a planet",
    "a plate of pasta, food photography",
    "a forest path in autumn",
    "a black and white photo of a street",
    "a robot standing in a field",
    "a sailing boat on a calm sea",
    "a girl reading a book under a tree",
    "abstract geometric shapes, bright colors",
    "a circle",
    "a red square on a white background",
    "a blue triangle",
    "a green circle on a white background",
    "a yellow cross",
    "a purple square",
    "masterpiece, best quality, 1girl, solo",
    "a tiger in the jungle, digital art",
    "a snowy village at dusk",
    "a cup of coffee, studio lighting",
    "a pixel art character",
    "a lighthouse during a storm",
    "a bouquet of roses",
    "a man in a suit, full body",
    "a child playing with a ball",
    "an underwater scene with fish",
)


@dataclass
class Moments:
    """Sums over training rows of u uᵀ, u fkᵀ and u fvᵀ with u = [x, 1]: all that least squares needs."""

    uu: Tensor
    uk: Tensor
    uv: Tensor
    rows: int = 0

    @classmethod
    def zeros(cls, width: int, device: torch.device | str) -> Moments:
        def zero(rows: int, columns: int) -> Tensor:
            return torch.zeros(rows, columns, dtype=torch.float64, device=device)

        return cls(zero(width + 1, width + 1), zero(width + 1, width), zero(width + 1, width))

    def add(self, x: Tensor, fk: Tensor, fv: Tensor) -> None:
        u = torch.cat([x, torch.ones_like(x[:, :1])], dim=1).double()
        self.uu += u.T @ u
        self.uk += u.T @ fk.double()
        self.uv += u.T @ fv.double()
        self.rows += x.shape[0]


@dataclass
class HeldOut:
    """Held-out rows (x, f_k(x), f_v(x)), float32 on the CPU, at most HELD_OUT_ROWS of them."""

    x: list[Tensor] = field(default_factory=list)
    fk: list[Tensor] = field(default_factory=list)
    fv: list[Tensor] = field(default_factory=list)
    rows: int = 0

    def add(self, x: Tensor, fk: Tensor, fv: Tensor, generator: torch.Generator) -> None:
        room = HELD_OUT_ROWS - self.rows
        if room <= 0:
            return
        take = min(room, max(1, HELD_OUT_ROWS // 8), x.shape[0])
        pick = torch.randperm(x.shape[0], generator=generator)[:take].to(x.device)
        for store, t in ((self.x, x), (self.fk, fk), (self.fv, fv)):
            store.append(t[pick].float().cpu())
        self.rows += take

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return torch.cat(self.x), torch.cat(self.fk), torch.cat(self.fv)


@dataclass
class LayerInputs:
    """What one input stream (the text context, or one self-attention layer's hidden states) gave."""

    width: int
    train: Moments
    held_out: HeldOut


@dataclass(frozen=True)
class DataItems:
    """The captions and images of ``--data``."""

    captions: list[str]
    images: list[Tensor]  # 3×H×W in [-1, 1], at the model's native size


def read_data(folder: Path | None, resolution: int) -> DataItems:
    """Captions and center-cropped pixels of an A1111 image folder; unreadable images are skipped and counted."""
    if folder is None:
        return DataItems([], [])
    skips = SkipLog(verbose=False)
    captions, images = [], []
    for item in scan_folder(folder, skips):
        try:
            rgb = decode_image(item.read()).rgb
        except BadImage as err:
            skips.add(err.kind, item.where, err.detail)
            continue
        captions.append(item.caption)
        images.append(to_pixels(rgb, place(rgb.size, (resolution, resolution), "crop")))
    if skips.counts:
        log.warning("--data %s: %s", folder, skips.summary())
    if not images:
        raise ValueError(f"--data: {folder} holds no readable images; allowed: an A1111 folder of images + .txt")
    return DataItems(captions, images)


def _module_pairs(hn: Hypernetwork, width: int) -> tuple[nn.Module, nn.Module]:
    pair = hn.pairs[str(width)]
    return pair[0].linear, pair[1].linear  # f_k, f_v: the residual branch without x and the multiplier


class _Recorder:
    """Forward pre-hook on one self-attention layer: its context rows go to training moments or held out."""

    def __init__(self, inputs: LayerInputs, fk: nn.Module, fv: nn.Module, generator: torch.Generator) -> None:
        self.inputs, self.fk, self.fv, self.generator = inputs, fk, fv, generator
        self.held_out_rows: Tensor | None = None  # B bools, set before each UNet forward

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if kwargs.get("encoder_hidden_states") is not None or hidden.ndim != 3:
            return
        with torch.no_grad():
            for held in (False, True):
                mask = self.held_out_rows == held
                if not bool(mask.any()):
                    continue
                x = hidden[mask.to(hidden.device)].reshape(-1, hidden.shape[-1]).float()
                fk, fv = self.fk(x), self.fv(x)
                if held:
                    self.inputs.held_out.add(x, fk, fv, self.generator)
                else:
                    self.inputs.train.add(x, fk, fv)


@contextmanager
def _recording(recorders: dict[Attention, _Recorder]) -> Iterator[None]:
    handles = [attn.register_forward_pre_hook(rec, with_kwargs=True) for attn, rec in recorders.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _text_inputs(
    hn: Hypernetwork, components: SDComponents, prompts: Sequence[str], device: torch.device
) -> LayerInputs:
    width = components.context_dim
    fk, fv = _module_pairs(hn, width)
    generator = torch.Generator().manual_seed(1)
    inputs = LayerInputs(width, Moments.zeros(width, device), HeldOut())
    for start in range(0, len(prompts), 8):
        chunk = list(prompts[start : start + 8])
        with torch.no_grad():
            context = components.encode_prompts(chunk).context.to(device)
            for i in range(len(chunk)):
                x = context[i]
                if (start + i) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1:
                    inputs.held_out.add(x, fk(x), fv(x), generator)
                else:
                    inputs.train.add(x, fk(x), fv(x))
    return inputs


def _latents(components: SDComponents, data: DataItems, resolution: int, device: torch.device) -> Tensor:
    if data.images:
        pixels = torch.stack(data.images)
        chunks = [components.encode_images(pixels[i : i + 4])[0] for i in range(0, len(pixels), 4)]
        return components.scale_latents(torch.cat(chunks)).to(device)
    # No data: clean latents of zero, so each noised input is pure (scaled) noise; a weaker stand-in, which the
    # command says.
    side = resolution // components.family.vae_scale_factor
    return torch.zeros(8, components.family.latent_channels, side, side, device=device)


def gather_inputs(
    hn: Hypernetwork,
    components: SDComponents,
    self_layers: dict[str, Attention],
    data: DataItems,
    resolution: int,
    batch: int = 4,
) -> dict[str, LayerInputs]:
    """{TEXT: the text stream (if the network has the text width), layer name: its self-attention stream}."""
    device = components.unet.device
    streams: dict[str, LayerInputs] = {}
    captions = [c for c in data.captions if c]
    prompts = list(dict.fromkeys([*captions, *BUILTIN_PROMPTS]))  # data first, no duplicates
    if components.context_dim in hn.sizes:
        streams[TEXT] = _text_inputs(hn, components, prompts, device)
    if not self_layers:
        return streams
    generator = torch.Generator().manual_seed(3)
    recorders: dict[Attention, _Recorder] = {}
    for name, attn in self_layers.items():
        width = attn.to_k.in_features
        streams[name] = LayerInputs(width, Moments.zeros(width, device), HeldOut())
        recorders[attn] = _Recorder(streams[name], *_module_pairs(hn, width), generator)

    latents = _latents(components, data, resolution, device)
    # Each image with its caption and, as classifier-free guidance runs it, with the empty prompt.
    conditioned = data.captions if len(data.captions) == len(latents) else [""] * len(latents)
    noise_generator = torch.Generator().manual_seed(4)
    unet = components.unet
    scheduler = components.noise_scheduler
    sample = 0
    with hypernetworks_attached(unet, [hn]), _recording(recorders), torch.no_grad():
        for timestep in TIMESTEPS:
            for prompts_of in (conditioned, [""] * len(latents)):
                for start in range(0, len(latents), batch):
                    x0 = latents[start : start + batch]
                    noise = torch.randn(x0.shape, generator=noise_generator).to(device)
                    t = torch.full((len(x0),), timestep, dtype=torch.long, device=device)
                    noisy = scheduler.add_noise(x0, noise, t)
                    cond = components.condition(
                        prompts_of[start : start + batch], sizes=plain_sizes(resolution, resolution, len(x0))
                    ).to(device, unet.dtype)
                    held = torch.tensor([(sample + i) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 for i in range(len(x0))])
                    sample += len(x0)
                    for rec in recorders.values():
                        rec.held_out_rows = held
                    unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond.context, **cond.unet_kwargs)
    return streams
