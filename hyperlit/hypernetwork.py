"""NovelAI / AUTOMATIC1111 hypernetworks: per-width (K, V) pairs of residual MLPs.

Written by hand because no library has them. The module layout follows A1111's builder exactly (per Linear, in
order: Linear, activation, LayerNorm, Dropout) so that ``state_dict`` indices (``linear.<idx>.weight``) match A1111
files: activation and Dropout slots consume an index even though they have no parameters.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.modules.activation as torch_activations
from torch import Tensor, nn

log = logging.getLogger(__name__)

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")

# A1111's own names; every other name is a lower-cased class name from torch.nn.modules.activation, as in A1111.
# "swish" is Hardswish, not SiLU: that is what A1111 builds, so files trained there compute this.
_A1111_BASE_ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "linear": None,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def _parameter_free_torch_activations() -> dict[str, type[nn.Module]]:
    """Lower-cased name -> class for every class of torch.nn.modules.activation that A1111 can build.

    A1111 instantiates activations with no arguments, so classes that need arguments (Threshold,
    MultiheadAttention) cannot be built there; classes with parameters (PReLU) are left out on purpose: they would
    add weight keys that ComfyUI and the older loaders do not expect; so are those that change the width (GLU).
    """
    found: dict[str, type[nn.Module]] = {}
    for attr, cls in vars(torch_activations).items():
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            continue
        if cls.__module__ != torch_activations.__name__ or attr.startswith("_"):
            continue
        try:
            instance = cls()
        except TypeError:
            continue
        if any(True for _ in instance.parameters()):
            continue
        with warnings.catch_warnings():  # softmax-like classes warn about their implicit dim
            warnings.simplefilter("ignore")
            shape = instance(torch.zeros(2, 3, 4)).shape
        if shape != (2, 3, 4):  # GLU halves the width: the next Linear would break
            continue
        found[attr.lower()] = cls
    return found


ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    **_parameter_free_torch_activations(),
    **_A1111_BASE_ACTIVATIONS,
}


def _allowed(values: Sequence[str]) -> str:
    return ", ".join(values)


@dataclass
class HypernetworkConfig:
    """Architecture of a hypernetwork; mirrors A1111's creation options. Validated when constructed."""

    layer_structure: list[float] = field(default_factory=lambda: [1, 2, 1])
    activation: str = "linear"
    activate_output: bool = False
    layer_norm: bool = False
    weight_init: str = "Normal"
    # None means no dropout; one probability per entry of layer_structure (A1111's dropout_structure); or one
    # number p: A1111's "use dropout" layout, p after every hidden layer and 0 at the input and output
    # ([1, 2, 1] -> [0, p, 0]), so a model family's default fits any layer_structure.
    dropout_structure: list[float] | float | None = None
    # Training only, like dropout: Gaussian noise added to the MLP's input (not to the residual path), as a fraction
    # of each context vector's standard deviation; 0 turns it off. Held-out prompts give context vectors far from
    # the few training captions' (the text encoder is causal: every token after the first content word differs), so
    # a network fit to the exact vectors draws the style only on prompts like its captions. The noise makes it learn a
    # change that holds near them, as NEFTune's noisy embeddings do for language models. A1111 files do not store
    # it (inference never adds noise); hyperlit's own .hyperlit.safetensors keep it with the rest of the config.
    input_noise: float = 0.0
    # Context widths that get a (K, V) module pair, or "auto": the widths the base model's attention uses.
    sizes: list[int] | str = "auto"
    multiplier: float = 1.0

    def __post_init__(self) -> None:
        self.layer_structure = _validate_layer_structure(self.layer_structure)
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ValueError(
                f"hypernet.activation: {self.activation!r} is not supported; allowed: {_allowed(sorted(ACTIVATIONS))}"
            )
        for key in ("activate_output", "layer_norm"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"hypernet.{key}: {getattr(self, key)!r} is not allowed; use true or false")
        if self.weight_init not in WEIGHT_INITS:
            raise ValueError(
                f"hypernet.weight_init: {self.weight_init!r} is not supported; allowed: {_allowed(WEIGHT_INITS)}"
            )
        self.dropout_structure = _validate_dropout(self.dropout_structure, len(self.layer_structure))
        if (
            isinstance(self.input_noise, bool)
            or not isinstance(self.input_noise, int | float)
            or not math.isfinite(self.input_noise)
            or self.input_noise < 0
        ):
            raise ValueError(
                f"hypernet.input_noise: {self.input_noise!r} is not allowed; use a number >= 0 (a fraction of each "
                "context vector's standard deviation; 0 turns it off)"
            )
        self.input_noise = float(self.input_noise)
        self.sizes = _validate_sizes(self.sizes)
        if isinstance(self.multiplier, bool) or not isinstance(self.multiplier, int | float):
            raise ValueError(f"hypernet.multiplier: {self.multiplier!r} is not a number")
        if not math.isfinite(self.multiplier):
            raise ValueError(f"hypernet.multiplier: {self.multiplier!r} is not allowed; use a finite number")
        self.multiplier = float(self.multiplier)

    @property
    def use_dropout(self) -> bool:
        return any(p > 0 for p in self.dropout_structure or ())

    def dropout_probabilities(self) -> list[float]:
        return list(self.dropout_structure) if self.dropout_structure else [0.0] * len(self.layer_structure)

    def to_dict(self) -> dict:
        return asdict(self)


