"""Reference formulations of the VAE task's losses, computed the slow, obvious way (LDM's), for tests only."""

from __future__ import annotations

import torch
from torch import Tensor

from hyperlit.tasks.vae.module import VAEDecoderTask


def adaptive_weight(
    rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4, eps: float = 1e-4
) -> tuple[Tensor, Tensor, Tensor]:
    """``‖∇_W rec‖ / (‖∇_W gan‖ + eps)`` at the decoder's last layer W, clamped to [0, max_weight], detached.

    Returns (weight, rec_grad_norm, gan_grad_norm), all fp32 scalars; the graph is retained.
    """
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    n_rec = torch.linalg.vector_norm(g_rec.float())
    n_gan = torch.linalg.vector_norm(g_gan.float())
    weight = (n_rec / (n_gan + eps)).clamp(0.0, max_weight)
    return weight.detach(), n_rec.detach(), n_gan.detach()


def generator_loss(task: VAEDecoderTask, x: Tensor, x_hat: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The total generator loss with the adaptive weight by autograd through the decoder (LDM's way)."""
    nll, g, factor, logs = task.generator_terms(x, x_hat)
    total = nll
    if g is not None:
        d = task.config.disc
        if d.adaptive:
            w, n_rec, n_g = adaptive_weight(nll, g, task.last_layer, d.max_adaptive_weight)
            logs["grad_norm_rec"], logs["grad_norm_gan"] = n_rec, n_g
            d_weight = w * d.weight
        else:
            d_weight = torch.tensor(d.weight, device=x.device)
        logs["d_weight"] = d_weight
        total = nll + factor * d_weight * g
    logs["total"] = total.detach()
    return total, logs
