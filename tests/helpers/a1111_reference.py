"""Independent reference readers of hypernetwork files, written from A1111's and ComfyUI's documented behaviour,
not from hyperlit's code.

Used by the tests to check hyperlit against what A1111 and ComfyUI would compute for the same file:

- :func:`a1111_load` follows A1111's loader: metadata defaults, the NovelAI ``linear1/linear2`` key rename, the
  derived dropout structure, a Sequential built from the metadata and loaded strictly.
- :func:`comfyui_load` follows ComfyUI's loader: the modules are rebuilt from the ``*.weight`` keys in stored order.
- :func:`a1111_safe_check` follows A1111's ``modules/safe.py``: a restricted unpickler and a zip member-name check.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy
import torch
import torch.nn.modules.activation as torch_activation_classes
from torch import Tensor, nn


class ReferenceModule(nn.Module):
    """One residual MLP, ``x + linear(x) * multiplier`` as A1111 computes it, with its only child named ``linear``."""

    def __init__(self, sequential: nn.Sequential, multiplier: float = 1.0) -> None:
        super().__init__()
        self.linear = sequential
        self.multiplier = multiplier

    def forward(self, x: Tensor) -> Tensor:
        return x + self.linear(x) * (1.0 if self.training else self.multiplier)


Pairs = dict[int, tuple[ReferenceModule, ReferenceModule]]


def apply_pairs(pairs: Pairs, context: Tensor) -> tuple[Tensor, Tensor]:
    """A1111's apply_hypernetworks for one network: pick the pair by the last dim, identity otherwise."""
    pair = pairs.get(context.shape[-1])
    if pair is None:
        return context, context
    return pair[0](context), pair[1](context)


# ---------------------------------------------------------------------------------------------------------
# A1111: metadata defaults, derived dropout, the module builder and the activation names

_A1111_NAMED = {
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def a1111_activation(name: str | None) -> nn.Module | None:
    """The activation A1111 inserts for ``name`` (None for no activation); unknown names raise."""
    if name is None or name == "linear":
        return None
    if name in _A1111_NAMED:
        return _A1111_NAMED[name]()
    for attr in dir(torch_activation_classes):
        candidate = getattr(torch_activation_classes, attr)
        if isinstance(candidate, type) and issubclass(candidate, nn.Module) and attr.lower() == name:
            return candidate()
    raise ValueError(f"unsupported activation function: {name}")


def old_dropout_structure(layer_structure: list[float], use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """What the pre-``dropout_structure`` builder did, expressed as a structure.

    That code added Dropout(0.3) after block i when i < len-3, or i < len-2 with last_layer_dropout; block i's
    dropout is entry i+1 of the structure.
    """
    n = len(layer_structure)
    probabilities = [0.0] * n
    if use_dropout:
        for i in range(n - 1):
            if i < n - 3 or (last_layer_dropout and i < n - 2):
                probabilities[i + 1] = 0.3
    return probabilities


def a1111_sequential(
    dim: int,
    layer_structure: list[float],
    activation: str | None,
    activate_output: bool,
    layer_norm: bool,
    dropout_structure: list[float],
) -> nn.Sequential:
    """A1111's HypernetworkModule builder, in its order: Linear, activation, LayerNorm, Dropout."""
    assert layer_structure[0] == 1 and layer_structure[-1] == 1
    layers: list[nn.Module] = []
    last = len(layer_structure) - 2
    for i in range(len(layer_structure) - 1):
        layers.append(nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])))
        if i < last or activate_output:
            act = a1111_activation(activation)
            if act is not None:
                layers.append(act)
        if layer_norm:
            layers.append(nn.LayerNorm(int(dim * layer_structure[i + 1])))
        if dropout_structure[i + 1] > 0:
            assert 0 < dropout_structure[i + 1] < 1
            layers.append(nn.Dropout(p=dropout_structure[i + 1]))
    return nn.Sequential(*layers)


def _fix_old_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    renames = {
        "linear1.bias": "linear.0.bias",
        "linear1.weight": "linear.0.weight",
        "linear2.bias": "linear.1.bias",
        "linear2.weight": "linear.1.weight",
    }
    return {renames.get(key, key): value for key, value in state.items()}


