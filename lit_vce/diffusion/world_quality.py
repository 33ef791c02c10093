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


@torch.no_grad()
def bridge_quality(n: int = 256, seed: int = 0, nfe: int = 100) -> dict[str, float]:
    """The world bridge's unguided inpainting (from pure noise inside the region, start step
    1000), read by the oracle on ``n`` balanced test images, for two kinds of region:

    - the shape's mask dilated by 1 px: the fraction of results in which the oracle reads a
      shape with probability > 0.5 (a plausible object) and the background it read before;
    - random 4 px cells covering 30 %: the oracle's shape and background accuracy against
      the ground truth (the context restored) and the region's RMSE in [0, 1].
    """
    import torch.nn.functional as F

    from ..data.world import ShapesWorld
    from ..rngs import per_sample_randn, sample_rngs
    from .bridge import I2SBBridge

    bridge, oracle = I2SBBridge("world"), load_world_network("oracle")
    data = ShapesWorld("balanced", "test", size=n, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    out = {"object_plausible": 0.0, "object_background_kept": 0.0, "cells_shape": 0.0, "cells_background": 0.0}
    sq, area = 0.0, 0.0
    for i in range(0, n, 64):
        items = [data[j] for j in range(i, min(i + 64, n))]
        x = torch.stack([it["image"] for it in items])
        shape, bg = torch.tensor([it["label"] for it in items]), torch.tensor([it["background"] for it in items])
        noise = per_sample_randn(x.shape[1:], sample_rngs(seed, [f"bridge-eval-{j}" for j in range(i, i + len(x))]))
        obj = F.max_pool2d(torch.stack([it["mask"] for it in items]), 3, 1, 1)
        s_logits, b_logits = oracle.both(bridge.inpaint(x, obj, noise, nfe=nfe))
        out["object_plausible"] += float((s_logits.softmax(1).amax(1) > 0.5).sum())
        out["object_background_kept"] += float((b_logits.argmax(1) == oracle.both(x)[1].argmax(1)).sum())
        cells = (torch.rand(len(x), 1, 8, 8, generator=gen) < 0.3).float()
        cells = cells.repeat_interleave(4, 2).repeat_interleave(4, 3)
        filled = bridge.inpaint(x, cells, noise, nfe=nfe)
        s_logits, b_logits = oracle.both(filled)
        out["cells_shape"] += float((s_logits.argmax(1) == shape).sum())
        out["cells_background"] += float((b_logits.argmax(1) == bg).sum())
        sq += float(((filled - x) ** 2 * cells).sum() / 3)
        area += float(cells.sum())
    res = {f"bridge_{k}": v / n for k, v in out.items()}
    res["bridge_cells_rmse"] = (sq / max(area, 1.0)) ** 0.5
    res["bridge_samples"], res["bridge_sampler"] = n, f"ot-ode-{nfe}, start 1000"
    return res


def evaluate_world_models(seed: int = 0, ddpm_samples: int = 1024) -> dict[str, float]:
    """All figures: classifier accuracies (both shortcuts) and the ddpm's samples (shape
    accuracy, background histogram and its chi-square test against uniform)."""
    return {
        **classifier_accuracies(seed=seed),
        **watermark_accuracies(seed=seed),
        **ddpm_sample_accuracy(n=ddpm_samples, seed=seed),
    }
