"""TAESD distillation: a tiny encoder and decoder (diffusers ``AutoencoderTiny``) learn to copy a frozen VAE.

Latents live in the UNet's scale, ``z = (vae_latent - shift_factor) * scaling_factor`` (TAESD's convention).
Encoder target: the frozen encoder's posterior mean in that scale (MSE; a sample has the same minimiser and more
noise). Decoder target: the frozen decoder's image from the same z (a posterior sample when ``posterior.sample``,
the inputs the UNet hands a decoder), with reconstruction + LPIPS + a PatchGAN term whose D sees the latents beside
the image (TAESD trains its decoder as a GAN conditioned on the latents). Manual optimization: one generator update
of both halves, then the D update on the detached output; the module's own ``step`` drives D start and ramp.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from hyperlit.lr_schedule import build_scheduler
from hyperlit.tasks.taesd.scenes import scene_batch
from hyperlit.vae.discriminator import PatchDiscriminator
from hyperlit.vae.frozen import cached_posterior, frozen, weights_checksum
from hyperlit.vae.losses import adversarial_factor, discriminator_loss, generator_loss, reconstruction_loss
from hyperlit.vae.lpips import LPIPS
from hyperlit.vae.panels import image_panel, log_image_panel
from hyperlit.vae.taesd_config import TAESDTaskConfig
from hyperlit.vae.taesd_layout import tiny_autoencoder

log = logging.getLogger(__name__)

TRAINABLE_PREFIXES = ("taesd.", "disc.")


def teacher_checksum(vae: nn.Module) -> str:
    """sha256 over every weight of the frozen VAE (encoder and decoder are both teachers here)."""
    return weights_checksum(vae)


class TAESDTask(pl.LightningModule):
    def __init__(
        self,
        vae: AutoencoderKL,
        config: TAESDTaskConfig | None = None,
        perceptual: LPIPS | None = None,
        perceptual_is_random: bool = False,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        seed: int = 0,
        student: AutoencoderTiny | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable parts
        self.config = cfg = config or TAESDTaskConfig()
        self.optimizer_factory = optimizer or functools.partial(torch.optim.Adam, lr=3e-4, betas=(0.9, 0.9))
        if cfg.taesd.train_decoder and cfg.loss.perceptual.weight > 0 and perceptual is None:
            raise ValueError(
                f"loss.perceptual.weight={cfg.loss.perceptual.weight} needs an LPIPS model; set "
                "loss.perceptual.weights=/path/to/vgg16.pth or loss.perceptual.weight=0"
            )
        self.vae = vae.float().requires_grad_(False).eval()
        self.teacher_checksum = teacher_checksum(self.vae)
        self.latent_channels = int(vae.config.latent_channels)
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.taesd = student if student is not None else tiny_autoencoder(self.latent_channels)
        self.taesd.float().requires_grad_(False)
        for half in self.trained_halves():
            half.requires_grad_(True)
        d = cfg.disc
        in_channels = 3 + (self.latent_channels if d.conditional else 0)
        use_disc = d.enabled and cfg.taesd.train_decoder
        self.disc = PatchDiscriminator(in_channels, d.ndf, d.n_layers, d.norm) if use_disc else None
        self.lpips = perceptual if cfg.taesd.train_decoder else None
        self.perceptual_is_random = perceptual_is_random
        self.seed = seed
        self.step = 0  # generator updates done
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.diverged: str | None = None
        self.ema_should_update = False
        self.posterior_cache: dict[int, tuple[Tensor, Tensor]] = {}
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_psnr_input = PeakSignalNoiseRatio(data_range=1.0)
        self.val_lpips = MeanMetric()
        self.val_encoder_mse = MeanMetric()
        self.val_decoder_mse = MeanMetric()
        self._panel: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ parts
    def trained_halves(self) -> list[nn.Module]:
        t = self.config.taesd
        return [m for m, on in ((self.taesd.encoder, t.train_encoder), (self.taesd.decoder, t.train_decoder)) if on]

    def ema_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if name.startswith("taesd.") and p.requires_grad:
                yield name, p

    @property
    def last_layer(self) -> nn.Conv2d:
        return self.taesd.decoder.layers[-1]

    def adv_factor(self) -> float:
        d = self.config.disc
        if self.disc is None:
            return 0.0
        return adversarial_factor(self.step, d.start, d.warmup_steps, d.ramp_steps, d.ramp)

    # ------------------------------------------------------------------ the teacher
    @torch.no_grad()
    def posterior(self, pixels: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of the frozen encoder in fp32; with ``index`` and posterior.cache, each image once."""
        return cached_posterior(self.vae, self.posterior_cache, pixels, index, self.config.posterior.cache)

    def to_unet_scale(self, latent: Tensor) -> Tensor:
        return (latent - self.shift) * self.scaling

    def draw_seed(self) -> int:
        """(seed, step, rank): every draw repeats on resume, and DDP ranks draw differently."""
        return self.seed * 1_000_003 + self.step * 131 + self.global_rank  # global_rank: 0 outside a Trainer

    def sample_latents(self, mean: Tensor, logvar: Tensor) -> Tensor:
        """A posterior sample in the UNet's scale; the noise comes from (seed, step), so a resumed run draws the
        same noise as an uninterrupted one whatever else used the process RNG."""
        if not self.config.posterior.sample:
            return self.to_unet_scale(mean)
        g = torch.Generator(device="cpu").manual_seed(self.draw_seed())
        noise = torch.randn(mean.shape, generator=g).to(mean.device)
        return self.to_unet_scale(mean + torch.exp(0.5 * logvar) * noise)

    def with_scenes(self, pixels: Tensor) -> Tensor:
        """``taesd.extra_scenes``: that many procedural scenes of the tiny base's domain appended to the batch, new
        ones every step, drawn from (seed, step, rank) so a resumed run sees the same scenes."""
        count = self.config.taesd.extra_scenes
        if not count:
            return pixels
        t = self.config.taesd
        scenes = scene_batch(count, *pixels.shape[-2:], self.draw_seed() + 900_007, t.scene_sample_look)
        return torch.cat([pixels, scenes.to(device=pixels.device, dtype=pixels.dtype)])

    def augment(self, pixels: Tensor) -> Tensor:
        """``taesd.augment``: each image flipped / turned by quarter turns and its RGB channels permuted, drawn from
        (seed, step) like the noise, so a resumed run sees the same images as an uninterrupted one."""
        if not self.config.taesd.augment:
            return pixels
        g = torch.Generator(device="cpu").manual_seed(self.draw_seed() + 700_001)
        square = pixels.shape[-1] == pixels.shape[-2]
        out = []
        for image in pixels:
            turns = int(torch.randint(0, 4 if square else 2, (1,), generator=g)) * (1 if square else 2)
            image = torch.rot90(image, turns, dims=(-2, -1))
            if int(torch.randint(0, 2, (1,), generator=g)):
                image = image.flip(-1)
            out.append(image[torch.randperm(3, generator=g).to(image.device)])
        return torch.stack(out)

    def crop_window(self, pixels: list[Tensor | None], latents: list[Tensor]) -> tuple[list, list]:
        """The same random window of ``taesd.latent_crop`` latent cells of every tensor (pixels: the window's pixels),
        drawn from (seed, step) like the noise, so a resumed run crops as an uninterrupted one."""
        c = self.config.taesd.latent_crop
        h, w = latents[0].shape[-2:]
        if c is None or (c >= h and c >= w):
            return pixels, latents
        g = torch.Generator(device="cpu").manual_seed(self.draw_seed() + 500_009)
        top = int(torch.randint(0, max(1, h - c + 1), (1,), generator=g))
        left = int(torch.randint(0, max(1, w - c + 1), (1,), generator=g))
        f = next(p for p in pixels if p is not None).shape[-1] // w  # pixels per latent cell
        cropped = [None if p is None else p[..., top * f : (top + c) * f, left * f : (left + c) * f] for p in pixels]
        return cropped, [t[..., top : top + c, left : left + c] for t in latents]

    @torch.no_grad()
    def teacher_decode(self, z: Tensor) -> Tensor:
        """The frozen decoder's image of UNet-scale latents ``z``, in [-1, 1] (fp32, no autocast)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.vae.decode(z.float() / self.scaling + self.shift).sample.clamp(-1.0, 1.0)

    # ------------------------------------------------------------------ losses
    def disc_input(self, image: Tensor, z: Tensor) -> Tensor:
        if not self.config.disc.conditional:
            return image
        # the latents beside the image (nearest upsampling, /3 to the image's range): D judges "is this the
        # image of these latents", not just "is this an image"
        return torch.cat([image, F.interpolate(z.float(), size=image.shape[-2:], mode="nearest") / 3.0], dim=1)

    def _keep_last_input(self, _m: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        self._last_input = inputs[0]

    def student_decode(self, z: Tensor) -> Tensor:
        """The tiny decoder's image in [-1, 1]; the input of its last conv is kept for the adaptive weight."""
        handle = self.last_layer.register_forward_hook(self._keep_last_input)
        try:
            return self.taesd.decode(z).sample
        finally:
            handle.remove()

    def _last_layer_grad(self, grad_image: Tensor) -> Tensor:
        """d(loss)/d(last conv weight) from d(loss)/d(image): DecoderTiny returns 2 * conv_out - 1."""
        conv = self.last_layer
        return torch.nn.grad.conv2d_weight(
            self._last_input.detach().float(), conv.weight.shape, 2.0 * grad_image.detach().float(),
            conv.stride, conv.padding, conv.dilation, conv.groups,
        )  # fmt: skip

    def decoder_output_grad(self, target: Tensor, x_hat: Tensor, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Gradient of the decoder's loss (reconstruction + LPIPS + adaptive GAN term) with respect to ``x_hat``.

        LDM's adaptive weight ``||grad_W nll|| / (||grad_W g|| + 1e-4)`` at the decoder's last conv, computed from
        the image gradients, so LPIPS and D are backpropagated once each (as in the VAE-decoder task)."""
        cfg = self.config
        xf = x_hat.float()
        rec = reconstruction_loss(target, xf, cfg.loss.reconstruction)
        nll = cfg.loss.reconstruction_weight * rec
        logs: dict[str, Tensor] = {"rec": rec.detach()}
        if self.lpips is not None and cfg.loss.perceptual.weight > 0:
            p = self.lpips(target, xf).mean()
            nll = nll + cfg.loss.perceptual.weight * p
            logs["lpips"] = p.detach()
        grad = torch.autograd.grad(nll, xf, retain_graph=True)[0]
        total = nll.detach()
        factor = self.adv_factor()
        logs["adv_factor"] = torch.tensor(factor)
        if factor > 0:
            with frozen(self.disc):
                g = generator_loss(self.disc(self.disc_input(xf, z)), cfg.disc.loss)
            g_grad = torch.autograd.grad(g, xf)[0]
            d = cfg.disc
            if d.adaptive:
                n_rec = torch.linalg.vector_norm(self._last_layer_grad(grad))
                n_gan = torch.linalg.vector_norm(self._last_layer_grad(g_grad))
                d_weight = (n_rec / (n_gan + 1e-4)).clamp(0.0, d.max_adaptive_weight) * d.weight
            else:
                d_weight = torch.tensor(d.weight, device=xf.device)
            grad = grad + factor * d_weight * g_grad
            total = total + factor * d_weight * g.detach()
            logs["g_loss"], logs["d_weight"] = g.detach(), d_weight.detach()
        logs["decoder_total"] = total
        return grad, logs

    def disc_loss(self, target: Tensor, x_hat: Tensor, z: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """D on the teacher's image (real) and the student's (fake), both detached: nothing reaches the student."""
        logits_real = self.disc(self.disc_input(target.detach(), z.detach()))
        logits_fake = self.disc(self.disc_input(x_hat.detach().float(), z.detach()))
        loss = discriminator_loss(logits_real, logits_fake, self.config.disc.loss)
        acc = 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean())
        return loss, {"d_loss": loss.detach(), "d_acc": acc}

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[LRScheduler]]:
        """G's optimizer with its schedule (stepped per generator update; Lightning checkpoints its state), and D's
        at a constant rate: D is a critic that must keep up with whatever G draws, to the last step."""
        o = self.config.optimizer
        g_params = [p for half in self.trained_halves() for p in half.parameters()]
        opt_g = self.optimizer_factory(g_params)
        opts = [opt_g]
        if self.disc is not None:
            opts.append(self.optimizer_factory(self.disc.parameters(), **({"lr": o.disc_lr} if o.disc_lr else {})))
        lr = opt_g.param_groups[0]["lr"]
        schedule = build_scheduler(opt_g, lr, o.lr_scheduler, o.lr_warmup_steps, self.config.max_steps)
        return opts, [schedule]

    def _opts(self) -> tuple[Any, Any | None]:
        opts = self.optimizers()
        if isinstance(opts, list | tuple):
            return opts[0], (opts[1] if len(opts) > 1 else None)
        return opts, None

    def _schedule(self) -> LRScheduler | None:
        schedules = self.lr_schedulers()
        if isinstance(schedules, list):
            return schedules[0] if schedules else None
        return schedules

    def _update(self, opt: Any, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        clip = self.config.optimizer.grad_clip
        if clip:
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt.step()

    def _bad_step(self, what: str, value: Tensor) -> None:
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        log.warning("step %d: %s is %s; update skipped (%d in a row)", self.step, what, value.item(), self.bad_in_a_row)
        if self.bad_in_a_row >= self.config.max_bad_steps:
            self.diverged = (
                f"{self.bad_in_a_row} consecutive steps with a NaN/inf loss (max_bad_steps="
                f"{self.config.max_bad_steps}) at step {self.step}"
            )
            log.error("training stopped: %s", self.diverged)
            self.trainer.should_stop = True

    def generator_losses(self, x: Tensor, mean: Tensor, z: Tensor) -> tuple[Tensor, dict[str, Tensor], Any]:
        """(the surrogate whose backward is the generator gradient, logs, (target, x_hat, z) for D or None).

        The teacher decodes the whole latent image; the student then sees one ``taesd.latent_crop`` window."""
        cfg = self.config
        target = self.teacher_decode(z) if cfg.taesd.train_decoder else None
        (x, target), (mean, z) = self.crop_window([x, target], [mean, z])
        surrogate = torch.zeros((), device=x.device)
        total = torch.zeros((), device=x.device)
        logs: dict[str, Tensor] = {}
        if cfg.taesd.train_encoder:
            z_hat = self.taesd.encode(x).latents.float()
            enc = F.mse_loss(z_hat, self.to_unet_scale(mean))
            surrogate = surrogate + cfg.taesd.encoder_weight * enc
            total = total + cfg.taesd.encoder_weight * enc.detach()
            logs["encoder_mse"] = enc.detach()
        pair = None
        if target is not None:
            x_hat = self.student_decode(z)
            grad, dlogs = self.decoder_output_grad(target, x_hat, z)
            logs.update(dlogs)
            # <x_hat, dL/dx_hat> carries the decoder loss's gradient to every tiny-decoder weight
            surrogate = surrogate + (x_hat.float() * grad).sum()
            total = total + dlogs["decoder_total"]
            pair = (target, x_hat, z)
        logs["total"] = total
        return surrogate, logs, pair

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self.ema_should_update = False
        if self.step >= self.config.max_steps:
            self.trainer.should_stop = True
            return
        opt_g, opt_d = self._opts()
        x = self.augment(self.with_scenes(batch["pixels"]))
        mean, logvar = self.posterior(x, batch.get("index"))
        z = self.sample_latents(mean, logvar)
        surrogate, logs, pair = self.generator_losses(x, mean, z)
        if not torch.isfinite(logs["total"]):
            self._bad_step("the generator loss", logs["total"])
            return
        d_total = None
        if self.disc is not None and pair is not None and self.step >= self.config.disc.start:
            d_total, d_logs = self.disc_loss(*pair)
            logs.update(d_logs)
            if not torch.isfinite(d_total):
                self._bad_step("the discriminator loss", d_total)
                return
        self._update(opt_g, surrogate)
        schedule = self._schedule()
        if schedule is not None:
            logs["lr"] = torch.tensor(schedule.get_last_lr()[0])  # the rate this update used
            schedule.step()  # manual optimization: Lightning steps no schedule itself
        if d_total is not None:
            self._update(opt_d, d_total)
        self.bad_in_a_row = 0
        self.ema_should_update = True
        self.step += 1
        if self.step >= self.config.max_steps:
            self.trainer.should_stop = True
        bs = x.shape[0]
        self.log_dict({f"train/{k}": v.float() for k, v in logs.items()}, on_step=True, batch_size=bs)
        self.log("train/step", float(self.step), on_step=True, batch_size=bs)
        # what the runner returns to sweeps when no validation ran (optimized_metric val/loss falls back to it)
        self.log("train/loss", logs["total"].float(), on_step=True, batch_size=bs)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        """At fixed images, on the posterior mode: the tiny decoder against the frozen decoder's image (what it
        copies) and against the input, and the tiny encoder's latent error."""
        x = batch["pixels"]
        mean, _ = self.posterior(x)
        z = self.to_unet_scale(mean)
        bs = x.shape[0]
        loss = torch.zeros((), device=x.device)
        if self.config.taesd.train_encoder:
            enc = F.mse_loss(self.taesd.encode(x).latents.float(), z)
            self.val_encoder_mse.update(enc)
            self.log("val/encoder_mse", self.val_encoder_mse, batch_size=bs)
            loss = loss + enc
        if self.config.taesd.train_decoder:
            target = self.teacher_decode(z)
            x_hat = self.taesd.decode(z).sample.float().clamp(-1.0, 1.0)
            a, b = (target + 1) / 2, (x_hat + 1) / 2
            self.val_psnr.update(b, a)
            self.val_ssim.update(b, a)
            self.val_psnr_input.update(b, (x.clamp(-1, 1) + 1) / 2)
            dec = F.mse_loss(x_hat, target)
            self.val_decoder_mse.update(dec)
            loss = loss + dec
            self.log("val/psnr", self.val_psnr, batch_size=bs)
            self.log("val/ssim", self.val_ssim, batch_size=bs)
            self.log("val/psnr_input", self.val_psnr_input, batch_size=bs)
            self.log("val/decoder_mse", self.val_decoder_mse, batch_size=bs)
            if self.lpips is not None and not self.perceptual_is_random:
                self.val_lpips.update(self.lpips(target, x_hat))
                self.log("val/lpips_vgg", self.val_lpips, batch_size=bs)
            if batch_idx == 0:
                self._panel = (target[:4].detach().cpu(), x_hat[:4].detach().cpu())
        self.log("val/loss", loss, batch_size=bs)

    def on_validation_epoch_end(self) -> None:
        if self._panel is not None and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            log_image_panel(self.loggers, "val/teacher_vs_tiny", image_panel(*self._panel), self.step)
        self._panel = None

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the frozen VAE and LPIPS stay out: checkpoints hold trainable state only
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k.startswith(TRAINABLE_PREFIXES)
        }
        checkpoint["taesd_task"] = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "teacher_checksum": self.teacher_checksum,
            "latent_channels": self.latent_channels,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("taesd_task")
        if state is None:
            raise ValueError("ckpt_path: not a checkpoint of the TAESD task (--config-name taesd)")
        if state.get("teacher_checksum") != self.teacher_checksum:
            raise ValueError(
                "ckpt_path: the checkpoint distils a different VAE (checksum "
                f"{str(state.get('teacher_checksum'))[:12]} vs {self.teacher_checksum[:12]}); use the same model.path"
            )
        o = self.config.optimizer
        if not checkpoint.get("lr_schedulers") and (o.lr_scheduler != "constant" or o.lr_warmup_steps):
            raise ValueError(
                f"ckpt_path: the checkpoint holds no learning-rate schedule state (written before train.lr_scheduler "
                f"existed), so train.lr_scheduler={o.lr_scheduler} / train.lr_warmup_steps={o.lr_warmup_steps} "
                "cannot resume where it stopped; resume with lr_scheduler=constant and lr_warmup_steps=0"
            )
        self.step = int(state.get("step", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
