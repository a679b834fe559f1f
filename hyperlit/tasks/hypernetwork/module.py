"""LightningModule that trains a hypernetwork on a frozen Stable Diffusion UNet.

The frozen parts live in a plain :class:`SDComponents` object, not as sub-modules: they never reach the optimizer,
the Lightning checkpoint or DDP's gradient buckets, and the checkpoint holds only the hypernetwork.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from hyperlit.attention import attach_hypernetworks, detach_hypernetworks
from hyperlit.callbacks.lr_range import CHECKPOINT_KEY as LR_AUTO_KEY
from hyperlit.hypernetwork import Hypernetwork
from hyperlit.lr_schedule import base_learning_rate, build_scheduler
from hyperlit.models.components import Conditioning, TextEmbedding
from hyperlit.speed import (
    FirstCallTimer,
    compile_unet,
    enable_gradient_checkpointing,
    use_channels_last,
    warn_compile_on_cpu,
)

PREDICTION_TYPES = ("epsilon", "v_prediction")


def min_snr_weights(alphas_cumprod: Tensor, timesteps: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε targets, min(SNR, γ)/(SNR+1) for v."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


class HypernetworkTask(L.LightningModule):
    def __init__(
        self,
        hypernetwork: Hypernetwork,
        components: Any,
        optimizer: Callable[..., torch.optim.Optimizer],
        learning_rate: float | str = 1e-5,
        lr_scheduler: str = "constant",
        lr_warmup_steps: int = 0,
        max_steps: int = 1000,
        min_snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        min_timestep: int = 0,
        max_timestep: int | None = None,
        prediction_type: str | None = None,
        initial_step: int = 0,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        lr_auto: dict | None = None,
    ) -> None:
        super().__init__()
        self.hypernetwork = hypernetwork
        self.components = components  # plain object: frozen modules stay unregistered on purpose
        self.optimizer_factory = optimizer
        self.learning_rate = learning_rate
        self.lr_scheduler_name = lr_scheduler
        self.lr_warmup_steps = lr_warmup_steps
        self.max_steps = max_steps
        self.min_snr_gamma = min_snr_gamma
        self.noise_offset = noise_offset
        self.prediction_type = prediction_type or components.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"train.prediction_type: {self.prediction_type!r} is not supported; "
                f"allowed: {', '.join(PREDICTION_TYPES)}"
            )
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"train.min_snr_gamma: {min_snr_gamma} is not allowed; use null or a number > 0")
        if noise_offset < 0:
            raise ValueError(f"train.noise_offset: {noise_offset} is not allowed; use 0 or more")
        self.min_timestep = min_timestep
        self.max_timestep = max_timestep  # None: the noise schedule's length
        if min_timestep < 0 or (max_timestep is not None and max_timestep <= min_timestep):
            raise ValueError(
                f"train.min_timestep: {min_timestep}, train.max_timestep: {max_timestep} are not allowed; "
                "use 0 <= min_timestep < max_timestep (null: the schedule's length)"
            )
        # Steps already in an init_from file; A1111 metadata counts from there.
        self.initial_step = initial_step
        self.gradient_checkpointing = gradient_checkpointing
        self.use_compile = compile
        self._compile_timer = FirstCallTimer("training step (forward, backward, optimizer)") if compile else None
        self._last_batch_time: float | None = None
        # learning_rate=auto: the range test that chose the rate (callbacks/lr_range.py), kept in every checkpoint
        self.lr_auto = lr_auto

    # --- set-up ---

    def on_fit_start(self) -> None:
        self.components.to(self.device)
        unet = self.components.unet
        use_channels_last(unet, self.device)
        attach_hypernetworks(unet, [self.hypernetwork])
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(unet)
        if self.use_compile:
            if self.global_rank == 0:  # every rank compiles, one says so
                warn_compile_on_cpu(self.device)
            compile_unet(unet)

    def on_fit_end(self) -> None:
        detach_hypernetworks(self.components.unet)
        if self.gradient_checkpointing:
            self.components.unet.disable_gradient_checkpointing()

    # torch.compile compiles lazily, in the first step: time that step once and log it.
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._compile_timer is not None:
            self._compile_timer.__enter__()

    def configure_optimizers(self) -> dict:
        lr = base_learning_rate(self.learning_rate, self.max_steps)
        optimizer = self.optimizer_factory(params=self.hypernetwork.parameters(), lr=lr)
        scheduler = build_scheduler(
            optimizer, self.learning_rate, self.lr_scheduler_name, self.lr_warmup_steps, self.max_steps
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- the objective ---

    def condition_for(self, batch: dict) -> Conditioning:
        """The UNet conditioning of a batch, through the one family-neutral call: precomputed context (+ pooled) or
        the captions, and the per-sample sizes (SDXL's time_ids; other families ignore them)."""
        text = TextEmbedding(batch["context"], batch.get("pooled")) if "context" in batch else None
        captions = None if text is not None else list(batch["caption"])
        cond = self.components.condition(captions, batch.get("sizes"), text=text)
        return cond.to(self.device, self.components.unet.dtype)

    def context_for(self, batch: dict) -> Tensor:
        return self.condition_for(batch).context

    def loss_at(
        self,
        latents: Tensor,
        noise: Tensor,
        timesteps: Tensor,
        cond: Conditioning | Tensor,
        weight: Tensor | None = None,
    ) -> Tensor:
        """Per-sample MSE of the UNet's prediction to the target (eps or v) at the given noise and timesteps.
        `cond`: from `components.condition` (a bare context tensor is enough for SD1/SD2)."""
        scheduler = self.components.noise_scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise if self.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        unet = self.components.unet
        cond = (cond if isinstance(cond, Conditioning) else Conditioning(cond)).to(latents.device, unet.dtype)
        prediction = unet(noisy.to(unet.dtype), timesteps, cond.context, **cond.unet_kwargs).sample.float()
        error = F.mse_loss(prediction, target, reduction="none")
        if weight is not None:
            error = error * weight
        return error.mean(dim=(1, 2, 3))

    def compute_loss(self, batch: dict, generator: torch.Generator | None = None) -> Tensor:
        """Per-sample diffusion loss: noise a latent at a uniform timestep in [min_timestep, max_timestep), MSE of the
        UNet's prediction."""
        latents = batch["latents"].float()
        cond = self.condition_for(batch)
        scheduler = self.components.noise_scheduler
        batch_size = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        if self.noise_offset:
            # A per-sample, per-channel constant lets the model learn overall brightness (Guttenberg 2023).
            offset = torch.randn((batch_size, latents.shape[1], 1, 1), generator=generator, device=latents.device)
            noise = noise + self.noise_offset * offset
        high = scheduler.config.num_train_timesteps if self.max_timestep is None else self.max_timestep
        timesteps = torch.randint(self.min_timestep, high, (batch_size,), generator=generator, device=latents.device)
        per_sample = self.loss_at(latents, noise, timesteps, cond, batch.get("weight"))
        if self.min_snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(
                scheduler.alphas_cumprod, timesteps, self.min_snr_gamma, self.prediction_type
            )
        return per_sample

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch).mean()
        batch_size = batch["latents"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        now = time.perf_counter()
        if self._last_batch_time is not None:
            samples_per_s = batch_size * self.trainer.world_size / max(now - self._last_batch_time, 1e-9)
            self.log("train/samples_per_s", samples_per_s, prog_bar=True, batch_size=batch_size)
        self._last_batch_time = now
        # read before the optimizer step: Lightning steps the schedule before on_train_batch_end, where this would
        # already be the next step's rate (an A1111 schedule's drop would then show one step early)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/lr", lr, prog_bar=True, batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._compile_timer is not None:
            self._compile_timer.__exit__(None, None, None)
        self.hypernetwork.step = self.initial_step + self.global_step

    # The noise, timesteps and dropout masks come from the global torch RNG; keeping its state in the checkpoint
    # makes a resumed run draw exactly what the uninterrupted run would have drawn.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hyperlit_rng"] = {"cpu": torch.get_rng_state()}
        if self.lr_auto is not None:
            checkpoint[LR_AUTO_KEY] = self.lr_auto
        if torch.cuda.is_available() and self.device.type == "cuda":
            checkpoint["hyperlit_rng"]["cuda"] = torch.cuda.get_rng_state(self.device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_to_restore = checkpoint.get("hyperlit_rng")

    def on_train_start(self) -> None:
        # Restored here, after Lightning's own set-up, which may draw random numbers after loading the checkpoint.
        state = getattr(self, "_rng_to_restore", None)
        if state:
            torch.set_rng_state(state["cpu"])
            if "cuda" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda"], self.device)
            self._rng_to_restore = None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.hypernetwork.parameters() if p.grad is not None]
        if grads:
            # On the device: Lightning's grad_norm builds the total from a host list, one GPU sync per parameter.
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads, norm_type=2.0))
