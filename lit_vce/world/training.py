"""LightningModules that train the embedded world's models (``Trainer.fit``).

- :class:`WorldClassifierModule`: cross-entropy training of :class:`SmallCNN`
  (optionally L2-PGD adversarial training) or of :class:`OracleNet` (shape and
  background heads).
- :class:`WorldDiffusionModule`: epsilon-prediction DDPM training of the
  class-conditional ``UNet2DModel``, with label dropout to the null class (for
  classifier-free guidance) and an exponential moving average of the weights.

``scripts/train_world.py`` drives both and writes the shipped safetensors.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F

from .models import NULL_CLASS, SCHEDULER_CONFIG, OracleNet, SmallCNN, build_world_unet


def l2_pgd(model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """Untargeted L2 PGD inside the ``eps`` ball and the [0, 1] box (Madry et al., 2018)."""
    if eps <= 0 or steps <= 0:
        return x
    step = 2.5 * eps / steps
    delta = torch.randn_like(x)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * torch.rand(len(x), 1, 1, 1, device=x.device)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    was_training = model.training
    model.eval()
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y)
        (g,) = torch.autograd.grad(loss, delta)
        g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta.detach() + step * g
        norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * (eps / norm.clamp_min(eps))
        delta = ((x + delta).clamp(0, 1) - x).detach()
    model.train(was_training)
    return (x + delta).detach()


class WorldClassifierModule(L.LightningModule):
    """Trains a world classifier.

    Args:
        kind: ``"standard"`` (plain CE), ``"robust"`` (L2-PGD adversarial training)
            or ``"oracle"`` (shape + background heads).
        lr: AdamW learning rate (cosine decay over ``max_steps``).
        eps, pgd_steps: the L2 threat model of adversarial training.
        max_steps: total optimiser steps, for the schedule.
    """

    def __init__(
        self, kind: str = "standard", lr: float = 3e-3, eps: float = 1.0, pgd_steps: int = 3, max_steps: int = 1000
    ):
        super().__init__()
        if kind not in ("standard", "robust", "oracle"):
            raise ValueError(f"unknown classifier kind {kind!r}")
        self.save_hyperparameters()
        self.net = OracleNet() if kind == "oracle" else SmallCNN()

    def training_step(self, batch, batch_idx):
        x, y = batch["image"], batch["label"]
        if self.hparams.kind == "oracle":
            shape_logits, bg_logits = self.net.both(x)
            loss = F.cross_entropy(shape_logits, y) + F.cross_entropy(bg_logits, batch["background"])
            acc = (shape_logits.argmax(1) == y).float().mean()
        else:
            if self.hparams.kind == "robust":
                with torch.enable_grad():
                    x = l2_pgd(self.net, x, y, self.hparams.eps, self.hparams.pgd_steps)
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
            acc = (logits.argmax(1) == y).float().mean()
        self.log("loss", loss, prog_bar=True)
        self.log("acc", acc, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.hparams.lr, total_steps=self.hparams.max_steps, pct_start=0.1
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class WorldDiffusionModule(L.LightningModule):
    """Trains the class-conditional pixel DDPM of the world.

    Args:
        lr: AdamW learning rate (linear warm-up, cosine decay).
        label_dropout: probability of replacing the class by the null class.
        ema_decay: decay of the weight EMA that is saved as the final model.
        max_steps: total optimiser steps, for the schedule.
        snr_gamma: Min-SNR-gamma loss weighting (Hang et al., 2023): the
            epsilon loss at timestep t is weighted by min(SNR(t), gamma) / SNR(t),
            which shifts the effort from nearly clean steps (texture) to noisy
            ones, where a sample's class and background are decided. ``None``:
            the plain epsilon MSE (how the first 3000 steps were trained).
        init: a state dict to start from (continued training); the EMA starts
            from it too.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        label_dropout: float = 0.1,
        ema_decay: float = 0.995,
        max_steps: int = 3000,
        snr_gamma: float | None = None,
        init: dict | None = None,
    ):
        super().__init__()
        from diffusers import DDPMScheduler

        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be positive, got {snr_gamma}")
        self.save_hyperparameters(ignore=["init"])
        self.unet = build_world_unet()
        if init is not None:
            self.unet.load_state_dict(init)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)
        self.scheduler = DDPMScheduler(**SCHEDULER_CONFIG)

    def training_step(self, batch, batch_idx):
        x0 = batch["image"] * 2 - 1
        y = batch["label"].clone()
        drop = torch.rand(len(y), device=y.device) < self.hparams.label_dropout
        y[drop] = NULL_CLASS
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        xt = self.scheduler.add_noise(x0, noise, t)
        err = (self.unet(xt, t, class_labels=y).sample - noise).pow(2).flatten(1).mean(1)
        gamma = self.hparams.snr_gamma
        if gamma is None:
            loss = err.mean()
        else:
            abar = self.scheduler.alphas_cumprod.to(x0.device)[t]
            snr = abar / (1 - abar)
            loss = (err * torch.where(snr > gamma, gamma / snr, torch.ones_like(snr))).mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        ema_update(self.ema, self.unet, self.hparams.ema_decay, self.global_step)

    def configure_optimizers(self):
        return adamw_one_cycle(self.unet.parameters(), self.hparams.lr, self.hparams.max_steps)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, ema_decay: float, global_step: int) -> None:
    """One step of the weight EMA, its decay warmed up so early weights are not over-weighted."""
    decay = min(ema_decay, (1 + global_step) / (10 + global_step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)


def adamw_one_cycle(params, lr: float, max_steps: int) -> dict:
    """The diffusion models' optimiser: AdamW without weight decay, one-cycle over ``max_steps`` (5 % warm-up)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max_steps, pct_start=0.05)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
