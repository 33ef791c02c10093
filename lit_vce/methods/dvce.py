"""DVCE: diffusion visual counterfactual explanations (Augustin et al., NeurIPS 2022).

Per-step guidance on the x0-prediction of a late-started ancestral sampler, as
the official code (valentyn1boreiko/DVCEs, ``dff_attack.py``, ``cond_fn_clean``)
runs it:

- sampler: guided-diffusion's respaced ancestral sampler (1000 steps respaced
  to 200, the first 100 skipped: the input is noised to respaced step 99),
  x0 not clipped inside the step, guidance as a shift of the posterior mean by
  variance * gradient (the model's learned variance for ADM checkpoints); the
  result is the last step's x0-prediction;
- the objective ``classifier_weight * TargetCE + distance_weight * L1Distance(sum)``,
  each term's gradient on its own:
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

import dataclasses

from ..classifiers.base import ImageClassifier
from ..classifiers.loaders import load_classifier
from ..objectives import L1Distance, Objective, ObjectiveContext, TargetCE
from ..registry import METHODS
from ..weights import needed
from .guided import PerStepGuidance
from .parts import ascent, cone_projection, random_affine_perspective, rescale_to


@METHODS.register("dvce")
class DVCE(PerStepGuidance):
    """DVCE with the cone projection around the explained classifier's gradient.

    Args:
        robust_classifier: spec of the robust partner (``None`` or ``""``: no
            projection, the explained classifier's own gradient guides; if it
            names the explained classifier, projection is a no-op).
        classifier_weight, distance_weight: weights of the rescaled gradients of the
            objective ``classifier_weight * TargetCE + distance_weight * L1Distance(sum)``.
        objective: a custom :class:`~lit_vce.objectives.Objective` (replaces the two
            weights): each weighted term's gradient is rescaled to the noise prediction's
            norm; classifier terms go through the denoiser and the cone, the others
            through the denoiser only with ``distance_through_unet``.
        num_augmentations: views of x0_hat per sample (the first is clean; 1 =
            the clean view only, as the official DVCE path), drawn once per step and
            shared by both classifiers.
        cone_angle: alpha in degrees.
        distance_through_unet: differentiate the distance terms through the denoiser
            (``False``: their x0 gradient, ``sign(x0_hat - x)``, on x_t, as published).
        **kwargs: sampler settings of :class:`PerStepGuidance` (defaults here:
            ``adm`` sampler, 200 steps, skip half, no clipping).
    """

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
        objective: Objective | None = None,
        **kwargs,
    ):
        # the partner first: with both its and the diffusion model's weights missing, fetch names both
        robust = needed(load_classifier, robust_classifier) if robust_classifier else None
        super().__init__(sampler=sampler, num_steps=num_steps, skip=skip, clip_sample=clip_sample, **kwargs)
        self.robust = robust
        self.classifier_weight, self.distance_weight = classifier_weight, distance_weight
        self.num_augmentations, self.cone_angle = num_augmentations, cone_angle
        self.distance_through_unet = distance_through_unet
        self.objective = (
            objective
            if objective is not None
            else (classifier_weight * TargetCE() + distance_weight * L1Distance(reduction="sum"))
        )

    @classmethod
    def test_kwargs(cls) -> dict:
        return {"num_steps": 10, "num_augmentations": 2}  # the augmented branch and the cone

    def describe(self) -> dict:
        return {**super().describe(), "cone": "axis = explained classifier's gradient, projected = robust partner's"}

    def _views(self, batch):
        """The augmented views of an x0-prediction, drawn once per step (both classifiers see the same)."""
        if self.num_augmentations == 1:
            return None
        cache: dict = {}

        def views(x):
            if cache.get("x") is not x:
                cache["x"], cache["v"] = x, random_affine_perspective(x, batch.rngs, self.num_augmentations)
            return cache["v"]

        return views

    def guidance(self, x0, batch, classifier, eps, to_xt, step):
        ctx = ObjectiveContext(
            batch.images, batch.source, batch.target, classifier, batch.mask, views=self._views(batch)
        )
        total = 0
        for weight, term in self.objective.weighted_terms():
            g = ascent(term, x0, ctx)
            if term.uses_classifier:
                g = to_xt(g)
                if self.robust is not None and self.robust is not classifier:
                    g_rob = to_xt(ascent(term, x0, dataclasses.replace(ctx, classifier=self.robust)))
                    g = cone_projection(g, g_rob, self.cone_angle)
            elif self.distance_through_unet:
                g = to_xt(g)
            total = total + weight * rescale_to(g, eps)
        return total
