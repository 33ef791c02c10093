"""DiG-IN's model and objective as the constructor builds them."""

from __future__ import annotations

from ...diffusion import Diffusion, PixelDiffusion
from ...objectives import BackgroundL2, L1Distance, L2Distance, LPIPSDistance, Objective, TargetCE


def default_objective(
    classifier_weight: float = 1.0,
    background_latent_weight: float = 25.0,
    background_pixel_weight: float = 250.0,
    l1_weight: float = 0.0,
    l2_weight: float = 0.0,
    lpips_weight: float = 0.0,
) -> Objective:
    """DiG-IN's VCE objective: ``w_c * TargetCE`` plus the weighted regularisers that are non-zero."""
    terms = [
        (background_latent_weight, lambda: BackgroundL2("latent")),
        (background_pixel_weight, lambda: BackgroundL2("pixel")),
        (l1_weight, L1Distance),
        (l2_weight, L2Distance),
        (lpips_weight, LPIPSDistance),
    ]  # built only when weighted
    return sum((w * make() for w, make in terms if w), classifier_weight * TargetCE())


def _prepare_diffusion(
    diffusion, num_steps: int, guidance_scale: float, checkpointing: bool, injection: str, mask_source: str
) -> Diffusion:
    """The diffusion model (built from a pixel model spec, or checked and configured),
    refusing attention options on a model without cross-attention."""
    if isinstance(diffusion, str):
        diffusion = PixelDiffusion(
            diffusion,
            sampler="ddim",
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            gradient_checkpointing=checkpointing,
        )
    else:
        if diffusion.num_steps != num_steps:
            raise ValueError(
                f"the diffusion model was built with {diffusion.num_steps} steps, not num_steps={num_steps}"
            )
        if diffusion.sampler != "ddim":
            raise ValueError(f"DiG-IN needs the deterministic sampler (sampler='ddim'), not {diffusion.sampler!r}")
        diffusion.guidance_scale, diffusion.gradient_checkpointing = guidance_scale, checkpointing
    if not diffusion.has_null_condition:
        raise ValueError(
            f"DiG-IN needs a conditional model with an unconditional input (null class or empty prompt), "
            f"not {type(diffusion).__name__} without one"
        )
    if not diffusion.supports_attention_control:
        for key, value in (("injection", injection), ("mask_source", mask_source)):
            if value == "attention":
                raise ValueError(
                    f"{key}='attention' needs a diffusion model with cross-attention, not {type(diffusion).__name__}"
                )
    return diffusion
