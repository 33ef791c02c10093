"""DiG-IN's sampling trajectory with per-sample injection and blending, and the search over
its settings before optimisation."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from ...diffusion import Inversion
from ...objectives import ObjectiveContext
from ...progress import progress
from ...rngs import per_sample_randn
from ..base import VCEBatch
from .edit import AttentionPlan, Edit
from .views import fraction_steps


@dataclass
class Start:
    """The setting chosen per sample: injection and blend step counts, the start's index, its z_T."""

    injection: torch.Tensor
    blend: torch.Tensor
    start: torch.Tensor
    z_start: torch.Tensor


class TrajectoryMixin:
    """:class:`~lit_vce.methods.digin.DiGIN`'s trajectory and settings search (a mixin of the method)."""

    def run_trajectory(
        self,
        z_t: torch.Tensor,
        cond_src,
        cond_tgt,
        uncond: list[torch.Tensor],
        delta_c=None,
        delta_u=None,
        injection_steps: torch.Tensor | None = None,
        blend_steps: torch.Tensor | None = None,
        templates: list[torch.Tensor] | None = None,
        latent_mask: torch.Tensor | None = None,
        keep_last: int = 1,
        attention: AttentionPlan | None = None,
        paste: torch.Tensor | None = None,
        checkpoint_steps: int | None = None,
    ) -> list[torch.Tensor]:
        """Sample from ``z_t`` with per-sample injection/blend step counts; returns the
        x0-predictions of the last ``keep_last`` steps. With ``attention`` (a recorded
        trajectory's maps) the first injection steps get its cross-attention maps and the
        target conditioning; without, they get the source conditioning. For the first
        blend steps the input latent is ``mask * z + (1 - mask) * templates[i]`` (the
        reconstruction trajectory's latent at that step; step 0's input is z_T). With
        ``paste`` (a clean latent) the returned x0-predictions take it outside the mask.
        ``checkpoint_steps``: checkpoint the first that many UNet calls and no other
        (``None``: as the diffusion model's ``gradient_checkpointing`` says)."""
        bb, n = self.diffusion, len(z_t)
        dev = z_t.device
        inj = torch.zeros(n, dtype=torch.long, device=dev) if injection_steps is None else injection_steps
        blend = torch.zeros(n, dtype=torch.long, device=dev) if blend_steps is None else blend_steps
        shape_c = (n,) + (1,) * (cond_src.dim() - 1)
        shape_z = (n,) + (1,) * (z_t.dim() - 1)
        x0s = []
        for i in range(self.num_steps):
            if templates is not None and latent_mask is not None and bool((blend > i).any()):
                use = (blend > i).view(shape_z).to(z_t.dtype)
                z_t = use * (latent_mask * z_t + (1 - latent_mask) * templates[i]) + (1 - use) * z_t
            control = None
            if attention is not None:
                cond = cond_tgt
                active = inj > i
                if bool(active.any()):
                    control = attention.injection(i, active)
            else:
                cond = torch.where((inj > i).view(shape_c), cond_src, cond_tgt)
            if delta_c is not None:
                cond = cond + delta_c[i]
            u = uncond[i] if delta_u is None else uncond[i] + delta_u[i]
            t = bb.timesteps[i]
            ck = None if checkpoint_steps is None else i < checkpoint_steps
            z_t, x0 = bb.step(bb.eps(z_t, t, cond, u, control=control, checkpoint=ck), t, z_t)
            if i >= self.num_steps - keep_last:
                if paste is not None and latent_mask is not None:
                    x0 = latent_mask * x0 + (1 - latent_mask) * paste
                x0s.append(x0)
        return x0s

    def search_start(
        self, batch: VCEBatch, inv: Inversion, cond_src, cond_tgt, edit: Edit, ctx: ObjectiveContext
    ) -> Start:
        """Try every (blend, injection) setting (and random start) once, keep the best per sample."""
        n, dev = len(batch), batch.images.device
        blends = [
            b
            for b in self.search.blend_fractions
            if b == 0 or (edit.latent_mask is not None and edit.templates is not None)
        ] or [0.0]
        injections = self.search.injection_fractions or (0.0,)
        if edit.plan is None and torch.equal(cond_src, cond_tgt):
            injections = (0.0,)  # nothing to inject: the settings would repeat one trajectory
        starts = [inv.latents[0]]
        if self.inversion.method == "none":
            starts += [
                per_sample_randn(inv.latents[0].shape[1:], batch.rngs).to(inv.latents[0])
                for _ in range(self.inversion.num_starts - 1)
            ]
        best = torch.full((n,), float("inf"), device=dev)
        inj, blend, start = (torch.zeros(n, dtype=torch.long, device=dev) for _ in range(3))
        settings = [(k, z, b, j) for k, z in enumerate(starts) for b, j in itertools.product(blends, injections)]
        if len(settings) == 1:  # nothing to choose: outer step 0 runs this trajectory anyway
            _, z_start, b, j = settings[0]
            full = functools.partial(torch.full, (n,), dtype=torch.long, device=dev)
            return Start(
                full(fraction_steps(j, self.num_steps)), full(fraction_steps(b, self.num_steps)), full(0), z_start
            )
        with torch.no_grad(), self.autocast_context(dev):
            for k, z_start, b, j in progress(settings, desc="DiG-IN search", unit="setting"):
                bs = torch.full((n,), fraction_steps(b, self.num_steps), dtype=torch.long, device=dev)
                js = torch.full((n,), fraction_steps(j, self.num_steps), dtype=torch.long, device=dev)
                x0s = self.run_trajectory(
                    z_start,
                    cond_src,
                    cond_tgt,
                    inv.uncond,
                    injection_steps=js,
                    blend_steps=bs,
                    templates=edit.templates,
                    latent_mask=edit.latent_mask,
                    attention=edit.plan,
                    paste=edit.paste,
                )
                loss = self.trajectory_loss(x0s, ctx, augmented=False).float()
                better = loss < best
                best = torch.where(better, loss, best)
                inj, blend = torch.where(better, js, inj), torch.where(better, bs, blend)
                start = torch.where(better, torch.full_like(start, k), start)
        return Start(inj, blend, start, torch.stack(starts)[start, torch.arange(n, device=dev)])