def a1111_metadata(raw: dict) -> dict:
    """The architecture A1111's loader uses for a raw file dict, with its defaults for missing keys."""
    layer_structure = raw.get("layer_structure", [1, 2, 1])
    use_dropout = raw.get("use_dropout", False)
    dropout_structure = raw.get("dropout_structure", None)
    if dropout_structure is not None and any(p > 0 for p in dropout_structure):
        use_dropout = True
    if dropout_structure is None:
        dropout_structure = old_dropout_structure(layer_structure, use_dropout, raw.get("last_layer_dropout", False))
    return {
        "layer_structure": layer_structure,
        "activation": raw.get("activation_func", None),
        "activate_output": raw.get("activate_output", True),
        "layer_norm": raw.get("is_layer_norm", False),
        "dropout_structure": dropout_structure,
        "use_dropout": use_dropout,
    }


def a1111_load(path: str | Path, accept_numeric_strings: bool = False, multiplier: float = 1.0) -> Pairs:
    """Load like A1111: only ``type(key) is int`` entries (optionally numeric strings too), strict state dicts."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    meta = a1111_metadata(raw)
    pairs: Pairs = {}
    for key, value in raw.items():
        if type(key) is int:
            width = key
        elif accept_numeric_strings and isinstance(key, str) and key.isdigit():
            width = int(key)
        else:
            continue
        modules = []
        for state in (value[0], value[1]):
            sequential = a1111_sequential(
                width,
                meta["layer_structure"],
                meta["activation"],
                meta["activate_output"],
                meta["layer_norm"],
                meta["dropout_structure"],
            )
            module = ReferenceModule(sequential, multiplier)
            module.load_state_dict(_fix_old_state_dict(dict(state)), strict=True)
            modules.append(module.eval())
        pairs[width] = (modules[0], modules[1])
    return pairs


# ---------------------------------------------------------------------------------------------------------
# ComfyUI (comfy_extras/nodes_hypernetwork.py)

_COMFYUI_ACTIVATIONS = {
    "linear": None,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softsign": nn.Softsign,
    "mish": nn.Mish,
}


class ComfyUIUnsupported(ValueError):
    """ComfyUI logs 'Unsupported Hypernetwork format' and leaves the model unpatched."""


def _comfyui_sequential(
    state: dict[str, Tensor],
    activation: str,
    is_layer_norm: bool,
    use_dropout: bool,
    activate_output: bool,
    last_layer_dropout: bool,
) -> nn.Sequential:
    weight_keys = [key for key in state if key.endswith(".weight")]
    n = len(weight_keys)
    layers: list[nn.Module] = []
    pos = 0
    while pos < n:
        linear_pos = pos  # "last" / "penultimate" are judged at the Linear's own position
        weight_key = weight_keys[pos]
        weight = state[weight_key]
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": state[weight_key[: -len("weight")] + "bias"]})
        layers.append(linear)
        # "last" and "penultimate" are positions in the list of *.weight keys, LayerNorm weights included.
        act_cls = _COMFYUI_ACTIVATIONS[activation]
        if act_cls is not None and (pos < n - 1 or activate_output):
            layers.append(act_cls())
        if is_layer_norm:
            pos += 1
            ln_key = weight_keys[pos]
            norm = nn.LayerNorm(state[ln_key].shape[0])
            norm.load_state_dict({"weight": state[ln_key], "bias": state[ln_key[: -len("weight")] + "bias"]})
            layers.append(norm)
        is_last, is_penultimate = linear_pos == n - 1, linear_pos == n - 2
        if use_dropout and not is_last and (not is_penultimate or last_layer_dropout):
            layers.append(nn.Dropout(p=0.3))
        pos += 1
    return nn.Sequential(*layers)


def comfyui_load(path: str | Path, strength: float = 1.0, eval_mode: bool = False) -> Pairs:
    """Load like ComfyUI's HypernetworkLoader: rebuild each module from the stored ``*.weight`` keys.

    ComfyUI leaves the modules in training mode (Dropout active); ``eval_mode=True`` switches them off, for tests
    that check only the rebuilt layer order of a file with dropout."""
    raw = torch.load(path, map_location="cpu", weights_only=True)
    activation = raw.get("activation_func", "linear")
    if activation not in _COMFYUI_ACTIVATIONS:
        raise ComfyUIUnsupported(f"Unsupported Hypernetwork format: activation {activation!r}")
    options = {
        "activation": activation,
        "is_layer_norm": raw.get("is_layer_norm", False),
        "use_dropout": raw.get("use_dropout", False),
        "activate_output": raw.get("activate_output", False),
        "last_layer_dropout": raw.get("last_layer_dropout", False),
    }
    pairs: Pairs = {}
    for key, value in raw.items():
        try:
            width = int(key)
        except (TypeError, ValueError):
            continue
        # ComfyUI never switches these modules to eval mode: Dropout layers stay active at inference.
        modules = tuple(
            ReferenceModule(_comfyui_sequential(dict(state), **options), strength).train(not eval_mode)
            for state in (value[0], value[1])
        )
        pairs[width] = modules
    return pairs


# ---------------------------------------------------------------------------------------------------------
# A1111's safe-unpickle check (modules/safe.py)

_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "float32"): torch.float32,
    ("_codecs", "encode"): __import__("_codecs").encode,
    ("__builtin__", "set"): set,
    ("numpy", "dtype"): numpy.dtype,
    ("numpy", "ndarray"): numpy.ndarray,
}


class _Placeholder:
    """Stands in for storages and rebuilt tensors: the check only decides which globals a pickle may name."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args = args


