"""DiG-IN's optimisation: Adam on z_T and the per-step embedding deltas against the
objective on the last x0-predictions, keeping each sample's best iterate."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...diffusion import Inversion
from ...objectives import ObjectiveContext
from ...progress import steps
from ..base import VCEBatch
from .edit import Edit
from .trajectory import Start


@dataclass
class Best:
    """Per sample: the best iterate's image, its clean loss, its index, failures."""

    images: torch.Tensor
    loss: torch.Tensor
    iterate: torch.Tensor
    failure: list[str | None]

    def keep(self, better: torch.Tensor, loss: torch.Tensor, iterate: int, images: torch.Tensor) -> None:
        """Take iterate ``iterate`` (its clean ``loss`` and ``images``) for the samples in ``better``."""
        self.loss = torch.where(better, loss, self.loss)
        self.iterate = torch.where(better, torch.full_like(self.iterate, iterate), self.iterate)
        self.images[better] = images[better]


def fit(images: torch.Tensor, like: torch.Tensor, clamp: bool = False) -> torch.Tensor:
    """``images`` resized to ``like``'s resolution when they differ (bilinear, antialiased)."""
    if images.shape[-2:] != like.shape[-2:]:
        images = F.interpolate(images, size=like.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
        if clamp:
            images = images.clamp(0, 1)
    return images


class OptimiseMixin:
    """:class:`~lit_vce.methods.digin.DiGIN`'s losses and optimisation loop (a mixin of the method)."""

    def trajectory_loss(
        self, x0s: list[torch.Tensor], ctx: ObjectiveContext, augmented: bool, checkpoint: bool | None = None
    ) -> torch.Tensor:
        """The objective on the decoded x0-predictions, weighted 1..k (normalised), one
        decode at a time (``checkpoint``: each decode and objective call checkpointed)."""
        k = len(x0s)
        weights = torch.arange(1, k + 1, dtype=torch.float32) / (k * (k + 1) / 2)
        total = 0.0
        views, ctx.views = ctx.views, (ctx.views if augmented else None)
        try:
            for w, x0 in zip(weights.tolist(), x0s):
                images = fit(self.diffusion.decode_checkpointed(x0, checkpoint), ctx.original)
                ctx.latents = x0
                total = total + w * self.objective(images, ctx)
        finally:
            ctx.views = views
        return total

    def fused_loss(self, x0s: list[torch.Tensor], ctx: ObjectiveContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The augmented loss of :meth:`trajectory_loss` with the k x0-predictions decoded in
        one call and the objective evaluated once on all k * n images (all their views through
        one classifier call; the views are drawn per x0-prediction in the same order as
        :meth:`trajectory_loss` draws them); also the last x0-prediction's decoded image (unresized)."""
        k, n = len(x0s), len(x0s[0])
        weights = torch.arange(1, k + 1, dtype=torch.float32) / (k * (k + 1) / 2)
        z = torch.cat(x0s)
        raw = self.diffusion.decode_checkpointed(z, False)
        tiled = ctx.tiled(k)
        tiled.latents = z
        per = self.objective(fit(raw, ctx.original), tiled).reshape(k, n)
        return (weights.to(per)[:, None] * per).sum(0), raw[-n:]

    def clean_loss(self, raw: torch.Tensor, x0: torch.Tensor, ctx: ObjectiveContext) -> torch.Tensor:
        """The un-augmented loss of a decoded image (``raw``, from ``x0``)."""
        views, latents = ctx.views, ctx.latents
        ctx.views, ctx.latents = None, x0
        try:
            with torch.no_grad():
                return self.objective(fit(raw, ctx.original), ctx).float()
        finally:
            ctx.views, ctx.latents = views, latents

    def optimise(
        self,
        batch: VCEBatch,
        inv: Inversion,
        cond_src,
        cond_tgt,
        edit: Edit,
        ctx: ObjectiveContext,
        start: Start,
        plan: tuple[int | None, bool] = (None, False),
    ) -> Best:
        """Adam on z_T and the per-step embedding deltas; keeps each sample's iterate with the lowest clean loss.
        ``plan``: (UNet calls to checkpoint, whether the loss is checkpointed), see :meth:`checkpoint_plan`."""
        opt_s = self.optimisation
        n, dev = len(batch), batch.images.device
        z_T = start.z_start.detach().clone().requires_grad_(True)
        norm0 = z_T.detach().flatten(1).norm(dim=1)
        delta_c = torch.zeros((self.num_steps, *cond_src.shape), device=dev, requires_grad=True)
        delta_u = torch.zeros((self.num_steps, *inv.uncond[0].shape), device=dev, requires_grad=True)
        opt = torch.optim.Adam(
            [{"params": [z_T], "lr": opt_s.lr * opt_s.latent_lr_factor}, {"params": [delta_c, delta_u], "lr": opt_s.lr}]
        )
        best = Best(
            batch.images.clone(),
            torch.full((n,), float("inf"), device=dev),
            torch.zeros(n, dtype=torch.long, device=dev),
            [None] * n,
        )
        ok = torch.ones(n, dtype=torch.bool, device=dev)
        self.last_trace = []
        fused = not plan[1]  # one decode of the k x0-predictions serves the loss, the clean loss and the kept image
        for it in steps(range(opt_s.outer_steps + 1), "DiG-IN outer steps", n):  # 0 is the searched start
            last = it == opt_s.outer_steps
            with torch.set_grad_enabled(not last), self.autocast_context(dev):
                x0s = self.run_trajectory(
                    z_T,
                    cond_src,
                    cond_tgt,
                    inv.uncond,
                    delta_c,
                    delta_u,
                    start.injection,
                    start.blend,
                    edit.templates,
                    edit.latent_mask,
                    keep_last=1 if last else opt_s.loss_steps,
                    attention=edit.plan,
                    paste=edit.paste,
                    checkpoint_steps=plan[0],
                )
                if fused:
                    if last:
                        with torch.no_grad():
                            raw = self.diffusion.decode(x0s[-1])
                    else:
                        loss, raw = self.fused_loss(x0s, ctx)
                    raw = raw.detach()
                    clean = self.clean_loss(raw, x0s[-1].detach(), ctx)
                else:
                    with torch.no_grad():  # the un-augmented loss of this iterate decides what is kept
                        clean = self.trajectory_loss(x0s[-1:], ctx, augmented=False).float()
                better = (clean < best.loss) & ok
                if better.any():
                    image = raw.float() if fused else self.diffusion.decode(x0s[-1].detach()).float()
                    best.keep(better, clean, it, fit(image, batch.images, clamp=True))
                if last:
                    break
                if not fused:
                    loss = self.trajectory_loss(x0s, ctx, augmented=True, checkpoint=plan[1])
                loss = loss.float()
                opt.zero_grad()
                loss.sum().backward()
            self.last_trace.append(loss.detach())
            ok &= finite_grads(z_T, delta_c, delta_u, ok, best.failure, it)
            opt.step()
            with torch.no_grad():
                z_T.mul_((norm0 / z_T.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, *([1] * (z_T.dim() - 1))))
        return best


def finite_grads(z_T, delta_c, delta_u, ok, failure, it) -> torch.Tensor:
    """Per-sample finiteness of the gradients; non-finite samples are recorded as failures
    and frozen (their gradients zeroed)."""
    for p in (z_T, delta_c, delta_u):
        if p.grad is None:  # delta_u at guidance_scale 1 (no unconditional branch), delta_c at 0
            p.grad = torch.zeros_like(p)
    fine = (
        torch.isfinite(z_T.grad).flatten(1).all(1)
        & torch.isfinite(delta_c.grad.transpose(0, 1).flatten(1)).all(1)
        & torch.isfinite(delta_u.grad.transpose(0, 1).flatten(1)).all(1)
    )
    for i in torch.nonzero(~fine & ok).flatten().tolist():
        failure[i] = f"non-finite gradient at outer step {it + 1}"
    keep = ok & fine
    for p in (z_T, delta_c, delta_u):
        p.grad = torch.nan_to_num(p.grad, 0.0, 0.0, 0.0)
    z_T.grad[~keep] = 0
    delta_c.grad[:, ~keep] = 0
    delta_u.grad[:, ~keep] = 0
    return fine
