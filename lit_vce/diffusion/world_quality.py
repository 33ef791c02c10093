"""The world diffusion model's quality, read by the world's oracle, beside the world
classifiers' accuracies (:mod:`lit_vce.world.evaluation`): the figures docs/world.md
quotes. Here, above the world layer, because it samples with a :class:`PixelDiffusion`."""

from __future__ import annotations

import torch

from ..world.evaluation import classifier_accuracies, uniform_chisquare, watermark_accuracies
from ..world.models import NUM_CLASSES, load_world_network


@torch.no_grad()
def ddpm_sample_accuracy(
    n: int = 256, steps: int = 100, cfg_scale: float = 1.0, seed: int = 0, sampler: str = "ddpm"
) -> dict[str, float]:
    """Oracle shape accuracy of ``n`` class-conditional samples (classes cycled)."""
    from . import PixelDiffusion
    from ..rngs import sample_rngs

    gen = PixelDiffusion("world", sampler=sampler, num_steps=steps, guidance_scale=cfg_scale)
    oracle = load_world_network("oracle")
    labels = torch.arange(n) % NUM_CLASSES
    correct, backgrounds = 0, torch.zeros(NUM_CLASSES)
    for i in range(0, n, 64):
        lab = labels[i : i + 64]
        gens = sample_rngs(seed, [f"ddpm-eval-{j}" for j in range(i, i + len(lab))])
        uncond = gen.null_condition(len(lab)) if cfg_scale != 1.0 else None
        imgs = gen.sample(gen.condition(lab), gens, uncond)
        s, b = oracle.both(imgs)
        correct += int((s.argmax(1) == lab).sum())
        backgrounds += torch.bincount(b.argmax(1), minlength=NUM_CLASSES).float()
    chi2, pvalue = uniform_chisquare(backgrounds)
    return {
        "ddpm_sample_shape_accuracy": correct / n,
        "ddpm_samples": n,
        "ddpm_sampler": f"{sampler}-{steps}",
        "ddpm_cfg_scale": cfg_scale,
        "ddpm_background_histogram": (backgrounds / n).tolist(),
        "ddpm_background_chi2": chi2,
        "ddpm_background_chi2_p": pvalue,
    }


def evaluate_world_models(seed: int = 0, ddpm_samples: int = 1024) -> dict[str, float]:
    """All figures: classifier accuracies (both shortcuts) and the ddpm's samples (shape
    accuracy, background histogram and its chi-square test against uniform)."""
    return {
        **classifier_accuracies(seed=seed),
        **watermark_accuracies(seed=seed),
        **ddpm_sample_accuracy(n=ddpm_samples, seed=seed),
    }
