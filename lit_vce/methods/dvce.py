"""DVCE: diffusion visual counterfactual explanations (Augustin et al., NeurIPS 2022).

Per-step guidance on the x0-prediction of a late-started ancestral sampler:
the gradient of the mean target log-softmax over augmented views of x0_hat
(one clean view plus random affine/perspective views) and the gradient of the
L1 distance to the original are each rescaled to the norm of the model's noise
prediction and combined with weights 0.1 and 0.15. The key idea, the cone
projection, keeps the explained classifier's gradient within ``alpha`` degrees
of a robust classifier's gradient, so non-robust classifiers are explained with
perceptually meaningful changes.

Published defaults: 200 respaced DDPM steps, the first 100 skipped, 16 views,
alpha = 30 degrees. Assumptions: the robust partner shares the label space.
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
    """DVCE with cone projection onto a robust classifier's gradient.

    Args:
        robust_classifier: spec of the robust partner (``None`` or ``""``: no
            projection; if it names the explained classifier, projection is a no-op).
        classifier_weight, distance_weight: weights of the rescaled gradients.
        num_augmentations: views of x0_hat per sample (the first is clean).
        cone_angle: alpha in degrees.
        **kwargs: sampler settings of :class:`PerStepGuidance` (defaults here:
            ancestral DDPM, 200 steps, skip half).
    """

    name = "dvce"

    def __init__(
        self,
        robust_classifier: str | ImageClassifier | None = "robust",
        classifier_weight: float = 0.1,
        distance_weight: float = 0.15,
        num_augmentations: int = 16,
        cone_angle: float = 30.0,
        scheduler: str = "ddpm",
        num_steps: int = 200,
        skip: float = 0.5,
        **kwargs,
    ):
        super().__init__(scheduler=scheduler, num_steps=num_steps, skip=skip, **kwargs)
        self.robust_spec = getattr(robust_classifier, "name", robust_classifier) or None
        self.robust = load_classifier(robust_classifier) if robust_classifier else None
        self.classifier_weight, self.distance_weight = classifier_weight, distance_weight
        self.num_augmentations, self.cone_angle = num_augmentations, cone_angle

    def describe(self) -> dict:
        return {**super().describe(), "robust_classifier": self.robust_spec, "classifier_weight": self.classifier_weight,
                "distance_weight": self.distance_weight, "num_augmentations": self.num_augmentations,
                "cone_angle": self.cone_angle}

    def _logp_grad(self, classifier, x0, views, batch) -> torch.Tensor:
        n = self.num_augmentations
        logp = F.log_softmax(classifier(views), dim=1)
        logp = logp.gather(1, batch.target.repeat_interleave(n)[:, None]).view(-1, n).mean(1)
        (g,) = torch.autograd.grad(logp.sum(), x0, retain_graph=True)
        return g

    def guidance(self, x0, batch, classifier, eps, to_xt):
        views = random_affine_perspective(x0, batch.generators, self.num_augmentations)
        g_cls = to_xt(self._logp_grad(classifier, x0, views, batch))
        if self.robust is not None and self.robust is not classifier:
            g_rob = to_xt(self._logp_grad(self.robust, x0, views, batch))
            g_cls = cone_projection(g_cls, g_rob, self.cone_angle)
        (g_dist,) = torch.autograd.grad(-(x0 - batch.images).abs().sum(), x0, retain_graph=True)
        g_dist = to_xt(g_dist)
        return self.classifier_weight * rescale_to(g_cls, eps) + self.distance_weight * rescale_to(g_dist, eps)
