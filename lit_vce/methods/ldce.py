"""LDCE: latent diffusion counterfactual explanations (Farid et al., 2023).

As the authors' code (``ldm/models/diffusion/cc_ddim.py``, consensus guidance,
``cone_projection_type: zero_binning``) runs it: noise the image's latent to the
``strength`` fraction of a 500-step DDIM schedule and denoise with eta 0, where at
every step, with ``e_u`` / ``e_c`` the unconditional / target-conditional noise
predictions:

- the x0-prediction from ``e_u`` is decoded (gradients through the decoder and the
  UNet); the classifier score is ``-sqrt(1 - abar_t) * grad log p(target | x0)`` and
  the distance score ``-sqrt(1 - abar_t) * grad |clamp(x0) - x|_1``;
- **consensus**: at every spatial position, the classifier score is zeroed where
  the angle between its channel vector and the implicit classifier's,
  ``e_c - e_u``, exceeds ``consensus_angle`` (:func:`consensus_filter`);
- both scores are rescaled to the norm of ``e_c - e_u`` and weighted
  (``classifier_weight``, ``distance_weight``); the step's noise prediction is
  ``e_u + guidance_scale * (classifier - distance)``.

LDCE-txt runs Stable Diffusion with the target in the prompt ("a photo of a {}.");
LDCE-cls a class-conditional model (the world's pixel model plays it here).
Published ImageNet settings: strength 0.382 of 500 steps, scale 3, consensus 45 deg
with weights 2.3 / 0.3 (class-conditional LDM) or 50 deg with 3.95 / 1.2 (text).
"""

from __future__ import annotations

import math

import torch

from ..objectives import L1Distance, Objective, ObjectiveContext, TargetCE
from ..registry import METHODS
from .guided import PerStepGuidance, Step
from .parts import rescale_to


