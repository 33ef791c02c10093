"""Inverting the deterministic sampler, for any method and any :class:`~lit_vce.diffusion.Diffusion`:
DDIM inversion (diffusers' ``DDIMInverseScheduler``), null-text inversion (Mokady et al.,
2023, as the DiG-IN code runs it) and plain inversion (DDIM inversion with the null
embedding). Each returns an :class:`Inversion`; ``Diffusion.invert``,
``Diffusion.null_text_inversion`` and ``Diffusion.plain_inversion`` call these."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..progress import progress


@dataclass
class Inversion:
    """An inversion of the deterministic sampler: ``latents[i]`` is the latent at the
    input of sampling step i (``latents[0]`` = z_T), ``latents[-1]`` the clean latent;
    ``uncond[i]`` the unconditional embedding of step i (optimised by null-text inversion)."""

    latents: list[torch.Tensor]
    uncond: list[torch.Tensor]
    reconstruction_error: float | None = None
    #: the reconstruction trajectory (CFG with ``uncond`` from z_T): its latent at the input
    #: of every step, when the inversion ran it (null-text inversion does)
    trajectory: list[torch.Tensor] | None = None
    #: what an attention ``control`` recorded on the conditional calls of that trajectory
    store: object | None = None
    #: (N,) the reconstruction's MSE per sample (``reconstruction_error`` is their batch mean)
    errors: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.latents[0])

    def select(self, idx: list[int]) -> "Inversion":
        """The samples at positions ``idx`` (``store`` is dropped: it records the whole batch)."""
        pick = torch.tensor(idx, dtype=torch.long, device=self.latents[0].device)

        def take(xs):
            return None if xs is None else [x[pick] for x in xs]

        errors = None if self.errors is None else self.errors[pick.to(self.errors.device)]
        return Inversion(
            take(self.latents),
            take(self.uncond),
            None if errors is None else float(errors.mean()),
            take(self.trajectory),
            None,
            errors,
        )

    @staticmethod
    def concat(parts: list["Inversion"], order: list[int]) -> "Inversion":
        """The inverse of :meth:`select`: ``parts`` hold the samples ``order`` lists, in turn;
        the result has them at their positions (``store`` only when one part is the batch)."""

        def cat(xs_list):
            if any(xs is None for xs in xs_list):
                return None
            return [torch.cat(xs)[inverse] for xs in zip(*xs_list)]

        inverse = torch.argsort(torch.tensor(order)).to(parts[0].latents[0].device)
        errors = None if any(p.errors is None for p in parts) else torch.cat([p.errors for p in parts])[inverse.cpu()]
        store = parts[0].store if len(parts) == 1 else None
        return Inversion(
            cat([p.latents for p in parts]),
            cat([p.uncond for p in parts]),
            None if errors is None else float(errors.mean()),
            cat([p.trajectory for p in parts]),
            store,
            errors,
        )


@torch.no_grad()
def ddim_inversion(d, z0: torch.Tensor, cond) -> list[torch.Tensor]:
    """DDIM inversion with the conditional model (no CFG), by diffusers'
    ``DDIMInverseScheduler``: [z_T, ..., z_0], aligned with ``d.timesteps``."""
    inverse = d.inverse_scheduler()
    z, out = z0, [z0]
    for t in inverse.timesteps:
        z = inverse.step(d.eps(z, t, cond), int(t), z).prev_sample
        out.append(z)
    return out[::-1]


def null_text_inversion(
    d,
    z0: torch.Tensor,
    cond,
    inner_steps: int = 10,
    lr: float = 1e-2,
    tol: float = 1e-5,
    scale: float | None = None,
    checkpoint: bool | None = None,
    reuse_conditional: bool = False,
    control=None,
) -> Inversion:
    """DDIM inversion, then per-step unconditional embeddings optimised (Adam) so that
    the CFG trajectory from z_T retraces the inverted latents (Mokady et al., 2023).

    As the official DiG-IN/null-text code: at step i Adam runs with learning rate
    ``lr * (1 - i / 100)`` for at most ``inner_steps`` steps and stops once the
    loss (the MSE to the inverted latent, computed before the update) falls
    below ``tol + i * 2e-5``, checked after the update. Each sample stops on its
    own loss, so the batch does not matter.

    ``checkpoint`` overrides ``d.gradient_checkpointing`` for the inner steps (one
    UNet call's activations at a time: checkpointing them only recomputes).
    ``reuse_conditional`` advances each step with the conditional noise prediction
    computed before the inner loop (it does not change) instead of a second CFG
    call: one unconditional call instead of a batch of two. ``control(i)`` (an attention
    control, e.g. a recorder) acts on step i's conditional call. The returned
    inversion holds the reconstruction trajectory it ran (``trajectory``).
    """
    target = d.invert(z0, cond)
    n, s = len(z0), d.guidance_scale if scale is None else float(scale)
    u = d.null_condition(n).detach()
    uncond, z, trajectory = [], target[0], []
    for i, t in enumerate(progress(d.timesteps, desc="null-text inversion", unit="step")):
        trajectory.append(z)
        u = u.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr * (1.0 - i / 100.0))
        with torch.no_grad():
            e_c = d.eps(z, t, cond, control=None if control is None else control(i))
        done = torch.zeros(n, dtype=torch.bool, device=z.device)
        for _ in range(inner_steps):
            with torch.enable_grad():
                e_u = d.eps(z, t, u, checkpoint=checkpoint)
                pred, _ = d.step(e_u + s * (e_c - e_u), t, z)
                per_sample = (pred - target[i + 1]).pow(2).flatten(1).mean(1)
                opt.zero_grad()
                per_sample.sum().backward()  # a sum: each sample's gradient is its own
            kept = u.detach()[done].clone()
            opt.step()
            with torch.no_grad():
                u[done] = kept  # samples that stopped earlier keep their embedding
            done |= per_sample.detach() < tol + i * 2e-5
            if done.all():
                break
        with torch.no_grad():
            if reuse_conditional and s != 1.0:
                e_u = d.eps(z, t, u.detach())
                z, _ = d.step(e_u + s * (e_c - e_u), t, z)
            else:
                z, _ = d.step(d.eps(z, t, cond, u.detach(), s), t, z)
        uncond.append(u.detach())
    return Inversion(target, uncond, float(F.mse_loss(z, z0)), trajectory, errors=_per_sample_mse(z, z0))


def plain_inversion(d, z0: torch.Tensor, cond, scale: float | None = None) -> Inversion:
    """DDIM inversion with the null embedding as unconditional at every step."""
    target = d.invert(z0, cond)
    u = d.null_condition(len(z0))
    with torch.no_grad():
        z = target[0]
        for t in d.timesteps:
            z, _ = d.step(d.eps(z, t, cond, u, scale), t, z)
    return Inversion(target, [u] * d.num_steps, float(F.mse_loss(z, z0)), errors=_per_sample_mse(z, z0))


def _per_sample_mse(z: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    return (z.float() - z0.float()).pow(2).flatten(1).mean(1).detach().cpu()
