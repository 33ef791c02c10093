"""FastDiME (Weng et al., 2023): DiME's guidance on the one-step x0-prediction, with a self-optimised mask.

As the authors' code (``get_FastDiME_iterative_sampling``) runs it: noise the
image to ``tau`` (60 of 200 respaced steps), then at every ancestral step shift
the posterior mean by ``-variance * grad``, with ``grad`` the gradient of
``-scale * logit_target`` at the previous step's (masked) x0-prediction (not
through the denoiser) plus ``l1_weight * sign(z_t - x)`` on the noisy sample.
After ``warmup`` steps, the mask keeps the original where the normalised,
dilated ``|x0_hat - x|`` is below ``threshold``: the x0-prediction takes the
original there and the new sample the original noised to the step's level;
the result takes the clean original outside the mask. Samples that do not
flip are retried with the next, larger classifier scale (8, 10, 15). The
perceptual term of the published CelebA run (VGG-19 layer 18, weight 30) is
``perceptual_weight``; off by default, as in the code, since it needs
torchvision's VGG-19 weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..objectives import ObjectiveContext, VGGPerceptual
from ..rngs import per_sample_randn
from ..registry import METHODS
from .guided import PerStepGuidance, Step
from .parts import scale_attempts


@METHODS.register("fastdime")
class FastDiME(PerStepGuidance):
    """FastDiME: one-step x0 guidance and a self-optimised mask (published CelebA defaults).

    Args:
        scales: classifier scales tried in turn for the samples not flipped yet.
        l1_weight: weight of the L1 distance of the noisy sample to the image.
        use_logits: guide the target logit (published) instead of its log-probability.
        warmup, dilation, threshold: the mask starts after ``warmup`` steps; max-filter
            size and threshold of the normalised difference.
        noise_offset: 1, as the code: the image is noised to ``start_step`` (60) and the first
            guided step is 59 (see :class:`PerStepGuidance`).
        perceptual_weight, perceptual_layer, perceptual_weights: the VGG-19 perceptual term
            between the (masked) x0-prediction and the image, as ``dist_cond_fn`` adds it with
            ``scale_grads`` off (published CelebA run, ``run_fastdime.sh``: 30 at layer 18; 0 =
            off, the code's default); weights from a local file, ``$LIT_VCE_VGG_WEIGHTS`` or
            ``$LIT_VCE_WEIGHTS_DIR/vgg/`` (:func:`lit_vce.objectives.load_vgg19_features`).
        **kwargs: sampler settings (defaults: ``adm`` sampler, 200 steps, 60 guided).
    """

    def __init__(
        self,
        scales: tuple[float, ...] = (8.0, 10.0, 15.0),
        l1_weight: float = 0.05,
        use_logits: bool = True,
        warmup: int = 30,
        dilation: int = 5,
        threshold: float = 0.15,
        sampler: str = "adm",
        num_steps: int = 200,
        skip: float = 0.7,
        through_unet: bool = False,
        output: str = "sample",
        noise_offset: int = 1,
        perceptual_weight: float = 0.0,
        perceptual_layer: int = 18,
        perceptual_weights: str | None = None,
        **kwargs,
    ):
        super().__init__(
            sampler=sampler,
            num_steps=num_steps,
            skip=skip,
            through_unet=through_unet,
            output=output,
            noise_offset=noise_offset,
            **kwargs,
        )
        self.perceptual_weight = float(perceptual_weight)
        self.perceptual = VGGPerceptual(perceptual_layer, perceptual_weights) if self.perceptual_weight else None
        if dilation % 2 != 1:
            raise ValueError("dilation must be odd")
        self.scales, self.scale = tuple(scales), float(scales[0])
        self.l1_weight, self.use_logits = l1_weight, use_logits
        self.warmup, self.dilation, self.threshold = warmup, dilation, threshold

    @classmethod
    def test_kwargs(cls) -> dict:
        return {"num_steps": 10, "warmup": 1, "scales": (8.0, 15.0)}

    def guidance(self, x0, batch, classifier, eps, to_xt, step: Step):
        x = step.state.get("x0", batch.images).detach().requires_grad_(True)  # the previous (masked) x0-prediction
        logits = classifier(x)
        score = logits if self.use_logits else logits.log_softmax(1)
        objective = score.gather(1, batch.target[:, None]).sum() * self.scale
        if self.perceptual is not None:  # dist_cond_fn's l_perc on x_t (the x0-prediction), not scaled by sqrt(abar_t)
            ctx = ObjectiveContext(batch.images, batch.source, batch.target, classifier)
            objective = objective - self.perceptual_weight * self.perceptual(x, ctx).sum()
        (g,) = torch.autograd.grad(objective, x)
        return 0.5 * g - self.l1_weight * torch.sign(step.x_t - self.diffusion.encode(batch.images))

    def post_step(self, x_t, step: Step, batch, state):
        x0 = step.x0
        if step.index >= self.warmup:
            diff = (x0 - batch.images).abs().sum(1, keepdim=True)
            diff = diff / diff.amax((1, 2, 3), keepdim=True).clamp_min(1e-12)
            keep = (F.max_pool2d(diff, self.dilation, 1, self.dilation // 2) < self.threshold).float()
            x0 = x0 * (1 - keep) + keep * batch.images
            clean = self.diffusion.encode(batch.images)
            noise = per_sample_randn(clean.shape[1:], batch.rngs).to(clean)
            orig = clean if step.last else self.diffusion.add_noise(clean, noise, step.t)
            x_t = x_t * (1 - keep) + keep * orig
        state["x0"] = x0
        return x_t

    def attempts(self):
        return scale_attempts(self)