def _validate_layer_structure(value: object) -> list[float]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(
            f"hypernet.layer_structure: {value!r} is not a list; use a list of numbers that starts and ends "
            "with 1, e.g. [1, 2, 1]"
        )
    items = list(value)
    if len(items) < 2:
        raise ValueError(f"hypernet.layer_structure: {items!r} needs at least two entries, e.g. [1, 2, 1]")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item) or item <= 0:
            raise ValueError(
                f"hypernet.layer_structure: entry {item!r} in {items!r} is not allowed; entries are numbers > 0"
            )
    if items[0] != 1 or items[-1] != 1:
        raise ValueError(
            f"hypernet.layer_structure: {items!r} must start and end with 1 (the module maps width d back to d)"
        )
    return [int(x) if float(x).is_integer() else float(x) for x in items]


def _validate_dropout(value: object, length: int) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not 0 <= value < 1:
            raise ValueError(f"hypernet.dropout_structure: {value!r} is not allowed; a single probability is in [0, 1)")
        return [0.0] + [float(value)] * (length - 2) + [0.0]
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(
            f"hypernet.dropout_structure: {value!r} is not a list; use null, one number in [0, 1) (on every hidden "
            f"layer) or {length} numbers in [0, 1)"
        )
    items = list(value)
    if len(items) != length:
        raise ValueError(
            f"hypernet.dropout_structure: {items!r} has {len(items)} entries; it needs {length}, one per "
            "layer_structure entry"
        )
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | float) or not 0 <= item < 1:
            raise ValueError(
                f"hypernet.dropout_structure: entry {item!r} in {items!r} is not allowed; entries are in [0, 1)"
            )
    return [float(x) for x in items]


def _validate_sizes(value: object) -> list[int] | str:
    if value == "auto":
        return "auto"
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"hypernet.sizes: {value!r} is not allowed; use 'auto' or a list of widths like [768, 320]")
    sizes = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            raise ValueError(f"hypernet.sizes: entry {item!r} is not allowed; widths are positive integers")
        if item in sizes:
            raise ValueError(f"hypernet.sizes: width {item} is listed twice in {list(value)!r}")
        sizes.append(item)
    return sizes


def _init_weights(layer: nn.Module, weight_init: str, activation: str) -> None:
    """A1111's initialisation: LayerNorm weights always N(0, 0.01) like 'Normal'; biases zero."""
    if isinstance(layer, nn.LayerNorm) or weight_init == "Normal":
        nn.init.normal_(layer.weight, mean=0.0, std=0.01)
    elif weight_init == "XavierUniform":
        nn.init.xavier_uniform_(layer.weight)
    elif weight_init == "XavierNormal":
        nn.init.xavier_normal_(layer.weight)
    else:
        nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
        init = nn.init.kaiming_uniform_ if weight_init == "KaimingUniform" else nn.init.kaiming_normal_
        init(layer.weight, nonlinearity=nonlinearity)
    nn.init.zeros_(layer.bias)


