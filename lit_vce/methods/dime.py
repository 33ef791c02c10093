"""DiME (Jeanneret et al., ACCV 2022): guidance on a clean image obtained by a full
unguided denoising of the current noisy sample.

As the authors' code (``get_DiME_iterative_sampling``) runs it: noise the image to
``tau`` (60 of 200 respaced steps), then at every ancestral step shift the
posterior mean by ``variance * g`` with ``g = 0.5 * scale * grad(logit_target)(x_c)
/ sqrt(abar_t) - l1_weight * sign(z_t - x)``, where ``x_c`` is the clean estimate
of the current sample (the image itself at the first step). After the step the
clean estimate of the new sample is recomputed by running the unguided ancestral
sampler from it down to t = 0 (x0 clipped, noise drawn): ``tau - k`` UNet calls at
step k, O(tau^2) in all. ``max_inner_steps`` caps that nested denoising at a
deterministic DDIM jump over that many evenly spaced steps (not in the paper; its
effect is measured by ``benchmarks/dime_cost.py``). Samples that do not flip are
retried with the next classifier scale (8, 10, 15). The perceptual term (published
CelebA run: weight 30 on the VGG-19 features of layer 18, between the clean estimate
and the image) adds ``-perceptual_weight * grad(perceptual)(x_c) / sqrt(abar_t)``; it
needs torchvision's VGG-19 weights (:func:`lit_vce.objectives.load_vgg19_features`),
so it is off unless ``perceptual_weight`` is set.
"""

from __future__ import annotations

import torch

from ..objectives import ObjectiveContext, VGGPerceptual
from ..registry import METHODS
from .base import VCEBatch
from .guided import PerStepGuidance, Step
from .parts import scale_attempts


@METHODS.register("dime")
class DiME(PerStepGuidance):
    """DiME: guidance on a nested unguided denoise of every noisy sample (published CelebA defaults).

    Args:
        scales: classifier scales tried in turn for the samples not flipped yet.
        l1_weight: weight of the L1 distance of the noisy sample to the image.
        use_logits: guide the target logit instead of its log-probability (the published
            CelebA run guides the logit; the code's default is the log-probability).
        max_inner_steps: cap on the nested denoising steps (``None``: all, as published).
        perceptual_weight, perceptual_layer, perceptual_weights: the VGG-19 perceptual term
            (published CelebA run: 30 at layer 18; 0 = off, the code's default) and a local
            weights file (else ``$LIT_VCE_VGG_WEIGHTS`` or ``$LIT_VCE_WEIGHTS_DIR/vgg/``).
        noise_offset: 1, as the code: the image is noised to ``start_step`` (60) and the first
            guided step is 59 (see :class:`PerStepGuidance`).
        **kwargs: sampler settings (defaults: ``adm`` sampler, 200 steps, the last 60 guided,
            x0 clipped).
    """

    def __init__(
        self,
        scales: tuple[float, ...] = (8.0, 10.0, 15.0),
        l1_weight: float = 0.05,
        use_logits: bool = True,
        max_inner_steps: int | None = None,
        perceptual_weight: float = 0.0,
        perceptual_layer: int = 18,
        perceptual_weights: str | None = None,
        sampler: str = "adm",
        num_steps: int = 200,
        skip: float = 0.7,
        through_unet: bool = False,
        output: str = "sample",
        clip_sample: bool = True,
        noise_offset: int = 1,
        **kwargs,
    ):
        super().__init__(
            sampler=sampler,
            num_steps=num_steps,
            skip=skip,
            through_unet=through_unet,
            output=output,
            clip_sample=clip_sample,
            noise_offset=noise_offset,
            **kwargs,
        )
        if self.diffusion.sampler != "adm":
            raise ValueError("DiME runs guided-diffusion's ancestral sampler (sampler='adm')")
        if max_inner_steps is not None and max_inner_steps < 1:
            raise ValueError("max_inner_steps must be >= 1 or None")
        self.scales, self.scale = tuple(scales), float(scales[0])
        self.l1_weight, self.use_logits, self.max_inner_steps = l1_weight, use_logits, max_inner_steps
        self.perceptual_weight = float(perceptual_weight)
        self.perceptual = VGGPerceptual(perceptual_layer, perceptual_weights) if self.perceptual_weight else None

    @classmethod
    def test_kwargs(cls) -> dict:
        return {"num_steps": 10, "scales": (8.0, 15.0), "max_inner_steps": 2}

    def guidance(self, x0, batch, classifier, eps, to_xt, step: Step):
        x = step.state.get("clean", batch.images).detach().requires_grad_(True)
        logits = classifier(x)
        score = logits if self.use_logits else logits.log_softmax(1)
        objective = score.gather(1, batch.target[:, None]).sum() * self.scale
        if self.perceptual is not None:
            ctx = ObjectiveContext(batch.images, batch.source, batch.target, classifier)
            objective = objective - self.perceptual_weight * self.perceptual(x, ctx).sum()
        (g,) = torch.autograd.grad(objective, x)
        scale = 0.5 / step.alpha_bar.sqrt().to(g)  # image -> model space, DiME's 1 / sqrt(abar_t)
        return scale * g - self.l1_weight * torch.sign(step.x_t - self.diffusion.encode(batch.images))

    def post_step(self, x_t, step: Step, batch, state):
        if not step.last:
            state["clean"] = self.clean_estimate(x_t, step.next_t, batch)
            calls = state.setdefault("diagnostics", {}).get("nested_unet_calls", torch.zeros(len(batch)))
            state["diagnostics"]["nested_unet_calls"] = calls + self._inner_calls(step.next_t)
        return x_t

    def _inner_calls(self, t: int) -> int:
        n = int(t) + 1
        return n if self.max_inner_steps is None else min(n, self.max_inner_steps)

    @torch.no_grad()
    def clean_estimate(self, z: torch.Tensor, t: int, batch: VCEBatch) -> torch.Tensor:
        """The clean image (in [0, 1]) of the noisy sample ``z`` at respaced step ``t``: the
        unguided ancestral sampler from ``t`` to 0, or, past ``max_inner_steps``, a DDIM jump
        over that many evenly spaced steps."""
        d = self.diffusion
        cond, uncond = self._conditions(batch)
        ts = list(range(int(t), -1, -1))
        if self.max_inner_steps is None or len(ts) <= self.max_inner_steps:
            for s in ts:
                out = d.p_mean_variance(d.model_output(z, s, cond, uncond, self.cfg_scale), z, s)
                z = d.p_sample(out["mean"], out["log_variance"], s, batch.rngs)
            return d.decode(z)
        k = self.max_inner_steps
        picks = sorted({round(int(t) * (1 - j / (k - 1))) for j in range(k)} if k > 1 else {int(t)}, reverse=True)
        for s, nxt in zip(picks, picks[1:] + [None]):
            out = d.p_mean_variance(d.model_output(z, s, cond, uncond, self.cfg_scale), z, s)
            if nxt is None:
                return d.decode(out["pred_xstart"])
            a = d.alpha_bar(nxt).to(z)
            z = a.sqrt() * out["pred_xstart"] + (1 - a).sqrt() * out["eps"]
        return d.decode(z)

    def attempts(self):
        return scale_attempts(self)
