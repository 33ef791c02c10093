"""Plain classifier guidance on x0-predictions: the reference member of the family.

At every step of a late-started reverse process, ascend
``scale * log p(target | x0_hat) - l1_weight * |x0_hat - x|_1`` with respect to
x_t (through the denoiser), in the style of Dhariwal & Nichol (2021) applied to
the clean estimate, as DiME/FastDiME and DVCE do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import METHODS
from .guided import PerStepGuidance
from .parts import rescale_to


@METHODS.register("classifier_guidance")
class ClassifierGuidance(PerStepGuidance):
    """Classifier guidance with an L1 distance regulariser and a late start.

    Args:
        scale: weight of the target log-probability gradient.
        l1_weight: weight of the L1 distance to the original (mean over pixels).
        normalize: rescale each term's gradient (on x_t) to the norm of the noise
            prediction before weighting, as DVCE does; the weights are then
            fractions of that norm and do not depend on the classifier's gradient
            magnitude (robust models have much smaller input gradients).
        **kwargs: sampler settings of :class:`PerStepGuidance`.
    """

    name = "classifier_guidance"

    def __init__(self, scale: float = 30.0, l1_weight: float = 30.0, normalize: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.l1_weight, self.normalize = scale, l1_weight, normalize

    def guidance(self, x0, batch, classifier, eps, to_xt, step):
        logp = F.log_softmax(classifier(x0), dim=1).gather(1, batch.target[:, None]).squeeze(1)
        l1 = (x0 - batch.images).abs().flatten(1).mean(1)
        if not self.normalize:
            (g_img,) = torch.autograd.grad((self.scale * logp - self.l1_weight * l1).sum(), x0, retain_graph=True)
            return to_xt(g_img)
        (g_cls,) = torch.autograd.grad(logp.sum(), x0, retain_graph=True)
        (g_l1,) = torch.autograd.grad(-l1.sum(), x0, retain_graph=True)
        return self.scale * rescale_to(to_xt(g_cls), eps) + self.l1_weight * rescale_to(to_xt(g_l1), eps)