def consensus_filter(
    implicit: torch.Tensor, score: torch.Tensor, angle_deg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``score`` with the spatial positions zeroed where its channel vector is more than
    ``angle_deg`` away from ``implicit``'s (LDCE's consensus guidance); also the kept
    positions (N, 1, H, W) as a float mask."""
    dot = (implicit * score).sum(1, keepdim=True)
    norms = implicit.norm(dim=1, keepdim=True) * score.norm(dim=1, keepdim=True)
    cos = (dot / norms.clamp_min(1e-30)).clamp(-1, 1)
    keep = (torch.arccos(cos) <= math.radians(angle_deg)).to(score.dtype)
    return score * keep, keep


@METHODS.register("ldce")
class LDCE(PerStepGuidance):
    """LDCE: DDIM with consensus-filtered classifier guidance from a partially noised image.

    Args:
        classifier_weight, distance_weight: weights of the rescaled scores of the objective
            ``classifier_weight * TargetCE + distance_weight * L1Distance(sum)`` (2.3 / 0.3).
        objective: a custom :class:`~lit_vce.objectives.Objective` (replaces the weights):
            classifier terms are consensus-filtered, distance terms see the clamped image.
        consensus_angle: degrees (45).
        guidance_scale: the scale of the combined score (3).
        strength: the noised fraction of the schedule (0.382: 191 of 500 steps).
        prompt, class_names: text models: the prompt template of the target class and the
            class names (default: the classifier's).
        posterior: latent models: ``"sample"`` draws the start latent from the autoencoder's
            posterior with the sample's generator, as the code's ``get_first_stage_encoding``
            does; ``"mean"`` takes its mean (pixel models have none: no effect).
        noise_offset: 1, as the code: the latent is noised to DDIM index ``t_enc`` and
            denoising starts at ``t_enc - 1`` (see :class:`PerStepGuidance`).
        **kwargs: sampler settings of :class:`PerStepGuidance` (defaults: ``ddim``, 500 steps,
            no clipping, the final sample).
    """

    def __init__(
        self,
        classifier_weight: float = 2.3,
        distance_weight: float = 0.3,
        consensus_angle: float = 45.0,
        guidance_scale: float = 3.0,
        strength: float = 0.382,
        objective: Objective | None = None,
        prompt: str = "a photo of a {}.",
        class_names: list[str] | None = None,
        sampler: str = "ddim",
        num_steps: int = 500,
        clip_sample: bool = False,
        posterior: str = "sample",
        noise_offset: int = 1,
        **kwargs,
    ):
        if not 0 < strength <= 1:
            raise ValueError("strength must be in (0, 1]")
        if posterior not in ("sample", "mean"):
            raise ValueError(f"posterior must be 'sample' (the code's) or 'mean', got {posterior!r}")
        self.posterior = posterior
        kwargs.setdefault("output", "sample")
        super().__init__(
            sampler=sampler,
            num_steps=num_steps,
            skip=1 - strength,
            clip_sample=clip_sample,
            through_unet=True,
            noise_offset=noise_offset,
            **kwargs,
        )
        if self.conditioning != "none" or not self.diffusion.has_null_condition:
            raise ValueError("LDCE needs a conditional model with an unconditional input, stepped unconditionally")
        self.classifier_weight, self.distance_weight = classifier_weight, distance_weight
        self.consensus_angle, self.guidance_scale, self.strength = consensus_angle, guidance_scale, strength
        self.prompt, self.class_names = prompt, class_names
        self.objective = (
            objective
            if objective is not None
            else (classifier_weight * TargetCE() + distance_weight * L1Distance(reduction="sum"))
        )

    @classmethod
    def test_kwargs(cls) -> dict:
        return {"num_steps": 10, "strength": 0.5}

    def encode_start(self, batch):
        d = self.diffusion
        vae = getattr(d, "vae", None)
        if self.posterior == "mean" or vae is None:
            return d.encode(batch.images)
        from ..imageops import resize_to
        from ..rngs import per_sample_randn

        images = resize_to(batch.images, d.image_size)
        dist = vae.encode((images * 2 - 1).to(d.dtype_)).latent_dist
        noise = per_sample_randn(dist.mean.shape[1:], batch.rngs).to(dist.mean)
        return (dist.mean + dist.std * noise).float() * d.scaling

    def _target_condition(self, batch, classifier):
        d = self.diffusion
        if not d.text_conditioned:
            return d.condition(batch.target)
        names = self.class_names or list(getattr(classifier, "class_names", []))
        if not names:
            raise ValueError(
                "a text-conditioned model needs class names (class_names=... or a classifier with class_names)"
            )
        return d.condition([self.prompt.format(names[int(c)]) for c in batch.target])

    def guidance(self, x0, batch, classifier, eps, to_xt, step: Step):
        if "cond" not in step.state:
            step.state["cond"] = self._target_condition(batch, classifier)
        with torch.no_grad():
            implicit = self.diffusion.eps(step.x_t, step.t, step.state["cond"]) - eps  # e_c - e_u
        sq = (1 - step.alpha_bar).sqrt().to(x0)
        ctx = ObjectiveContext(batch.images, batch.source, batch.target, classifier, batch.mask)
        total = 0
        for weight, term in self.objective.weighted_terms():
            view = x0 if term.uses_classifier else x0.clamp(0, 1)  # the distance compares the clamped image
            (g,) = torch.autograd.grad(-term(view, ctx).sum(), x0, retain_graph=True)
            score = -sq * to_xt(g)
            if term.uses_classifier:
                score, kept = consensus_filter(implicit, score, self.consensus_angle)
                diag = step.state.setdefault("diagnostics", {})
                diag["consensus_fraction"] = (
                    diag.get("consensus_fraction", 0) + kept.flatten(1).mean(1) / step.num_steps
                )
            total = total + weight * rescale_to(score, implicit)
        # the sampler steps with eps - sqrt(1 - abar) * g, which is e_u + scale * total for this g
        return -self.guidance_scale * total / sq