for _name in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy"):
    _ALLOWED_GLOBALS[("torch._utils", _name)] = _Placeholder
for _name in ("Float", "Half", "Int", "Long", "Double", "Byte", "BFloat16"):
    _ALLOWED_GLOBALS[("torch", f"{_name}Storage")] = _Placeholder
_ALLOWED_GLOBALS[("torch.nn.modules.container", "ParameterDict")] = _Placeholder
_ALLOWED_GLOBALS[("numpy.core.multiarray", "scalar")] = _Placeholder
_ALLOWED_GLOBALS[("numpy.core.multiarray", "_reconstruct")] = _Placeholder
_ALLOWED_GLOBALS[("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")] = _Placeholder


class RefusedFile(Exception):
    """A1111's checker would refuse this file ("Error verifying pickled file")."""


class RestrictedUnpickler(pickle.Unpickler):
    """Allows only the globals A1111's check allows; storages load as placeholders, so nothing is materialised."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedFile(f"global '{module}/{name}' is forbidden") from None

    def persistent_load(self, saved_id: object) -> object:
        if not (isinstance(saved_id, tuple) and saved_id and saved_id[0] == "storage"):
            raise RefusedFile(f"unexpected persistent id {saved_id!r}")
        return _Placeholder(*saved_id)


_OLD_ZIP_MEMBER = re.compile(r"^[^/]+/(data\.pkl|version|data/\d+)$")
# The relaxed check of releases after commit 07cf95c accepts byteorder and .data/serialization_id; torch >= 2.6 also
# writes .format_version and .storage_alignment, accepted here too (A1111's behaviour for those is not verified).
_NEW_ZIP_MEMBER = re.compile(
    r"^[^/]+/(data\.pkl|version|byteorder|data/\d+|\.data/serialization_id|\.format_version|\.storage_alignment)$"
)


def a1111_safe_check(path: str | Path, relaxed_zip_names: bool = False) -> list[object]:
    """Raise :class:`RefusedFile` when A1111's safety check would refuse ``path``.

    Zip files: member names are checked (the releases before 07cf95c reject ``byteorder``; ``relaxed_zip_names``
    models the later ones), then ``data.pkl`` is unpickled with the restricted unpickler. Legacy files: the first
    five pickles of the stream are unpickled with it. Returns the unpickled objects (tensors as placeholders).
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pattern = _NEW_ZIP_MEMBER if relaxed_zip_names else _OLD_ZIP_MEMBER
            for member in names:
                if not pattern.match(member):
                    raise RefusedFile(f"bad file inside {path}: {member}")
            return [
                RestrictedUnpickler(io.BytesIO(archive.read(member))).load()
                for member in names
                if member.endswith("/data.pkl")
            ]
    with open(path, "rb") as handle:
        unpickler = RestrictedUnpickler(handle)
        return [unpickler.load() for _ in range(5)]


# ---------------------------------------------------------------------------------------------------------
# Hand-built files in each historical layout (raw dicts, written by the tests with torch.save)


def random_state(keys_and_shapes: list[tuple[str, tuple[int, ...]]], seed: int) -> OrderedDict[str, Tensor]:
    """A state dict with exactly these keys, filled with N(0, 0.3^2) values (large enough to matter)."""
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict((key, torch.randn(*shape, generator=generator) * 0.3) for key, shape in keys_and_shapes)


def linear_keys(index: int, fan_in: int, fan_out: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"linear.{index}.weight", (fan_out, fan_in)), (f"linear.{index}.bias", (fan_out,))]