class HypernetworkModule(nn.Module):
    """One residual MLP, ``x + mlp(x) * multiplier``, acting on the K or the V input of attention."""

    def __init__(self, width: int, config: HypernetworkConfig) -> None:
        super().__init__()
        structure = config.layer_structure
        dropout = config.dropout_probabilities()
        layers: list[nn.Module] = []
        for i in range(len(structure) - 1):
            fan_in, fan_out = int(width * structure[i]), int(width * structure[i + 1])
            if fan_in < 1 or fan_out < 1:
                raise ValueError(
                    f"hypernet.layer_structure: {structure!r} gives a layer of width {min(fan_in, fan_out)} "
                    f"for context width {width}; every width * entry must be >= 1"
                )
            layers.append(nn.Linear(fan_in, fan_out))
            is_last = i >= len(structure) - 2
            activation_cls = ACTIVATIONS[config.activation]
            if activation_cls is not None and (not is_last or config.activate_output):
                layers.append(activation_cls())
            if config.layer_norm:  # A1111 adds it after the last Linear too
                layers.append(nn.LayerNorm(fan_out))
            if dropout[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout[i + 1]))
        self.linear = nn.Sequential(*layers)
        for layer in self.linear:
            if isinstance(layer, nn.Linear | nn.LayerNorm):
                _init_weights(layer, config.weight_init, config.activation)
        self.multiplier = config.multiplier
        self.input_noise = config.input_noise

    def forward(self, x: Tensor) -> Tensor:
        # A1111 trains at strength 1 whatever the inference multiplier is.
        multiplier = 1.0 if self.training else self.multiplier
        mlp_input = x
        if self.training and self.input_noise > 0:
            # scaled per context vector, so one value fits any text encoder's hidden-state scale. Not detached: on
            # self-attention widths x carries gradient, and the runs measured in docs/benchmarks.md let it flow
            # through the scale too
            scale = self.input_noise * x.std(dim=-1, keepdim=True)
            mlp_input = x + torch.randn_like(x) * scale
        return x + self.linear(mlp_input) * multiplier


class Hypernetwork(nn.Module):
    """A (K, V) pair of :class:`HypernetworkModule` per context width, plus the metadata A1111 files carry."""

    def __init__(
        self,
        config: HypernetworkConfig,
        sizes: Sequence[int] | None = None,
        name: str = "hypernetwork",
    ) -> None:
        super().__init__()
        if sizes is None:
            if config.sizes == "auto":
                raise ValueError(
                    "hypernet.sizes is 'auto': resolve it against the base model (pass sizes=[...]) before "
                    "building the hypernetwork"
                )
            sizes = config.sizes
        sizes = _validate_sizes(list(sizes))
        self.config = config
        self.name = name
        # Kept in A1111 metadata; set by training and by loading a file.
        self.step = 0
        self.sd_checkpoint: str | None = None
        self.sd_checkpoint_name: str | None = None
        self.optional_info: str | None = None
        self.source_layout: str | None = None  # which historical file layout it was read from, if any
        self.pairs = nn.ModuleDict(
            {
                str(width): nn.ModuleList([HypernetworkModule(width, config), HypernetworkModule(width, config)])
                for width in sizes
            }
        )

    @property
    def sizes(self) -> list[int]:
        return [int(width) for width in self.pairs]

    @property
    def multiplier(self) -> float:
        return self.config.multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self.config.multiplier = float(value)
        for module in self.modules():
            if isinstance(module, HypernetworkModule):
                module.multiplier = float(value)

    def forward_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """The (K input, V input) for an attention layer whose context is ``context``; identity for other widths."""
        key = str(context.shape[-1])
        if key not in self.pairs:
            return context, context
        pair = self.pairs[key]
        return pair[0](context), pair[1](context)

    def forward(self, context: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward_kv(context)

    # --- per-width state dicts in A1111's shape: {width: (K state dict, V state dict)} ---

    def layer_state_dicts(self) -> dict[int, tuple[dict[str, Tensor], dict[str, Tensor]]]:
        return {
            int(width): tuple(
                {
                    key: value.detach().to("cpu", torch.float32).contiguous().clone()
                    for key, value in module.state_dict().items()
                }
                for module in pair
            )
            for width, pair in self.pairs.items()
        }

    def load_layer_state_dicts(
        self, layers: dict[int, tuple[dict[str, Tensor], dict[str, Tensor]]], source: str = "state"
    ) -> None:
        """Load ``{width: (K, V)}`` strictly; a mismatch names the width, the path (K or V) and the keys."""
        missing = sorted(set(self.sizes) - set(layers))
        extra = sorted(set(layers) - set(self.sizes))
        if missing or extra:
            raise ValueError(f"{source}: widths {sorted(layers)} do not match the hypernetwork's widths {self.sizes}")
        for width, states in layers.items():
            for path, module, state in zip(("K", "V"), self.pairs[str(width)], states, strict=True):
                try:
                    module.load_state_dict(state, strict=True)
                except RuntimeError as err:
                    detail = " ".join(str(err).split())
                    raise ValueError(
                        f"{source}: width {width} {path} module does not fit the structure "
                        f"{self.config.layer_structure} (activation {self.config.activation}, layer_norm "
                        f"{self.config.layer_norm}, dropout {self.config.dropout_structure}): {detail}"
                    ) from None

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())
