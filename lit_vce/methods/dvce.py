"""DVCE: diffusion visual counterfactual explanations (Augustin et al., NeurIPS 2022).

Per-step guidance on the x0-prediction of a late-started ancestral sampler, as
the official code (valentyn1boreiko/DVCEs, ``dff_attack.py``, ``cond_fn_clean``)
runs it:

- sampler: guided-diffusion's respaced ancestral sampler (1000 steps respaced
  to 200, the first 100 skipped: the input is noised to respaced step 99),
  x0 not clipped inside the step, guidance as a shift of the posterior mean by
  variance * gradient (the model's learned variance for ADM checkpoints); the
  result is the last step's x0-prediction;
- classifier term: the gradient, with respect to x_t through the denoiser, of
  the target log-softmax of the x0-prediction (mean over ``num_augmentations``
  views; the official DVCE path uses the clean view only);
- the cone projection: with a robust partner, the **explained** classifier's
  gradient is the cone's axis and the robust gradient is projected onto the
  cone of half-angle ``cone_angle`` around it when it lies outside, so the
  guidance always lies within ``cone_angle`` of the explained classifier's
  ascent direction while following the robust model's perceptually aligned
  gradient;
- distance term: the gradient of ``|x0_hat - x|_1`` with respect to x0_hat,
  i.e. ``sign(x0_hat - x)``, applied to x_t directly (not through the denoiser);
- each term rescaled to the norm of the model's noise prediction, weights
  0.1 (classifier) and 0.15 (distance).

Deviations and their measured effects: ``docs/parity.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..classifiers.base import ImageClassifier
from ..classifiers.loaders import load_classifier
from ..registry import METHODS
from .guided import PerStepGuidance
from .parts import cone_projection, random_affine_perspective, rescale_to


@METHODS.register("dvce")
class DVCE(PerStepGuidance):
    """DVCE with the cone projection around the explained classifier's gradient.

    Args:
        robust_classifier: spec of the robust partner (``None`` or ``""``: no
            projection, the explained classifier's own gradient guides; if it
            names the explained classifier, projection is a no-op).
        classifier_weight, distance_weight: weights of the rescaled gradients.
        num_augmentations: views of x0_hat per sample (the first is clean; 1 =
            the clean view only, as the official DVCE path).
        cone_angle: alpha in degrees.
        distance_through_unet: differentiate the L1 term through the denoiser
            (``False``: ``sign(x0_hat - x)`` on x_t, as published).
        **kwargs: sampler settings of :class:`PerStepGuidance` (defaults here:
            ``adm`` sampler, 200 steps, skip half, no clipping).
    """

    name = "dvce"

    def __init__(
        self,
        robust_classifier: str | ImageClassifier | None = "robust",
        classifier_weight: float = 0.1,
        distance_weight: float = 0.15,
        num_augmentations: int = 1,
        cone_angle: float = 30.0,
        distance_through_unet: bool = False,
        sampler: str = "adm",
        num_steps: int = 200,
        skip: float = 0.5,
        clip_sample: bool = False,
        **kwargs,
    ):
        super().__init__(sampler=sampler, num_steps=num_steps, skip=skip, clip_sample=clip_sample, **kwargs)
        self.robust = load_classifier(robust_classifier) if robust_classifier else None
        self.classifier_weight, self.distance_weight = classifier_weight, distance_weight
        self.num_augmentations, self.cone_angle = num_augmentations, cone_angle
        self.distance_through_unet = distance_through_unet

    @classmethod
    def test_kwargs(cls) -> dict:
        return {"num_steps": 10, "num_augmentations": 2}  # the augmented branch and the cone

    def describe(self) -> dict:
        return {**super().describe(), "cone": "axis = explained classifier's gradient, projected = robust partner's"}

    def _logp_grad(self, classifier, x0, views, batch) -> torch.Tensor:
        n = self.num_augmentations
        logp = F.log_softmax(classifier(views), dim=1)
        logp = logp.gather(1, batch.target.repeat_interleave(n)[:, None]).view(-1, n).mean(1)
        (g,) = torch.autograd.grad(logp.sum(), x0, retain_graph=True)
        return g

    def guidance(self, x0, batch, classifier, eps, to_xt, step):
        views = x0 if self.num_augmentations == 1 else random_affine_perspective(x0, batch.rngs, self.num_augmentations)
        g_cls = to_xt(self._logp_grad(classifier, x0, views, batch))
        if self.robust is not None and self.robust is not classifier:
            g_rob = to_xt(self._logp_grad(self.robust, x0, views, batch))
            g_cls = cone_projection(g_cls, g_rob, self.cone_angle)
        if self.distance_through_unet:
            (g_dist,) = torch.autograd.grad(-(x0 - batch.images).abs().sum(), x0, retain_graph=True)
            g_dist = to_xt(g_dist)
        else:
            g_dist = -torch.sign(x0.detach() - batch.images)
        return self.classifier_weight * rescale_to(g_cls, eps) + self.distance_weight * rescale_to(g_dist, eps)