def norm_keys(index: int, width: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"linear.{index}.weight", (width,)), (f"linear.{index}.bias", (width,))]


def _pairs(widths: tuple[int, ...], keys_for, seed: int, container=tuple) -> dict:
    return {
        d: container((random_state(keys_for(d), seed + 2 * d), random_state(keys_for(d), seed + 2 * d + 1)))
        for d in widths
    }


def novelai_file(widths: tuple[int, ...] = (8, 12), seed: int = 0) -> dict:
    """NovelAI original: linear1 (d->2d), linear2 (2d->d), no activation, no metadata."""

    def keys(d: int) -> list:
        return [
            ("linear1.weight", (2 * d, d)),
            ("linear1.bias", (2 * d,)),
            ("linear2.weight", (d, 2 * d)),
            ("linear2.bias", (d,)),
        ]

    return _pairs(widths, keys, seed)


def oct2022_file(widths: tuple[int, ...] = (8, 12), seed: int = 10) -> dict:
    """Oct 2022: layer_structure and activation_func, no activate_output: ReLU after both Linears (0, 2)."""
    raw = _pairs(widths, lambda d: linear_keys(0, d, 2 * d) + linear_keys(2, 2 * d, d), seed)
    raw.update(
        layer_structure=[1, 2, 1],
        activation_func="relu",
        is_layer_norm=False,
        use_dropout=False,
        step=1200,
        name="oct",
        sd_checkpoint="a9e2bd1b",
        sd_checkpoint_name="model-v1",
    )
    return raw


def nov2022_file(last_layer_dropout: bool, widths: tuple[int, ...] = (8,), seed: int = 20) -> dict:
    """Nov 2022: activate_output False, use_dropout, last_layer_dropout, no dropout_structure, [1,2,4,2,1] swish.

    Derived dropout [0,.3,.3,.3,0] (with lld) puts Lin, Hardswish, Dropout per block: Linears at 0, 3, 6, 9;
    [0,.3,.3,0,0] (without) drops the third Dropout: Linears at 0, 3, 6, 8.
    """
    last = 9 if last_layer_dropout else 8

    def keys(d: int) -> list:
        return (
            linear_keys(0, d, 2 * d)
            + linear_keys(3, 2 * d, 4 * d)
            + linear_keys(6, 4 * d, 2 * d)
            + linear_keys(last, 2 * d, d)
        )

    raw = _pairs(widths, keys, seed)
    raw.update(
        layer_structure=[1, 2, 4, 2, 1],
        activation_func="swish",
        is_layer_norm=False,
        weight_initialization="Normal",
        activate_output=False,
        use_dropout=True,
        last_layer_dropout=last_layer_dropout,
        step=5,
        name="nov",
        sd_checkpoint=None,
        sd_checkpoint_name=None,
    )
    return raw


def current_file(widths: tuple[int, ...] = (8, 12), seed: int = 30) -> dict:
    """v1.x: dropout_structure [0, 0.1, 0], relu, activate_output, layer norm: Lin 0, ReLU 1, LN 2, Drop 3,
    Lin 4, ReLU 5, LN 6."""

    def keys(d: int) -> list:
        return linear_keys(0, d, 2 * d) + norm_keys(2, 2 * d) + linear_keys(4, 2 * d, d) + norm_keys(6, d)

    raw = _pairs(widths, keys, seed)
    raw.update(
        step=777,
        name="current",
        layer_structure=[1.0, 2.0, 1.0],
        activation_func="relu",
        is_layer_norm=True,
        weight_initialization="KaimingNormal",
        sd_checkpoint="0123456789",
        sd_checkpoint_name="sd15",
        activate_output=True,
        use_dropout=True,
        dropout_structure=[0.0, 0.1, 0.0],
        last_layer_dropout=True,
        optional_info="made by hand",
    )
    return raw


def kohya_file(widths: tuple[int, ...] = (8, 12), seed: int = 40) -> dict:
    """kohya hypernetwork_nai.py: lists of two state dicts, keys linear.0 / linear.1, no metadata."""
    return _pairs(widths, lambda d: linear_keys(0, d, 2 * d) + linear_keys(1, 2 * d, d), seed, container=list)


def numeric_string_file(widths: tuple[int, ...] = (8, 12), seed: int = 50) -> dict:
    """Width keys stored as numeric strings ("768"): ComfyUI reads them, A1111 skips them."""
    return {str(d): pair for d, pair in kohya_file(widths, seed).items()}
