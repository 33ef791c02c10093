"""The per-step guided sampler shared by classifier guidance, DVCE and their relatives.

Noise the input to a late start step, then run the reverse process; at every
step a guidance gradient (computed on the x0-prediction, differentiated with
respect to x_t through the denoiser) shifts the noise prediction:
``eps' = eps - sqrt(1 - abar_t) * g`` (Dhariwal & Nichol, 2021). For ancestral
DDPM steps this moves the posterior mean by ``beta_t / sqrt(alpha_t) * g``,
i.e. by about ``Sigma_t * g``.

Subclasses implement :meth:`PerStepGuidance.guidance`, the only method-specific part.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..generators.noise import per_sample_randn
from ..generators.pixel import PixelDiffusion
from .base import CounterfactualResult, VCEBatch, VCEMethod, concat_results, split_batch


def vjp(output: torch.Tensor, inputs: torch.Tensor, v: torch.Tensor, retain_graph: bool = True) -> torch.Tensor:
    """``v^T d output / d inputs`` (zeros where the graph does not connect)."""
    (g,) = torch.autograd.grad(output, inputs, grad_outputs=v, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(inputs) if g is None else g


class PerStepGuidance(VCEMethod):
    """Base for per-step guidance on the x0-prediction.

    Args:
        generator: a :class:`PixelDiffusion` or the name/folder it loads
            (default: the world's ``ddpm``).
        scheduler: ``"ddim"`` (deterministic) or ``"ddpm"`` (ancestral).
        num_steps: respaced steps over the whole noise range.
        skip: fraction of those steps skipped at the noisy end (late start):
            the input is noised to the first step after the skipped ones.
        conditioning: ``"none"`` (unconditional / null class) or ``"target"``
            (class-conditional on the target, with ``cfg_scale``).
        cfg_scale: classifier-free guidance scale when conditioning on the target.
        through_unet: differentiate the x0 gradient through the denoiser
            (exact); ``False`` uses the x0 gradient directly (cheaper).
        inner_batch_size: split each batch into chunks of this size (memory knob;
            outputs do not change).
    """

    name = "per_step_guidance"

    def __init__(
        self,
        generator: PixelDiffusion | str = "world",
        scheduler: str = "ddim",
        num_steps: int = 50,
        skip: float = 0.5,
        conditioning: str = "none",
        cfg_scale: float = 1.0,
        through_unet: bool = True,
        inner_batch_size: int | None = None,
    ):
        super().__init__()
        if not 0 <= skip < 1:
            raise ValueError("skip must be in [0, 1)")
        if conditioning not in ("none", "target"):
            raise ValueError("conditioning must be 'none' or 'target'")
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        if isinstance(generator, str):
            generator = PixelDiffusion(generator, scheduler=scheduler, num_inference_steps=num_steps)
        self.generator = generator
        self.skip, self.conditioning, self.cfg_scale = skip, conditioning, cfg_scale
        self.through_unet, self.inner_batch_size = through_unet, inner_batch_size

    def describe(self) -> dict:
        return {
            "name": self.name, "scheduler": self.generator.scheduler_kind, "num_steps": self.generator.num_inference_steps,
            "skip": self.skip, "conditioning": self.conditioning, "cfg_scale": self.cfg_scale, "through_unet": self.through_unet,
        }

    # --- the method-specific part --------------------------------------------
    def guidance(self, x0: torch.Tensor, batch: VCEBatch, classifier, eps: torch.Tensor, to_xt) -> torch.Tensor:
        """The ascent direction on x_t (same shape as ``x0``).

        ``x0`` is the x0-prediction as an image in [0, 1] (part of the autograd
        graph); ``to_xt(v)`` maps an image-space gradient to x_t (a VJP through
        the denoiser, or the identity scaled to model space).
        """
        raise NotImplementedError

    # --- the sampler -----------------------------------------------------------
    def start_index(self) -> int:
        return min(int(round(self.skip * len(self.generator.timesteps))), len(self.generator.timesteps) - 1)

    def generate(self, batch: VCEBatch, classifier) -> CounterfactualResult:
        k = self.inner_batch_size
        if not k or k >= len(batch):
            return self._generate(batch, classifier)
        return concat_results([self._generate(b, classifier) for b in split_batch(batch, k)])

    def _generate(self, batch: VCEBatch, classifier) -> CounterfactualResult:
        gen = self.generator
        size_in = batch.images.shape[-2:]
        original = batch.images
        images = batch.images
        if images.shape[-1] != gen.image_size or images.shape[-2] != gen.image_size:
            # the sampler, and so the guidance terms, work at the generator's resolution
            images = F.interpolate(images, size=(gen.image_size, gen.image_size), mode="bilinear", antialias=True, align_corners=False)
            mask = None if batch.mask is None else F.interpolate(batch.mask.float(), size=images.shape[-2:], mode="nearest")
            batch = dataclasses.replace(batch, images=images, mask=mask)
        n = len(images)
        x = gen.encode(images)
        steps = gen.timesteps[self.start_index():]
        x_t = gen.add_noise(x, per_sample_randn(x.shape[1:], batch.generators).to(x), int(steps[0]))
        labels = batch.target if self.conditioning == "target" else None
        failure: list[str | None] = [None] * n
        ok = torch.ones(n, dtype=torch.bool, device=x.device)
        for t in steps:
            t = int(t)
            with torch.enable_grad():
                xt = x_t.detach().requires_grad_(True)
                eps = gen.eps(xt, t, labels, self.cfg_scale)
                x0 = gen.predict_x0(xt, eps, t)
                img0 = (x0 + 1) / 2

                def to_xt(v, _img0=img0, _xt=xt):
                    return vjp(_img0, _xt, v) if self.through_unet else v * 0.5 / gen.alpha_bar(t).sqrt()

                if not self.through_unet:
                    img0_d = img0.detach().requires_grad_(True)
                    grad = self.guidance(img0_d, batch, classifier, eps.detach(), to_xt)
                else:
                    grad = self.guidance(img0, batch, classifier, eps.detach(), to_xt)
            finite = torch.isfinite(grad).flatten(1).all(1)
            for i in torch.nonzero(~finite & ok).flatten().tolist():
                failure[i] = f"non-finite guidance gradient at t={t}"
            ok &= finite
            grad = torch.where(ok.view(-1, 1, 1, 1), torch.nan_to_num(grad, 0.0, 0.0, 0.0), torch.zeros_like(grad))
            eps_g = eps.detach() - (1 - gen.alpha_bar(t)).sqrt().to(eps) * grad
            x_t = gen.step(eps_g, t, x_t.detach(), batch.generators).detach()
        out = gen.decode(x_t)
        if out.shape[-2:] != size_in:
            out = F.interpolate(out, size=tuple(size_in), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        # failed samples return the original image
        out = torch.where(ok.view(-1, 1, 1, 1), out, original)
        with torch.no_grad():
            probs = classifier(out).softmax(1)
        diag = {
            "target_confidence": probs.gather(1, batch.target[:, None]).squeeze(1),
            "steps": torch.full((n,), len(steps), dtype=torch.float32),
        }
        return CounterfactualResult(out.detach(), diag, failure)
