"""LoRA files named by ``<lora:NAME:MULT>`` prompt tags: found and checked before the model loads, applied through
diffusers' own ``load_lora_weights`` (so hyperlit's writer is not what reads them), and named as A1111 names them.

A1111 identifies a LoRA by a hash of the file: the ``sshs_model_hash`` its metadata carries when kohya wrote one,
else, for a ``.safetensors`` file, the sha256 of everything after the header (kohya's "addnet" hash, which editing
the metadata leaves unchanged); the infotext gives its first 12 hex digits as ``Lora hashes: "NAME: HASH, ..."``,
NAME as written in the tag, without ``:`` and ``,``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from hyperlit.models import ModelFamily
from hyperlit.prompt_tags import LoraTag, tagged_folder

__all__ = ["TaggedLora", "available_loras", "check_tagged_loras", "lora_hashes", "loras_applied", "short_hash"]

EXTENSION = ".safetensors"  # diffusers reads these without unpickling anything
SHORT_HASH = 12  # hex digits of A1111's LoRA short hash
# The down (input-side) matrix of a LoRA module, shape r x in, as each layout diffusers' loader reads names it:
# kohya `X.lora_down.weight`, PEFT `X.lora_A.weight`, diffusers 0.21-0.25 `X.lora.down.weight`, and the attention
# processors of diffusers before 0.21 (its first LoRA training scripts) `attn1.processor.to_k_lora.down.weight`.
_DOWN_SUFFIX = r"(?:\.lora_down|\.lora_A|\.lora\.down|_lora\.down)\.weight$"
_DOWN = re.compile(_DOWN_SUFFIX)
# to_k / to_v of the UNet's self- (attn1) and cross-attention (attn2) layers, in kohya's `_` and diffusers' `.` names.
_ATTENTION = re.compile(r"(attn[12])[._](?:processor[._])?to_[kv]" + _DOWN_SUFFIX)
_BLOCK = 1 << 20


@dataclass(frozen=True)
class TaggedLora:
    """One checked ``<lora:...>`` tag: its file, its multiplier and A1111's short hash of the file."""

    name: str  # as written in the tag
    path: Path
    multiplier: float
    short_hash: str


def available_loras(directory: Path) -> dict[str, Path]:
    """Name (file stem, as A1111 keys its list) -> file, for the ``.safetensors`` files in `directory`."""
    return {path.stem: path for path in sorted(directory.glob(f"*{EXTENSION}")) if path.is_file()}


def addnet_hash(path: Path) -> str:
    """sha256 of a safetensors file's tensor bytes: everything after the 8-byte length and the JSON header."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header)
        while chunk := handle.read(_BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


def short_hash(path: Path, metadata: dict[str, str]) -> str:
    """A1111's short hash of a LoRA file: kohya's recorded ``sshs_model_hash`` wins over the computed one."""
    return (metadata.get("sshs_model_hash") or addnet_hash(path))[:SHORT_HASH]


def _check_widths(tag: str, path: Path, widths: dict[str, set[int]], family: ModelFamily) -> None:
    cross, self_widths = widths["attn2"], widths["attn1"]
    if cross - {family.context_dim}:
        raise ValueError(
            f"{tag}: {path} changes cross-attention layers reading a text context of width {sorted(cross)}, but "
            f"model {family.name}'s is {family.context_dim}; it was made for another model"
        )
    if self_widths - set(family.attention_widths):
        raise ValueError(
            f"{tag}: {path} changes self-attention layers of widths {sorted(self_widths)}, but model "
            f"{family.name}'s are {list(family.attention_widths)}; it was made for another model"
        )


def _read_lora(tag: str, path: Path, family: ModelFamily) -> dict[str, str]:
    """The file's metadata, after checking from its header (no tensor loaded) that it is a LoRA for `family`."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            downs = {key: handle.get_slice(key).get_shape() for key in handle.keys() if _DOWN.search(key)}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{tag}: {path} is not a readable safetensors file ({err})") from None
    if not downs:
        raise ValueError(f"{tag}: {path} holds no LoRA weights (no lora_down / lora_A keys); is it a LoRA file?")
    widths: dict[str, set[int]] = {"attn1": set(), "attn2": set()}
    for key, shape in downs.items():
        if (match := _ATTENTION.search(key)) and len(shape) == 2:
            widths[match.group(1)].add(int(shape[1]))
    _check_widths(tag, path, widths, family)
    return metadata


def check_tagged_loras(tags: Sequence[LoraTag], directory: Path | None, family: ModelFamily) -> list[TaggedLora]:
    """Find and check every tagged LoRA file (header only) for `family`: the model is not needed yet."""
    if not tags:
        return []
    directory = tagged_folder(directory, "--lora-dir", f"<lora:{tags[0].name}>", "the LoRA .safetensors files")
    available = available_loras(directory)
    checked = []
    for tag in tags:
        label = f"<lora:{tag.name}>"
        if tag.name not in available:
            names = ", ".join(available) or "none"
            raise ValueError(f"{label}: no {tag.name}{EXTENSION} in {directory}; found: {names}")
        path = available[tag.name]
        metadata = _read_lora(label, path, family)
        checked.append(TaggedLora(tag.name, path, tag.multiplier, short_hash(path, metadata)))
    return checked


def lora_hashes(loras: Sequence[TaggedLora]) -> str | None:
    """The value of A1111's ``Lora hashes`` infotext key, or None with no LoRA (A1111 then writes no key)."""
    by_alias = {lora.name.replace(":", "").replace(",", ""): lora.short_hash for lora in loras}
    return ", ".join(f"{alias}: {digest}" for alias, digest in by_alias.items()) or None


@contextmanager
def loras_applied(pipe, loras: Sequence[TaggedLora]) -> Iterator[None]:
    """Load each LoRA into the pipeline's UNet / text encoder by diffusers' loader, each as its own adapter at its
    multiplier (so a tag repeated stacks); unload them all on exit, restoring the original modules."""
    if not loras:
        yield
        return
    adapters = [f"lora_{index}" for index in range(len(loras))]  # tag names may hold characters PEFT refuses
    try:
        for adapter, lora in zip(adapters, loras, strict=True):
            try:
                pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=adapter)
            except (ValueError, KeyError, RuntimeError) as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ValueError(
                    f"<lora:{lora.name}>: diffusers' load_lora_weights refused {lora.path}: {reason}"
                ) from None
            # diffusers skips keys it cannot place without a word (e.g. its first scripts' files, whose keys lack
            # the `unet.` prefix): a file it took nothing from would otherwise change nothing, silently
            if adapter not in {name for names in pipe.get_list_adapters().values() for name in names}:
                raise ValueError(
                    f"<lora:{lora.name}>: diffusers' load_lora_weights found no layer of this model's UNet or text "
                    f"encoders named in {lora.path} (keys must start with unet. / text_encoder. or be kohya's "
                    "lora_unet_ / lora_te_)"
                )
        pipe.set_adapters(adapters, [lora.multiplier for lora in loras])
        yield
    finally:
        pipe.unload_lora_weights()
