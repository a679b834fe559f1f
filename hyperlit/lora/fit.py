"""Least-squares fit of a hypernetwork's K/V modules by linear maps, as a low-rank change of to_k / to_v.

A1111 computes ``K = W_k (x + m f_k(x))`` and ``V = W_v (x + m f_v(x))``. Fitting ``f(x) ≈ A x + c`` over the
layer's real inputs gives ``K ≈ (W_k + m W_k A_k) x + m W_k c_k``:

- the constant of K shifts every key of a query by the same vector, which adds the same number to all of that
  query's scores: the softmax cancels it, so it is fitted (freeing A from approximating it) and dropped;
- the constant of V adds ``W_v c_v`` to every value, and since each query's weights sum to 1, to every attention
  output: after to_out it is a bias change ``W_o W_v c_v``. When the file cannot carry it (``v_bias`` false), V is
  fitted without a constant so that A absorbs what of it the inputs allow. On SD1/SD2 that is all of it: every
  input leaves a LayerNorm (norm1 before attn1, CLIP's final norm for the text), so ``sum((x - beta) / gamma) = 0``
  and a constant is a linear function of x on every input the model produces (tests/test_lora.py: exact for a
  linear network). SDXL's text context skips the final norm, so there the constant is only approximated.

``ΔW = m W A`` is then truncated to rank r where it matters on the inputs: the rank-r L minimising
``||(ΔW - L) X||`` is ``U_r U_rᵀ ΔW`` with U_r the top eigenvectors of ``ΔW C ΔWᵀ`` (C the inputs' covariance),
which is also where the energy kept is measured. m is 1 here: a LoRA's strength s then plays the multiplier s
(both scale the change linearly). Everything is computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor

from hyperlit.lora.inputs import TEXT, LayerInputs

__all__ = ["DEFAULT_ENERGY", "FitSettings", "LayerFit", "LayerReport", "ProjectionLoRA", "fit_layer", "stream_of"]

BAD_FIT = 0.25  # a held-out effect error above this is reported as a bad fit
# The default share of each change's energy kept: on the demo (docs/benchmarks.md, 512 samples) 0.999 keeps the style
# within 0.05 of the hypernetwork's (-0.041; 0.99: -0.057) at a third of its file size.
DEFAULT_ENERGY = 0.999


@dataclass(frozen=True)
class FitSettings:
    """How ranks are chosen and whether V's constant is kept (as a to_out bias)."""

    rank: int | None = None  # a fixed rank per projection (capped at the layer's full rank)
    energy: float | None = DEFAULT_ENERGY  # else the least rank keeping this share of the change's energy
    v_bias: bool = False


@dataclass(frozen=True)
class ProjectionLoRA:
    """``ΔW ≈ up @ down`` for one projection (to_k or to_v); float64."""

    up: Tensor  # out × r
    down: Tensor  # r × in

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def delta(self) -> Tensor:
        return self.up @ self.down


@dataclass(frozen=True)
class LayerReport:
    """Per layer: ranks, energy kept and relative errors on held-out inputs (of the output, and of the change)."""

    name: str
    kind: str  # "self" | "cross"
    width: int
    full_rank: int
    rank_k: int
    rank_v: int
    energy_k: float
    energy_v: float
    error_k: float  # ||K_lora - K_hn|| / ||K_hn||, keys centred (a shared shift is cancelled by the softmax)
    error_v: float
    effect_error_k: float  # the same error over the size of the hypernetwork's change of K
    effect_error_v: float

    @property
    def fits_badly(self) -> bool:
        return max(self.effect_error_k, self.effect_error_v) > BAD_FIT


@dataclass(frozen=True)
class LayerFit:
    """The LoRA of one attention layer: to_k, to_v (None when rank 0) and the to_out.0 bias change (or None)."""

    name: str
    k: ProjectionLoRA | None
    v: ProjectionLoRA | None
    out_bias: Tensor | None
    report: LayerReport
    to_out_in: int  # in_features of to_out.0 (the attention's inner width)


def stream_of(name: str, attn: Attention) -> str:
    """Which input stream a layer reads: the shared text context, or its own hidden states."""
    return TEXT if attn.is_cross_attention else name


@dataclass(frozen=True)
class _Linear:
    a: Tensor  # d × d: f(x) ≈ a x + c
    c: Tensor  # d


