"""Plain classifier guidance on x0-predictions: the reference member of the family.

At every step of a late-started reverse process, descend the objective
``scale * TargetCE + l1_weight * L1Distance`` (``-log p(target | x0_hat)`` plus
the mean absolute change; any :class:`~lit_vce.objectives.Objective` can replace it)
with respect to x_t (through the denoiser), in the style of Dhariwal & Nichol
(2021) applied to the clean estimate, as DiME/FastDiME and DVCE do.
"""

from __future__ import annotations

from ..objectives import L1Distance, Objective, ObjectiveContext, TargetCE
from ..registry import METHODS
from .guided import PerStepGuidance
from .parts import objective_guidance


@METHODS.register("classifier_guidance")
class ClassifierGuidance(PerStepGuidance):
    """Classifier guidance with an L1 distance regulariser and a late start.

    Args:
        scale: weight of the target cross-entropy (``-log p(target | x0_hat)``).
        l1_weight: weight of the L1 distance to the original (mean over pixels).
        normalize: rescale each term's gradient (on x_t) to the norm of the noise
            prediction before weighting, as DVCE does; the weights are then
            fractions of that norm and do not depend on the classifier's gradient
            magnitude (robust models have much smaller input gradients).
        objective: a custom :class:`~lit_vce.objectives.Objective` on the x0-prediction
            (replaces ``scale`` and ``l1_weight``).
        **kwargs: sampler settings of :class:`PerStepGuidance`.
    """

    def __init__(
        self,
        scale: float = 30.0,
        l1_weight: float = 30.0,
        normalize: bool = False,
        objective: Objective | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.scale, self.l1_weight, self.normalize = scale, l1_weight, normalize
        self.objective = objective if objective is not None else scale * TargetCE() + l1_weight * L1Distance()

    def guidance(self, x0, batch, classifier, eps, to_xt, step):
        ctx = ObjectiveContext(batch.images, batch.source, batch.target, classifier, batch.mask)
        return objective_guidance(self.objective, x0, ctx, to_xt, eps if self.normalize else None)
