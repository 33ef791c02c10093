"""ACE: adversarial counterfactual explanations (Jeanneret et al., CVPR 2023).

As the authors' code (``main.py``, ``core/attacks_and_models.py``) runs it:

1. **Pre-explanation**: PGD on ``x'`` (from ``x``) against ``CE(C(F_tau(x')), target)
   + l1_weight * |x - x'|_1 (+ l2_weight * |x - x'|_2)``, where ``F_tau`` noises to the
   respaced step tau - 1 (fresh noise at every iteration) and denoises with the
   ancestral sampler (x0 clipped, noise at every step but the last), gradients
   through the whole chain (gradient checkpointing of every UNet call keeps the
   memory of one call); ``x' <- proj(x' - step * sign(grad))``, the projection onto
   the l_inf (or l2) ball of radius ``eps`` and the [0, 1] box (published: eps 1,
   i.e. the box alone).
2. **Mask**: ``|x - x'|`` summed over channels, divided by its maximum, max-pooled
   over ``dilation`` pixels; the original is kept where it is below ``threshold``.
3. **Inpainting** (RePaint style): noise ``x'`` to tau - 1 and denoise, replacing the
   kept region of the input of every step by the original noised to that step; the
   result takes the original itself in the kept region.

ImageNet defaults: 100 PGD iterations of 1/255, l1 weight 0.001, 25 respaced steps
of which the last 5 (tau = 200 of 1000), dilation 15, threshold 0.15. The authors
ran ImageNet with batch size 1; the loss here is per sample, which is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..diffusion import Diffusion, PixelDiffusion
from ..objectives import ObjectiveContext, TargetCE
from ..registry import METHODS
from ..rngs import per_sample_randn
from .base import CounterfactualResult, VCEBatch, VCEMethod
from .parts import project_l2_box


def change_mask(x: torch.Tensor, edited: torch.Tensor, dilation: int) -> torch.Tensor:
    """ACE's mask: ``|x - edited|`` summed over channels, normalised by its per-image maximum
    and max-pooled over ``dilation`` (odd) pixels; (N, 1, H, W) in [0, 1]."""
    if dilation % 2 != 1:
        raise ValueError("dilation must be odd")
    m = (x - edited).abs().sum(1, keepdim=True)
    m = m / m.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return F.max_pool2d(m, dilation, stride=1, padding=dilation // 2)


@METHODS.register("ace")
class ACE(VCEMethod):
    """ACE: PGD through the denoising chain, then mask and RePaint-style inpainting (ImageNet defaults).

    Args:
        diffusion: a pixel :class:`~lit_vce.diffusion.Diffusion` with the ``adm`` sampler, or
            the spec :class:`~lit_vce.diffusion.PixelDiffusion` loads.
        num_steps: respaced steps over the whole range (published: 25).
        tau_fraction: the fraction of them run by ``F_tau`` and the inpainting (0.2: 5 steps).
        attack_steps, step_size: PGD iterations and step (100, 1/255).
        eps, norm: the PGD ball (``"linf"`` or ``"l2"``; eps 1 in l_inf = the box alone).
        l1_weight, l2_weight: the distance terms of the attack (0.001 and 0).
        dilation, threshold: the mask (15, 0.15).
        stochastic: draw the chain's noise (``False``: no noise, a deterministic filter).
        gradient_checkpointing: checkpoint every UNet call of the attack.
    """

    supports_concurrency = True
    region_mode = "compose"
    #: the edit pastes the original's pixels outside the change mask: resizing them there and
    #: back would alter the pixels ACE keeps, so another resolution is refused, not resized
    resolution = "exact"
    #: the sampler a prebuilt diffusion model must run (the registry-driven tests build one)
    diffusion_sampler = "adm"

    def __init__(
        self,
        diffusion: Diffusion | str = "world",
        num_steps: int = 25,
        tau_fraction: float = 0.2,
        attack_steps: int = 100,
        step_size: float = 1 / 255,
        eps: float = 1.0,
        norm: str = "linf",
        l1_weight: float = 0.001,
        l2_weight: float = 0.0,
        dilation: int = 15,
        threshold: float = 0.15,
        stochastic: bool = True,
        gradient_checkpointing: bool = True,
    ):
        super().__init__()
        if norm not in ("linf", "l2"):
            raise ValueError("norm must be 'linf' or 'l2'")
        if dilation % 2 != 1:
            raise ValueError("dilation must be odd")
        if isinstance(diffusion, str):
            diffusion = PixelDiffusion(diffusion, sampler="adm", num_steps=num_steps, clip_sample=True)
        if diffusion.sampler != "adm" or not isinstance(diffusion, PixelDiffusion):
            raise ValueError(
                "ACE runs a pixel diffusion model with guided-diffusion's ancestral sampler (sampler='adm')"
            )
        diffusion.clip_sample, diffusion.gradient_checkpointing = True, bool(gradient_checkpointing)
        self.diffusion = diffusion
        self.tau = max(1, int(tau_fraction * diffusion.num_steps))
        self.attack_steps, self.step_size, self.eps, self.norm = int(attack_steps), float(step_size), float(eps), norm
        self.l1_weight, self.l2_weight = float(l1_weight), float(l2_weight)
        self.dilation, self.threshold, self.stochastic = int(dilation), float(threshold), bool(stochastic)
        self.objective = TargetCE()

    @classmethod
    def test_kwargs(cls) -> dict:
        return {"num_steps": 10, "attack_steps": 2, "dilation": 3, "step_size": 8 / 255}

    def _noise(self, like: torch.Tensor, batch: VCEBatch) -> torch.Tensor:
        if not self.stochastic:
            return torch.zeros_like(like)
        return per_sample_randn(like.shape[1:], batch.rngs).to(like)

    def _cond(self, n: int):
        d = self.diffusion
        return d.null_condition(n) if d.has_null_condition else None

    def denoise(self, x: torch.Tensor, batch: VCEBatch, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``F_tau``: ``x`` (images in [0, 1]) noised to step tau - 1 and denoised to model space;
        with ``keep``, the kept region of every step's input is the original noised to that step."""
        d = self.diffusion
        cond, z = self._cond(len(x)), d.encode(x)
        orig = d.encode(batch.images) if keep is not None else None
        steps = list(range(self.tau - 1, -1, -1))
        z = d.add_noise(z, self._noise(z, batch), steps[0])
        for t in steps:
            if keep is not None:
                z = z * (1 - keep) + keep * d.add_noise(orig, self._noise(z, batch), t)
            out = d.p_mean_variance(d.model_output(z, t, cond), z, t)
            z = out["mean"] if t == 0 else out["mean"] + torch.exp(0.5 * out["log_variance"]) * self._noise(z, batch)
        return z

    def _project(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return (x + (x_adv - x).clamp(-self.eps, self.eps)).clamp(0, 1)
        return project_l2_box(x, x_adv, self.eps)

    def attack(self, batch: VCEBatch, classifier) -> torch.Tensor:
        """The pre-explanation: PGD on the classifier of the denoised image."""
        x = batch.images
        x_adv = x.clone()
        ctx = ObjectiveContext(x, batch.source, batch.target, classifier)
        from ..progress import steps

        for _ in steps(range(self.attack_steps), f"{self.name} attack steps", len(x)):
            with torch.enable_grad():
                z = x_adv.detach().requires_grad_(True)
                loss = self.objective((self.denoise(z, batch) + 1) / 2, ctx)  # the classifier sees the chain's output
                dist = (x - z).abs().flatten(1).sum(1) * self.l1_weight
                if self.l2_weight:
                    dist = dist + self.l2_weight * (x - z).flatten(1).norm(dim=1)
                (g,) = torch.autograd.grad((loss + dist).sum(), z)
            x_adv = self._project(x, x_adv - self.step_size * torch.sign(g))
            if batch.region is not None:  # the pre-explanation's perturbation projected onto the region
                x_adv = x + batch.region * (x_adv - x)
        return x_adv

    def counterfactuals(self, batch: VCEBatch, classifier) -> CounterfactualResult:
        """Pre-explanation, its change mask, then the masked diffusion edit (model resolution)."""
        x = batch.images
        pre = self.attack(batch, classifier)
        keep = (change_mask(x, pre, self.dilation) < self.threshold).float()
        if batch.region is not None:  # the edit stays inside the region: outside it, the original is kept
            keep = torch.maximum(keep, 1 - batch.region.to(keep))
        with torch.no_grad():
            edited = self.diffusion.decode(self.denoise(pre, batch, keep))
            images = keep * x + (1 - keep) * edited
            pre_probs = classifier(pre).softmax(1)
        diag = {
            "pre_explanation_target_confidence": pre_probs.gather(1, batch.target[:, None]).squeeze(1),
            "mask_fraction": (1 - keep).flatten(1).mean(1),
        }
        return CounterfactualResult(images, diag)
