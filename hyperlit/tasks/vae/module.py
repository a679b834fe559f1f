"""VAE-decoder fine-tuning task: frozen encoder, trainable post_quant_conv + decoder, PatchGAN adversarial loss.

One forward per batch feeds both updates: the generator (decoder) step with reconstruction + LPIPS + adaptive
GAN term (D frozen), then the discriminator step on the detached reconstruction. Lightning manual optimization;
the module's own ``step`` (one per generator update) drives D start, warm-up and ramp, because
``trainer.global_step`` counts every optimizer step (two per batch once D trains, Lightning #17958).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from hyperlit.vae.colour import ColourAccumulator, ColourCheck, compare_colours
from hyperlit.vae.config import VAETaskConfig
from hyperlit.vae.discriminator import PatchDiscriminator
from hyperlit.vae.fp16_fix import ActivationMonitor, Fp16FixLoss, LayerGains, decoder_layers
from hyperlit.vae.fp16_rescale import RescaleReport, fine_tune_scope, rescale_decoder
from hyperlit.vae.frozen import cached_posterior, frozen, weights_checksum
from hyperlit.vae.losses import adversarial_factor, discriminator_loss, generator_loss, reconstruction_loss
from hyperlit.vae.lpips import LPIPS
from hyperlit.vae.panels import image_panel, log_image_panel

log = logging.getLogger(__name__)

TRAINABLE_PREFIXES = ("vae.decoder.", "vae.post_quant_conv.", "disc.", "gains.")


def frozen_checksum(vae: nn.Module) -> str:
    """sha256 over the encoder and quant_conv weights: proof that the latent space did not move."""
    return weights_checksum(vae, ("encoder.", "quant_conv."))


class VAEDecoderTask(pl.LightningModule):
    def __init__(
        self,
        vae: nn.Module,
        config: VAETaskConfig | None = None,
        perceptual: LPIPS | None = None,
        perceptual_is_random: bool = False,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trainable parts
        self.config = config or VAETaskConfig()
        # A torch optimizer partial (``train.optimizer``) that still takes the parameters; G and D get one each.
        self.optimizer_factory = optimizer or functools.partial(
            torch.optim.AdamW, lr=1e-5, betas=(0.5, 0.9), weight_decay=0.0
        )
        cfg = self.config
        if cfg.loss.perceptual.weight > 0 and perceptual is None:
            raise ValueError(
                f"loss.perceptual.weight={cfg.loss.perceptual.weight} needs an LPIPS model; set "
                "loss.perceptual.weights=/path/to/vgg16.pth or loss.perceptual.weight=0"
            )
        self.vae = vae.float()
        self.vae.requires_grad_(False)
        for m in self.trainable_modules():
            m.requires_grad_(True)
        self.frozen_checksum = frozen_checksum(self.vae)
        self.fp16_fix = cfg.loss.kind == "fp16_fix"
        # The starting decoder, frozen: validation scores it beside the trained one, and fp16_fix's teacher.
        # Not in checkpoints (TRAINABLE_PREFIXES) and never in an optimizer.
        self.start_decoder = nn.ModuleDict(
            {"decoder": copy.deepcopy(self.vae.decoder)}
            | ({"post_quant_conv": copy.deepcopy(self.vae.post_quant_conv)} if self.vae.post_quant_conv else {})
        ).requires_grad_(False)
        self.gains = LayerGains(self.vae) if self.fp16_fix else None
        if self.fp16_fix and not cfg.loss.fp16_fix.train_weights:
            # only the log gains train: Adam's absolute steps would swamp weights the rescaling made tiny
            self.vae.decoder.requires_grad_(False)
            if self.vae.post_quant_conv is not None:
                self.vae.post_quant_conv.requires_grad_(False)
        # fp16_fix: the closed form runs once (a resumed run keeps its result) and names the layers fine-tuning may
        # change: None = every layer, [] = none (then there is nothing to fine-tune)
        self.fp16_rescaled = False
        self.fp16_scope: list[str] | None = None
        self.fp16_report: RescaleReport | None = None
        self._no_update: list[Tensor] = []  # parameters whose gradient is dropped before each step
        self.disc = (
            PatchDiscriminator(int(vae.config.out_channels), cfg.disc.ndf, cfg.disc.n_layers, cfg.disc.norm)
            if cfg.disc.enabled and not self.fp16_fix
            else None
        )
        self.lpips = perceptual
        self.perceptual_is_random = perceptual_is_random
        self.step = 0  # generator updates done
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.diverged: str | None = None
        self.ema_should_update = False
        self.posterior_cache: dict[int, tuple[Tensor, Tensor]] = {}
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_lpips = MeanMetric()
        self.start_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.start_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.start_lpips = MeanMetric()
        self._colour_in = ColourAccumulator()
        self._colour_out = ColourAccumulator()
        self.colour_check: ColourCheck | None = None
        self._panel: tuple[Tensor, Tensor] | None = None
        self._fp16_latents: Tensor | None = None

    # ------------------------------------------------------------------ parts
    def trainable_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = [self.vae.decoder]
        if getattr(self.vae, "post_quant_conv", None) is not None:
            mods.insert(0, self.vae.post_quant_conv)
        return mods

    def ema_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if name.startswith(("vae.decoder.", "vae.post_quant_conv.")):
                yield name, p

    @property
    def last_layer(self) -> Tensor:
        return self.vae.decoder.conv_out.weight

    def adv_factor(self) -> float:
        d = self.config.disc
        if self.disc is None:
            return 0.0
        return adversarial_factor(self.step, d.start, d.warmup_steps, d.ramp_steps, d.ramp)

    # ------------------------------------------------------------------ posterior
    @torch.no_grad()
    def posterior(self, pixels: Tensor, index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(mean, logvar) of the frozen encoder, in fp32 (autocast off: the encoder is not trained and SD-class
        encoders can overflow fp16). With ``index`` and posterior.cache, each image is encoded once."""
        return cached_posterior(self.vae, self.posterior_cache, pixels, index, self.config.posterior.cache)

    def latents(self, mean: Tensor, logvar: Tensor) -> Tensor:
        if not self.config.posterior.sample:
            return mean
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)

    def decode(self, z: Tensor) -> Tensor:
        """Decoder output; the input of ``decoder.conv_out`` is kept for the last-layer gradient norms."""
        handle = self.vae.decoder.conv_out.register_forward_hook(self._keep_conv_out_input)
        try:
            return self.vae.decode(z).sample
        finally:
            handle.remove()

    @torch.no_grad()
    def start_decode(self, z: Tensor) -> Tensor:
        """The starting decoder's output (fp32, no autocast): the reference of validation and fp16_fix's teacher."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            if "post_quant_conv" in self.start_decoder:
                z = self.start_decoder["post_quant_conv"](z)
            return self.start_decoder["decoder"](z)

    def _keep_conv_out_input(self, _m: nn.Module, inputs: tuple[Tensor, ...], _out: Tensor) -> None:
        self._conv_out_input = inputs[0]

    # ------------------------------------------------------------------ losses
    def generator_terms(self, x: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor | None, float, dict[str, Tensor]]:
        """(nll = reconstruction + LPIPS, GAN term or None before warm-up ends, adversarial factor, logs)."""
        cfg = self.config
        rec = reconstruction_loss(x, x_hat, cfg.loss.reconstruction)
        nll = cfg.loss.reconstruction_weight * rec
        logs: dict[str, Tensor] = {"rec": rec.detach()}
        if self.lpips is not None and cfg.loss.perceptual.weight > 0:
            p = self.lpips(x, x_hat).mean()  # with grad: the diffusers script's no_grad LPIPS trained nothing
            nll = nll + cfg.loss.perceptual.weight * p
            logs["lpips"] = p.detach()
        factor = self.adv_factor()
        logs["adv_factor"] = torch.tensor(factor)
        g = None
        if factor > 0:
            with frozen(self.disc):
                g = generator_loss(self.disc(x_hat), cfg.disc.loss)
            logs["g_loss"] = g.detach()
        logs["nll"] = nll.detach()
        return nll, g, factor, logs

    def _last_layer_grad(self, grad_out: Tensor) -> Tensor:
        """d(loss)/d(conv_out.weight) from d(loss)/d(x_hat): the decoder output *is* conv_out's output."""
        conv = self.vae.decoder.conv_out
        return torch.nn.grad.conv2d_weight(
            self._conv_out_input.detach().float(), conv.weight.shape, grad_out.detach().float(),
            conv.stride, conv.padding, conv.dilation, conv.groups,
        )  # fmt: skip

    def generator_output_grad(self, x: Tensor, x_hat: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Gradient of the total generator loss with respect to ``x_hat`` (fp32), plus logs.

        The same value as LDM's ``nll + d_weight * g`` with ``d_weight = ||grad_W nll|| / (||grad_W g|| + 1e-4)``
        at ``decoder.conv_out.weight`` (tests/helpers/vae_reference.py computes it LDM's way; a test compares
        them), but LPIPS and D are
        backpropagated once each instead of three times, and the last-layer norms are computed in fp32.
        """
        xf = x_hat.float()
        nll, g, factor, logs = self.generator_terms(x, xf)
        grad = torch.autograd.grad(nll, xf, retain_graph=True)[0]
        total = nll.detach()
        if g is not None:
            g_grad = torch.autograd.grad(g, xf, retain_graph=True)[0]
            d = self.config.disc
            if d.adaptive:
                n_rec = torch.linalg.vector_norm(self._last_layer_grad(grad))
                n_gan = torch.linalg.vector_norm(self._last_layer_grad(g_grad))
                d_weight = (n_rec / (n_gan + 1e-4)).clamp(0.0, d.max_adaptive_weight) * d.weight
                logs["grad_norm_rec"], logs["grad_norm_gan"] = n_rec, n_gan
            else:
                d_weight = torch.tensor(d.weight, device=x.device)
            grad = grad + factor * d_weight * g_grad
            total = total + factor * d_weight * g.detach()
            logs["d_weight"] = d_weight.detach()
        logs["total"] = total
        return grad, logs

    def disc_loss(self, x: Tensor, x_hat: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        # Separate real and fake calls as in LDM; both inputs detached so nothing reaches the decoder.
        logits_real = self.disc(x.detach())
        logits_fake = self.disc(x_hat.detach())
        loss = discriminator_loss(logits_real, logits_fake, self.config.disc.loss)
        acc = 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean())
        return loss, {
            "d_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
            "d_acc": acc,
        }

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        g_params = [p for m in self.trainable_modules() for p in m.parameters()]
        if self.gains is not None:
            # the log gains take relative steps at their own lr (Adam's default betas: they are not GAN-trained)
            lr = self.config.loss.fp16_fix.gain_lr
            groups = [{"params": g_params}, {"params": list(self.gains.parameters()), "lr": lr, "betas": (0.9, 0.999)}]
            return [self.optimizer_factory(groups)]
        opts = [self.optimizer_factory(g_params)]
        if self.disc is not None:
            disc_lr = self.config.optimizer.disc_lr
            extra = {"lr": disc_lr} if disc_lr is not None else {}
            opts.append(self.optimizer_factory(self.disc.parameters(), **extra))
        return opts

    def _opts(self) -> tuple[Any, Any | None]:
        opts = self.optimizers()
        if isinstance(opts, list | tuple):
            return opts[0], (opts[1] if len(opts) > 1 else None)
        return opts, None

    def _update(self, opt: Any, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        for p in self._no_update:  # outside fp16_fix's fine-tuning scope: Adam skips a parameter without a grad
            p.grad = None
        clip = self.config.optimizer.grad_clip
        if clip:
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt.step()

    def _last_good_checkpoint(self) -> str:
        paths = [
            getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
            for cb in getattr(self.trainer, "checkpoint_callbacks", [])
        ]
        paths = [p for p in paths if p]
        return paths[0] if paths else "none saved yet"

    def _bad_step(self, what: str, value: Tensor) -> None:
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        log.warning("step %d: %s is %s; update skipped (%d in a row)", self.step, what, value.item(), self.bad_in_a_row)
        if self.bad_in_a_row >= self.config.max_bad_steps:
            self.diverged = (
                f"{self.bad_in_a_row} consecutive steps with a NaN/inf loss (max_bad_steps="
                f"{self.config.max_bad_steps}) at step {self.step}; last good checkpoint: "
                f"{self._last_good_checkpoint()}"
            )
            log.error("training stopped: %s", self.diverged)
            self.trainer.should_stop = True

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self.ema_should_update = False
        if self.step >= self.config.max_steps:
            self.trainer.should_stop = True
            return
        opt_g, opt_d = self._opts()
        x = batch["pixels"]
        mean, logvar = self.posterior(x, batch.get("index"))
        if self.gains is not None:
            self.fp16_fix_step(opt_g, self.latents(mean, logvar), x.shape[0])
            return
        x_hat = self.decode(self.latents(mean, logvar))  # one forward, reused (detached) by the D step

        g_grad, logs = self.generator_output_grad(x, x_hat)
        if not (torch.isfinite(logs["total"]) and torch.isfinite(g_grad).all()):
            self._bad_step("the generator loss", logs["total"])
            return
        train_d = self.disc is not None and self.step >= self.config.disc.start
        d_total = None
        if train_d:
            d_total, d_logs = self.disc_loss(x, x_hat)
            logs.update(d_logs)
            if not torch.isfinite(d_total):
                self._bad_step("the discriminator loss", d_total)
                return
        # <x_hat, dL/dx_hat> carries the generator loss's gradient to every decoder weight; manual_backward
        # keeps the precision plugin (loss scaling) in charge.
        self._update(opt_g, (x_hat.float() * g_grad).sum())
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
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, batch_size=bs)

    def fp16_fix_step(self, opt: Any, z: Tensor, bs: int) -> None:
        """Teacher reproduction + activation penalty; the gains are folded into the weights after each update,
        so the VAE always holds the current function (EMA, exports and checkpoints see plain weights)."""
        cfg = self.config.loss.fp16_fix
        if self.fp16_scope == []:
            log.info("fp16_fix: the closed form left no layer over the target; nothing to fine-tune, stopping")
            self.trainer.should_stop = True
            return
        teacher = self.start_decode(z)
        monitor = ActivationMonitor(self.vae)
        try:
            with self.gains.applied():
                x_hat = self.vae.decode(z).sample
            loss, logs = Fp16FixLoss(cfg.penalty_weight, cfg.target)(x_hat, teacher, monitor.peaks)
            logs["peak"] = max(p.detach().max() for p in monitor.peaks.values())
        finally:
            monitor.remove()
        if not torch.isfinite(loss):
            self._bad_step("the fp16_fix loss", loss)
            return
        self._update(opt, loss)
        self.gains.fold()
        self.bad_in_a_row = 0
        self.ema_should_update = True
        self.step += 1
        if self.step >= self.config.max_steps:
            self.trainer.should_stop = True
        self.log_dict({f"train/{k}": v.float() for k, v in logs.items()}, on_step=True, batch_size=bs)
        self.log("train/total", loss.detach().float(), on_step=True, batch_size=bs)
        self.log("train/step", float(self.step), on_step=True, batch_size=bs)

    @torch.no_grad()
    def training_latents(self, trainer: pl.Trainer, count: int) -> list[Tensor]:
        """Posterior modes of up to ``count`` training images, batch by batch (filling the posterior cache)."""
        out: list[Tensor] = []
        seen = 0
        dm = trainer.datamodule
        for batch in dm.train_dataloader() if dm is not None else []:
            x = batch["pixels"][: count - seen].to(self.device)
            index = batch.get("index")
            out.append(self.posterior(x, index[: x.shape[0]] if index is not None else None)[0])
            seen += x.shape[0]
            if seen >= count:
                break
        return out

    def fp16_closed_form(self, trainer: pl.Trainer) -> RescaleReport | None:
        """fp16_fix's first step: rescale exactly every layer only a normalisation reads, on the training images'
        fp32 peaks (the same factors on every rank), then narrow fine-tuning to what is left. Run once; a resumed
        run only narrows again."""
        cfg = self.config.loss.fp16_fix
        if not self.fp16_fix or not cfg.closed_form:
            return None
        if not self.fp16_rescaled:
            latents = self.training_latents(trainer, cfg.measure_images)
            if not latents:
                raise ValueError("loss.fp16_fix.closed_form: no training images to measure activation peaks on")

            def reduce_max(t: Tensor) -> Tensor:
                gathered = trainer.strategy.all_gather(t.to(self.device))
                return gathered.reshape(-1, *t.shape).amax(dim=0).cpu()

            self.fp16_report = rescale_decoder(self.vae, latents, cfg.target, reduce_max)
            left = [p.layer for p in self.fp16_report.left]
            self.fp16_scope = fine_tune_scope(self.vae, left) if left else []
            self.fp16_rescaled = True
            if trainer.is_global_zero:
                for line in self.fp16_report.lines():
                    log.info("fp16 closed form: %s", line)
                log.info(
                    "fp16 fine-tuning: %s",
                    "none" if self.fp16_scope == [] else ", ".join(self.fp16_scope or ["every layer"]),
                )
        self.limit_fp16_fine_tuning(self.fp16_scope)
        return self.fp16_report

    def limit_fp16_fine_tuning(self, scope: list[str] | None) -> None:
        """Only the layers in ``scope`` (None: all) get updates: their gains, and their weights with train_weights."""
        self.fp16_scope = scope
        train_weights = self.config.loss.fp16_fix.train_weights
        self._no_update = []
        for name, layer in decoder_layers(self.vae):
            if scope is not None and name not in scope:
                self._no_update.append(self.gains.log_gains[name.replace(".", "__")])
                if train_weights:
                    self._no_update += list(layer.parameters())
        if train_weights and scope is not None:  # norm affine parameters are outside every scope
            in_layers = {id(p) for _, layer in decoder_layers(self.vae) for p in layer.parameters()}
            self._no_update += [p for m in self.trainable_modules() for p in m.parameters() if id(p) not in in_layers]

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        x = batch["pixels"]
        mean, _ = self.posterior(x)  # posterior mode: deterministic metrics
        x_hat = self.decode(mean).float().clamp(-1.0, 1.0)
        a, b = (x + 1) / 2, (x_hat + 1) / 2
        self.val_psnr.update(b, a)
        self.val_ssim.update(b, a)
        bs = x.shape[0]
        self.log("val/psnr", self.val_psnr, batch_size=bs)
        self.log("val/ssim", self.val_ssim, batch_size=bs)
        if self.lpips is not None and not self.perceptual_is_random:
            self.val_lpips.update(self.lpips(x, x_hat))
            self.log("val/lpips_vgg", self.val_lpips, batch_size=bs)
        # the same metrics for the starting decoder on the same images: is the trained one better?
        start = self.start_decode(mean).clamp(-1.0, 1.0)
        self.start_psnr.update((start + 1) / 2, a)
        self.start_ssim.update((start + 1) / 2, a)
        self.log("val/start_psnr", self.start_psnr, batch_size=bs)
        self.log("val/start_ssim", self.start_ssim, batch_size=bs)
        if self.lpips is not None and not self.perceptual_is_random:
            self.start_lpips.update(self.lpips(x, start))
            self.log("val/start_lpips_vgg", self.start_lpips, batch_size=bs)
        self._colour_in.update(a.detach().cpu())
        self._colour_out.update(b.detach().cpu())
        if batch_idx == 0:
            self._panel = (x[:4].detach().cpu(), x_hat[:4].detach().cpu())
            self._fp16_latents = mean.detach().cpu()

    def on_validation_epoch_end(self) -> None:
        if self._colour_in.pixels:
            self.colour_check = compare_colours(self._colour_in.result(), self._colour_out.result())
            self.log("val/saturation_ratio", self.colour_check.saturation_ratio)
            self.log("val/contrast_ratio", self.colour_check.contrast_ratio)
            self.log("val/colour_shift", max(abs(v) for v in self.colour_check.mean_shift))
        self._colour_in, self._colour_out = ColourAccumulator(), ColourAccumulator()
        if self._panel is not None and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            log_image_panel(self.loggers, "val/reconstruction", image_panel(*self._panel), self.step)
        self._panel = None

    def on_train_end(self) -> None:
        check = self.colour_check
        if check is None or not self.trainer.is_global_zero:
            return
        for warning in check.warnings:
            log.warning("colour check of the last validation: the decoder %s", warning)
        if not check.warnings:
            log.info(
                "colour check passed: saturation x%.2f, contrast x%.2f of the inputs'",
                check.saturation_ratio, check.contrast_ratio,
            )  # fmt: skip

    # ------------------------------------------------------------------ fp16 check
    @torch.no_grad()
    def fp16_check_latents(self, trainer: pl.Trainer) -> Tensor | None:
        if self._fp16_latents is not None:
            return self._fp16_latents
        dm = trainer.datamodule
        for get in ("val_dataloader", "train_dataloader"):
            loader = getattr(dm, get, lambda: [])() if dm is not None else []
            for batch in loader:
                return self.posterior(batch["pixels"].to(self.device))[0].cpu()
        return None

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # frozen encoder / quant_conv / LPIPS stay out: checkpoints hold trainable state only
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k.startswith(TRAINABLE_PREFIXES)
        }
        checkpoint["vae_task"] = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "frozen_checksum": self.frozen_checksum,
            "fp16_rescaled": self.fp16_rescaled,  # the saved weights already hold the closed form's factors
            "fp16_scope": self.fp16_scope,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("vae_task", {})
        if state.get("frozen_checksum") not in (None, self.frozen_checksum):
            raise ValueError(
                "ckpt_path: the checkpoint was trained on a different base VAE encoder (checksum "
                f"{state['frozen_checksum'][:12]} vs {self.frozen_checksum[:12]}); use the same model.path"
            )
        self.step = int(state.get("step", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.fp16_rescaled = bool(state.get("fp16_rescaled", False))
        self.fp16_scope = state.get("fp16_scope")
