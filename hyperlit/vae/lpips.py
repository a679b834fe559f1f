"""LPIPS-VGG perceptual distance (Zhang et al. 2018), written for offline use.

The backbone is a VGG16 ``features`` stack whose parameter names match torchvision's ``vgg16().features``
(``features.0.weight`` ... ``features.28.bias``), so a torchvision VGG16 state dict can be loaded without
torchvision. The linear heads use the lpips ``vgg.pth`` layout (``lin0.model.1.weight`` ... ``lin4``);
torchmetrics bundles that file, so the heads are found locally by default. The backbone weights are never
downloaded: a path must be given, or random weights requested explicitly (tests only).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from hyperlit.files.torch_file import load_torch_file

# VGG16 configuration "D": numbers are conv widths, "M" is a 2×2 max-pool.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# Indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the five LPIPS taps.
TAPS = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS ScalingLayer constants: inputs in [-1, 1] are mapped to the ImageNet statistics VGG was trained on.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = int(v)
    return nn.Sequential(*layers)


def load_weights_file(path: str | os.PathLike, key: str) -> dict[str, Tensor]:
    """Read a safetensors / torch file strictly (no pickled code); ``key`` names the config key in errors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: file not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(p), device="cpu")
    else:
        try:
            sd = load_torch_file(p)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
            raise ValueError(f"{key}={str(path)!r}: cannot be read as a weights-only torch file ({e})") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{key}={str(path)!r}: expected a state dict of tensors")
    return sd


def bundled_lin_weights() -> Path | None:
    """The lpips-layout VGG linear heads torchmetrics ships inside its wheel, if installed."""
    try:
        import torchmetrics
    except ImportError:
        return None
    p = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "vgg.pth"
    return p if p.is_file() else None


_FEATURE_KEY = re.compile(r"(?:^|\.)features\.(\d+)\.(weight|bias)$")
_SLICE_KEY = re.compile(r"(?:^|\.)slice\d\.(\d+)\.(weight|bias)$")  # lpips' own net.sliceK.N.* layout
_LIN_KEY = re.compile(r"^lin(\d)\.(?:model\.1\.)?weight$")


class LPIPS(nn.Module):
    """Per-image LPIPS distance between images in [-1, 1]; always frozen and in eval mode, computed in fp32."""

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        lin_weights: str | os.PathLike | None = None,
        random_backbone: bool = False,
        eps: float = 1e-10,
    ) -> None:
        super().__init__()
        self.features = vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.eps = eps
        if weights is not None:
            self._load_backbone(weights)
        elif not random_backbone:
            raise ValueError(
                "loss.perceptual.weights is not set: LPIPS needs local VGG16 backbone weights (a torchvision "
                "vgg16 state dict, .pth or .safetensors; they cannot be downloaded here). Set "
                "loss.perceptual.weights=/path/to/vgg16.pth, or loss.perceptual.weight=0 to train without "
                "the perceptual loss."
            )
        lin = lin_weights if lin_weights is not None else bundled_lin_weights()
        if lin is not None:
            self._load_heads(lin)
        elif random_backbone:
            for h in self.heads:  # lpips heads are non-negative: keep the distance a (weighted) norm
                nn.init.uniform_(h.weight, 0.0, 0.1)
        else:
            raise ValueError(
                "loss.perceptual.lin_weights is not set and torchmetrics' bundled lpips vgg.pth was not found; "
                "point loss.perceptual.lin_weights= at an lpips-layout vgg.pth (lin0.model.1.weight ...)"
            )
        self.requires_grad_(False)
        self.eval()

    def _load_backbone(self, path: str | os.PathLike) -> None:
        sd = load_weights_file(path, "loss.perceptual.weights")
        found: dict[str, Tensor] = {}
        for k, v in sd.items():
            m = _FEATURE_KEY.search(k) or _SLICE_KEY.search(k)
            if m:
                found[f"{m.group(1)}.{m.group(2)}"] = v
        expected = self.features.state_dict()
        missing = sorted(set(expected) - set(found), key=lambda s: int(s.split(".")[0]))
        if missing:
            raise ValueError(
                f"loss.perceptual.weights={str(path)!r} is not a VGG16 state dict: missing "
                f"features.{missing[0]} (expected torchvision's vgg16 layout features.N.weight/bias)"
            )
        for k, v in expected.items():
            if found[k].shape != v.shape:
                raise ValueError(
                    f"loss.perceptual.weights={str(path)!r}: features.{k} has shape {tuple(found[k].shape)}, "
                    f"VGG16 needs {tuple(v.shape)}"
                )
        self.features.load_state_dict({k: found[k] for k in expected})

    def _load_heads(self, path: str | os.PathLike) -> None:
        sd = load_weights_file(path, "loss.perceptual.lin_weights")
        heads: dict[int, Tensor] = {}
        for k, v in sd.items():
            m = _LIN_KEY.match(k)
            if m:
                heads[int(m.group(1))] = v
        for i, (head, c) in enumerate(zip(self.heads, TAP_CHANNELS, strict=True)):
            if i not in heads or heads[i].numel() != c:
                raise ValueError(
                    f"loss.perceptual.lin_weights={str(path)!r}: needs lin{i}.model.1.weight with {c} values "
                    "(the lpips vgg.pth layout)"
                )
            head.weight.data.copy_(heads[i].reshape(1, c, 1, 1))

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # dropout-free and frozen: never switch to train mode

    def _taps(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
                if i == TAPS[-1]:
                    break
        return out

    def _unit(self, f: Tensor) -> Tensor:
        # sqrt(sum f² + eps²) instead of lpips' sqrt(sum f²) + eps: the same value where it matters, and a
        # finite gradient at an all-zero feature vector (users traced NaN losses to lpips' normalisation line).
        return f * torch.rsqrt((f * f).sum(dim=1, keepdim=True) + self.eps**2)

    def _features(self, x: Tensor) -> list[Tensor]:
        x = (x.float() - self.shift) / self.scale
        if x.requires_grad:
            return self._taps(x)
        with torch.no_grad():  # the real image needs no graph: the backward runs through one VGG, not two
            return self._taps(x)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            total = x.new_zeros(x.shape[0], dtype=torch.float32)
            for a, b, head in zip(self._features(x), self._features(y), self.heads, strict=True):
                total = total + head((self._unit(a) - self._unit(b)) ** 2).mean(dim=(1, 2, 3))
        return total
