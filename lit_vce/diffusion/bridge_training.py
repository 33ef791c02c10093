"""Training the embedded world's I2SB inpainting bridge (RCSB's prior) with Lightning
(``scripts/train_world.py --models bridge``). Here, above the world layer, because it
trains a :mod:`lit_vce.diffusion.bridge`."""

from __future__ import annotations

import copy

import lightning as L
import torch
import torch.nn.functional as F

from ..world.training import adamw_one_cycle, ema_update


def bridge_training_masks(objects: torch.Tensor, generator: torch.Generator, cell: int = 4) -> torch.Tensor:
    """Inpainting regions (N, 1, H, W) for the world bridge, one kind per image in turn: the
    object's mask dilated by 1-2 px (the ``objects`` region rule), random cells of ``cell``
    px covering 10-50 % (the attribution-cell rule's shape) and a random box (I2SB's
    free-form masks, simplified)."""
    n, _, h, w = objects.shape
    out = torch.zeros(n, 1, h, w)
    u = torch.rand(n, 6, generator=generator)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            k = 3 + 2 * int(u[i, 0] < 0.5)
            out[i] = F.max_pool2d(objects[i : i + 1].float(), k, 1, k // 2)[0]
        elif kind == 1:
            g = torch.rand(h // cell, w // cell, generator=generator)
            area = 0.1 + 0.4 * float(u[i, 1])
            keep = (g <= torch.quantile(g.flatten(), area)).float()
            out[i, 0] = keep.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
        else:
            bh, bw = int(6 + u[i, 2] * 14), int(6 + u[i, 3] * 14)
            y, x = int(u[i, 4] * (h - bh)), int(u[i, 5] * (w - bw))
            out[i, 0, y : y + bh, x : x + bw] = 1
    return out


class WorldBridgeModule(L.LightningModule):
    """Trains the world's I2SB inpainting bridge (RCSB's prior) as I2SB trains one.

    A step: ``x1`` is the image with Gaussian noise inside a region
    (:func:`bridge_training_masks`), ``t`` uniform over the ``interval`` bridge steps,
    ``x_t`` drawn from the bridge between ``x0`` and ``x1`` (Eq. 11), and the network
    regresses ``(x_t - x0) / std_fwd[t]`` inside the region (I2SB's masked MSE). The network
    starts from the world ddpm (I2SB starts ImageNet from ADM's unconditional checkpoint)
    and the saved weights are an EMA.

    Args:
        lr: AdamW learning rate (one-cycle schedule over ``max_steps``).
        ema_decay: decay of the saved weight EMA.
        max_steps: total optimiser steps, for the schedule.
        init: a state dict to start from (the world ddpm's, or an earlier bridge's).
        seed: the seed of the regions' generator.
    """

    def __init__(
        self, lr: float = 3e-4, ema_decay: float = 0.999, max_steps: int = 2000, init: dict | None = None, seed: int = 0
    ):
        super().__init__()
        from .bridge import BridgeSchedule, world_bridge_network

        self.save_hyperparameters(ignore=["init"])
        self.net = world_bridge_network()
        if init is not None:
            self.net.unet.load_state_dict(init)
        self.ema = copy.deepcopy(self.net.unet).requires_grad_(False)
        self.schedule = BridgeSchedule()
        self._gen = torch.Generator().manual_seed(seed)

    def training_step(self, batch, batch_idx):
        s = self.schedule
        x0 = batch["image"] * 2 - 1
        mask = bridge_training_masks(batch["mask"].cpu(), self._gen).to(x0)
        x1 = (1 - mask) * x0 + mask * torch.randn_like(x0)
        step = torch.randint(0, s.interval, (len(x0),))
        view = (-1, 1, 1, 1)
        mu0, mu1 = s.mu_x0[step].view(view).to(x0), s.mu_x1[step].view(view).to(x0)
        xt = mu0 * x0 + mu1 * x1 + s.std_sb[step].view(view).to(x0) * torch.randn_like(x0)
        label = (xt - x0) / s.std_fwd[step].view(view).to(x0)
        pred = self.net(xt, s.noise_levels[step].to(x0))
        loss = F.mse_loss(mask * pred, mask * label)
        self.log("loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        ema_update(self.ema, self.net.unet, self.hparams.ema_decay, self.global_step)

    def configure_optimizers(self):
        return adamw_one_cycle(self.net.parameters(), self.hparams.lr, self.hparams.max_steps)