def _solve(uu: Tensor, uf: Tensor, intercept: bool) -> _Linear:
    d = uf.shape[1]
    if intercept:
        beta = torch.linalg.lstsq(uu.cpu(), uf.cpu(), driver="gelsd").solution
        return _Linear(beta[:d].T.contiguous(), beta[d].clone())
    beta = torch.linalg.lstsq(uu[:d, :d].cpu(), uf[:d].cpu(), driver="gelsd").solution
    return _Linear(beta.T.contiguous(), torch.zeros(d, dtype=torch.float64))


def _choose_rank(eigenvalues: Tensor, full: int, settings: FitSettings) -> int:
    total = float(eigenvalues.clamp(min=0).sum())
    if total <= 0:
        return 0
    if settings.rank is not None:
        return min(settings.rank, full)
    assert settings.energy is not None
    if settings.energy >= 1:
        return full
    kept = torch.cumsum(eigenvalues.clamp(min=0), 0) / total
    return min(int((kept < settings.energy).sum()) + 1, full)


def _truncate(delta: Tensor, cov: Tensor, settings: FitSettings) -> tuple[ProjectionLoRA | None, float]:
    """(the rank-r LoRA of `delta` best on inputs of covariance `cov`, energy kept)."""
    full = min(delta.shape)
    g = delta @ cov @ delta.T
    eigenvalues, vectors = torch.linalg.eigh((g + g.T) / 2)
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
    r = _choose_rank(eigenvalues, full, settings)
    if r == 0:
        return None, 1.0
    total = float(eigenvalues.clamp(min=0).sum())
    energy = float(eigenvalues[:r].clamp(min=0).sum()) / total
    up = vectors[:, :r].contiguous()
    return ProjectionLoRA(up, up.T @ delta), min(energy, 1.0)


def _relative(error: Tensor, reference: Tensor) -> float:
    norm = float(reference.norm())
    return float(error.norm()) / norm if norm > 0 else 0.0


def fit_layer(name: str, attn: Attention, inputs: LayerInputs, settings: FitSettings) -> LayerFit:
    """Fit one attention layer from its input stream, and measure the result on the stream's held-out rows."""
    train = inputs.train
    d = inputs.width
    w_k = attn.to_k.weight.detach().double().cpu()
    w_v = attn.to_v.weight.detach().double().cpu()
    mean = (train.uu[:d, d] / train.rows).cpu()
    second = (train.uu[:d, :d] / train.rows).cpu()
    centred = second - torch.outer(mean, mean)

    fit_k = _solve(train.uu, train.uk, intercept=True)
    fit_v = _solve(train.uu, train.uv, intercept=settings.v_bias)
    delta_k, delta_v = w_k @ fit_k.a, w_v @ fit_v.a
    lora_k, energy_k = _truncate(delta_k, centred, settings)
    lora_v, energy_v = _truncate(delta_v, centred if settings.v_bias else second, settings)
    approx_k = lora_k.delta() if lora_k is not None else torch.zeros_like(delta_k)
    approx_v = lora_v.delta() if lora_v is not None else torch.zeros_like(delta_v)

    out_bias = None
    value_shift = torch.zeros(w_v.shape[0], dtype=torch.float64)
    if settings.v_bias:
        # The constant of V plus what truncation lost at the mean input: both reach every output row alike.
        value_shift = w_v @ fit_v.c + (delta_v - approx_v) @ mean
        out_bias = attn.to_out[0].weight.detach().double().cpu() @ value_shift

    x, fk, fv = (t.double() for t in inputs.held_out.tensors())
    change_k, change_v = fk @ w_k.T, fv @ w_v.T
    error_k = change_k - x @ approx_k.T
    error_k = error_k - error_k.mean(0)
    error_v = change_v - (x @ approx_v.T + value_shift)
    keys = (x + fk) @ w_k.T
    report = LayerReport(
        name=name,
        kind="cross" if attn.is_cross_attention else "self",
        width=d,
        full_rank=min(delta_k.shape),
        rank_k=lora_k.rank if lora_k is not None else 0,
        rank_v=lora_v.rank if lora_v is not None else 0,
        energy_k=energy_k,
        energy_v=energy_v,
        error_k=_relative(error_k, keys - keys.mean(0)),
        error_v=_relative(error_v, (x + fv) @ w_v.T),
        effect_error_k=_relative(error_k, change_k - change_k.mean(0)),
        effect_error_v=_relative(error_v, change_v),
    )
    return LayerFit(name, lora_k, lora_v, out_bias, report, attn.to_out[0].in_features)
