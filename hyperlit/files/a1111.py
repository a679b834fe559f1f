"""The AUTOMATIC1111 / NovelAI hypernetwork ``.pt`` format: the one place that knows it.

A file is a pickled plain dict: ``int`` width keys (768, 320, ...) holding a (K, V) pair of ``linear.<idx>.*`` state
dicts, and string metadata keys. Written by hand because no library reads or writes it. Reading accepts every
historical layout; writing produces the current A1111 v1.x layout with every metadata key explicit, in torch's
legacy (non-zip) serialization: A1111's safe-unpickle check in releases before commit 07cf95c refuses the zip
member ``byteorder`` that torch >= 2.1 writes, and later releases accept both.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from hyperlit.files.clients import base_name
from hyperlit.files.content import HypernetworkFile, HypernetworkFileError, LayerStates
from hyperlit.files.pt_zip import save_a1111_zip
from hyperlit.files.torch_file import TorchFileError, load_torch_file
from hyperlit.hypernetwork import ACTIVATIONS, WEIGHT_INITS, HypernetworkConfig
from hyperlit.io import atomic_path

log = logging.getLogger(__name__)

# Layout names reported by `hyperlit inspect`, oldest first.
LAYOUT_NOVELAI = "novelai (linear1/linear2 keys, no metadata)"
LAYOUT_NO_METADATA = "no metadata (kohya / NAI-compatible linear.N keys)"
LAYOUT_OCT_2022 = "a1111 oct-2022 (no activate_output: activation after every Linear)"
LAYOUT_NOV_2022 = "a1111 nov-2022 (activate_output, no dropout_structure)"
LAYOUT_CURRENT = "a1111 v1.x (dropout_structure)"

METADATA_KEYS = (
    "step",
    "name",
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "sd_checkpoint",
    "sd_checkpoint_name",
    "activate_output",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "optional_info",
)


def derive_dropout_structure(
    layer_structure: list[float] | None, use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """A1111's rule for files written before ``dropout_structure`` existed.

    It reproduces the old builder, which put Dropout(0.3) after every hidden Linear but the last one, and after that
    one too only with ``last_layer_dropout``: e.g. [1, 2, 4, 2, 1] gives [0, .3, .3, .3, 0] with it, [0, .3, .3, 0, 0]
    without.
    """
    structure = layer_structure if layer_structure is not None else [1, 2, 1]
    n = len(structure)
    if not use_dropout:
        return [0.0] * n
    return [0.0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0.0, 0.0]


def _width_of(path: Path, key: object) -> int | None:
    """The width a top-level key names, None for a metadata key; error for a key that is neither."""
    if isinstance(key, bool):
        raise HypernetworkFileError(f"{path}: top-level key {key!r} is not a width (a positive integer)")
    if isinstance(key, int):
        width = key
    elif isinstance(key, str) and key.strip().isdigit():
        width = int(key)  # ComfyUI accepts numeric strings; A1111 would skip them silently
    elif isinstance(key, str):
        return None
    else:
        raise HypernetworkFileError(
            f"{path}: top-level key {key!r} ({type(key).__name__}) is neither a width nor a metadata name"
        )
    if width <= 0:
        raise HypernetworkFileError(f"{path}: top-level key {key!r} is not a width (a positive integer)")
    return width


def _rename_novelai_keys(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    renamed = {}
    legacy = False
    for key, value in state.items():
        for old, new in (("linear1.", "linear.0."), ("linear2.", "linear.1.")):
            if key.startswith(old):
                key, legacy = new + key[len(old) :], True
        renamed[key] = value
    return renamed, legacy


def _layer_states(path: Path, raw: dict) -> tuple[LayerStates, bool]:
    layers: LayerStates = {}
    legacy = False
    for key, value in raw.items():
        width = _width_of(path, key)
        if width is None:
            continue
        if width in layers:
            raise HypernetworkFileError(f"{path}: width {width} appears twice (as {key!r})")
        if not isinstance(value, list | tuple) or len(value) < 2:
            raise HypernetworkFileError(
                f"{path}: width {width} holds {type(value).__name__}; expected a (K, V) pair of state dicts"
            )
        pair = []
        for label, state in zip(("K", "V"), value[:2], strict=True):
            if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
                raise HypernetworkFileError(f"{path}: width {width} {label} entry is not a state dict of tensors")
            state, was_legacy = _rename_novelai_keys(dict(state))
            legacy |= was_legacy
            pair.append({k: v.float() for k, v in state.items()})
        k_shapes = {k: tuple(v.shape) for k, v in pair[0].items()}
        v_shapes = {k: tuple(v.shape) for k, v in pair[1].items()}
        if k_shapes != v_shapes:
            raise HypernetworkFileError(
                f"{path}: width {width} K and V modules differ (K {k_shapes}, V {v_shapes}); they must have the "
                "same keys and shapes"
            )
        first = next((v for k, v in pair[0].items() if k.endswith("weight") and v.dim() == 2), None)
        if first is not None and first.shape[1] != width:
            raise HypernetworkFileError(
                f"{path}: width key {key!r} does not match its first Linear, which takes {first.shape[1]} inputs"
            )
        layers[width] = (pair[0], pair[1])
    if not layers:
        raise HypernetworkFileError(
            f"{path}: not a hypernetwork file: no width entries (integer keys such as 768 holding a (K, V) pair)"
        )
    return layers, legacy


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def parse(path: str | Path, raw: object) -> HypernetworkFile:
    """Interpret a loaded ``.pt`` object with A1111's defaults for every missing metadata key.

    Those defaults: layer_structure [1, 2, 1], no activation, no LayerNorm, activate_output True (see below),
    dropout derived by :func:`derive_dropout_structure`, step 0, name = file stem.
    """
    path = Path(path)
    if not isinstance(raw, dict):
        raise HypernetworkFileError(
            f"{path}: not a hypernetwork file: the top-level object is a {type(raw).__name__}, not a dict"
        )
    layers, novelai_keys = _layer_states(path, raw)
    meta = {k: v for k, v in raw.items() if isinstance(k, str) and not k.strip().isdigit()}

    layer_structure = meta.get("layer_structure") or [1, 2, 1]
    activation = meta.get("activation_func")
    activation = "linear" if activation is None else str(activation).lower()
    if activation not in ACTIVATIONS:
        raise HypernetworkFileError(
            f"{path}: activation_func {meta.get('activation_func')!r} is not supported; allowed: "
            f"{', '.join(sorted(ACTIVATIONS))}"
        )
    dropout = meta.get("dropout_structure")
    if dropout is None:
        dropout = derive_dropout_structure(
            list(layer_structure), bool(meta.get("use_dropout", False)), bool(meta.get("last_layer_dropout", False))
        )
    weight_init = meta.get("weight_initialization", "Normal")
    try:
        config = HypernetworkConfig(
            layer_structure=[float(x) for x in layer_structure],
            activation=activation,
            # Before A1111 PR #3698 the activation followed every Linear, so a missing key means True.
            activate_output=bool(meta.get("activate_output", True)),
            layer_norm=bool(meta.get("is_layer_norm", False)),
            weight_init=weight_init if weight_init in WEIGHT_INITS else "Normal",
            dropout_structure=[float(x) for x in dropout] if any(float(x) > 0 for x in dropout) else None,
            sizes=sorted(layers),
            multiplier=1.0,
        )
    except (ValueError, TypeError) as err:
        raise HypernetworkFileError(f"{path}: metadata is not valid: {err}") from None

    if novelai_keys:
        layout = LAYOUT_NOVELAI
    elif "dropout_structure" in meta:
        layout = LAYOUT_CURRENT
    elif "activate_output" in meta:
        layout = LAYOUT_NOV_2022
    elif "layer_structure" in meta or "activation_func" in meta:
        layout = LAYOUT_OCT_2022
    else:
        layout = LAYOUT_NO_METADATA
    step = meta.get("step", 0)
    return HypernetworkFile(
        config=config,
        layers=layers,
        name=str(meta.get("name") or path.stem),
        step=int(step) if isinstance(step, int | float) and not isinstance(step, bool) else 0,
        sd_checkpoint=_optional_str(meta.get("sd_checkpoint")),
        sd_checkpoint_name=_optional_str(meta.get("sd_checkpoint_name")),
        optional_info=_optional_str(meta.get("optional_info")),
        layout=layout,
        extra={k: v for k, v in meta.items() if k not in METADATA_KEYS},
        metadata=meta,
    )


def read_pt(path: str | Path) -> HypernetworkFile:
    """Read any historical A1111 / NovelAI / kohya hypernetwork ``.pt`` with a weights-only unpickler."""
    path = Path(path)
    try:
        raw = load_torch_file(path)
    except TorchFileError as err:
        raise HypernetworkFileError(str(err)) from None
    return parse(path, raw)


def metadata(content: HypernetworkFile) -> dict:
    """The metadata keys hyperlit writes for ``content``: every key of the current A1111 layout, explicit."""
    config = content.config
    dropout = config.dropout_probabilities()
    return dict(
        step=int(content.step),
        name=content.name,
        layer_structure=[float(x) for x in config.layer_structure],
        activation_func=config.activation,  # always a string: ComfyUI rejects None
        is_layer_norm=bool(config.layer_norm),
        weight_initialization=config.weight_init,
        sd_checkpoint=content.sd_checkpoint,
        sd_checkpoint_name=content.sd_checkpoint_name,
        activate_output=bool(config.activate_output),
        use_dropout=config.use_dropout,
        dropout_structure=[float(x) for x in dropout],
        last_layer_dropout=bool(dropout[-2] != 0),
        optional_info=content.optional_info,
    )


def to_pt_dict(content: HypernetworkFile) -> dict:
    """The current A1111 layout: int width keys, (K, V) state dicts, and every metadata key explicit."""
    out: dict = {}
    for width, (k_state, v_state) in content.layers.items():
        out[int(width)] = tuple(
            OrderedDict((key, t.detach().to("cpu", torch.float32).contiguous().clone()) for key, t in state.items())
            for state in (k_state, v_state)
        )
    out.update(metadata(content))
    return out


def write_pt(path: str | Path, content: HypernetworkFile, name: str | None = None) -> Path:
    """Write ``content`` as an A1111 ``.pt`` storing ``name`` (default: the file's base name, as A1111 lists files by
    stem; snapshots ``<name>-<step>.pt`` pass the network's base name, as A1111's trainer stores it)."""
    path = Path(path)
    content.name = name or base_name(path)
    with atomic_path(path, suffix=".pt") as tmp:
        # A zip that every A1111 release accepts and torch.load(mmap=True) reads (see hyperlit.files.pt_zip).
        save_a1111_zip(to_pt_dict(content), tmp)
    return path


def sha256_prefix(path: str | Path, length: int = 10) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def optim_path(pt_path: str | Path) -> Path:
    pt_path = Path(pt_path)
    return pt_path.with_name(pt_path.name + ".optim")


def write_optim(pt_path: str | Path, optimizer_state: dict, optimizer_name: str = "AdamW") -> Path:
    """Write A1111's ``<file>.pt.optim`` beside an already written ``.pt``.

    A1111 resumes from it only when its ``hash`` equals the first 10 hex digits of the ``.pt``'s sha256; the state's
    parameter order is, per width in insertion order, the K module's parameters then the V module's.
    """
    target = optim_path(pt_path)
    payload = {
        "optimizer_name": optimizer_name,
        "hash": sha256_prefix(pt_path),
        "optimizer_state_dict": optimizer_state,
    }
    with atomic_path(target, suffix=".optim") as tmp:
        torch.save(payload, tmp, _use_new_zipfile_serialization=False)
    return target


def read_optim(pt_path: str | Path) -> tuple[str, dict] | None:
    """The (optimizer name, state) stored beside ``pt_path``, or None when absent or for another ``.pt``."""
    target = optim_path(pt_path)
    if not target.is_file():
        return None
    try:
        payload = load_torch_file(target)
    except TorchFileError as err:
        log.warning("ignored, not a readable optimizer state: %s", err)
        return None
    if not isinstance(payload, dict) or "optimizer_state_dict" not in payload:
        log.warning("%s: ignored, it holds no optimizer_state_dict", target)
        return None
    if payload.get("hash") != sha256_prefix(pt_path):
        log.warning("%s: ignored, it was saved for another version of %s (hash differs)", target, Path(pt_path).name)
        return None
    return str(payload.get("optimizer_name", "AdamW")), payload["optimizer_state_dict"]
