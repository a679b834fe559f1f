"""What a hypernetwork file holds, whatever its container: the format-neutral type every codec reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from hyperlit.hypernetwork import HypernetworkConfig

# {width: (K module state dict, V module state dict)}, keys as HypernetworkModule.state_dict() names them.
LayerStates = dict[int, tuple[dict[str, Tensor], dict[str, Tensor]]]


class HypernetworkFileError(ValueError):
    """A file that is not a usable hypernetwork; the message names the file and the problem."""


@dataclass
class HypernetworkFile:
    """The content of a hypernetwork file, independent of its container."""

    config: HypernetworkConfig
    layers: LayerStates
    name: str
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    optional_info: str | None = None
    # The historical layout a codec recognised when reading (shown by `hyperlit inspect`); None when built in memory.
    layout: str | None = None
    # Metadata keys the codec does not interpret, kept for inspection.
    extra: dict = field(default_factory=dict)
    # Every metadata key exactly as a client-read `.pt` stores it (what ComfyUI's loader reads, with its own
    # defaults); None for content built in memory or read from hyperlit's `.safetensors`.
    metadata: dict | None = None
