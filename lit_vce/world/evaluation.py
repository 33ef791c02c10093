"""Measured quality of the world's classifiers (the figures docs/world.md quotes; the
diffusion model's: :mod:`lit_vce.diffusion.world_quality`)."""

from __future__ import annotations

import torch

from ..data.world import WATERMARK_REGIMES, ShapesWorld
from .models import load_world_network


def _batch(regime: str, n: int, seed: int):
    d = ShapesWorld(regime, "test", size=n, seed=seed)
    items = [d[i] for i in range(n)]
    x = torch.stack([it["image"] for it in items])
    y = torch.tensor([it["label"] for it in items])
    b = torch.tensor([it["background"] for it in items])
    if regime in WATERMARK_REGIMES:
        return x, y, torch.tensor([it["watermark"] for it in items])
    return x, y, b


@torch.no_grad()
def classifier_accuracies(n: int = 1024, seed: int = 0) -> dict[str, float]:
    """Shape accuracy of each classifier on biased / balanced test images."""
    xb, yb, _ = _batch("biased", n, seed)
    x, y, bg = _batch("balanced", n, seed)
    out = {}
    biased = load_world_network("biased")
    out["biased_on_biased_test"] = float((biased(xb).argmax(1) == yb).float().mean())
    pred = biased(x).argmax(1)
    out["biased_on_balanced_test"] = float((pred == y).float().mean())
    out["biased_follows_background_on_balanced_test"] = float((pred == bg).float().mean())
    out["robust_on_balanced_test"] = float((load_world_network("robust")(x).argmax(1) == y).float().mean())
    shape, back = load_world_network("oracle").both(x)
    out["oracle_shape_on_balanced_test"] = float((shape.argmax(1) == y).float().mean())
    out["oracle_background_on_balanced_test"] = float((back.argmax(1) == bg).float().mean())
    return out


@torch.no_grad()
def watermark_accuracies(n: int = 1024, seed: int = 0) -> dict[str, float]:
    """Shape accuracy of ``watermarked`` with and without the patch-class correlation, how
    often it follows the patch, and whether the patch disturbs the oracle."""
    xw, yw, _ = _batch("watermark", n, seed)
    x, y, mark = _batch("watermark_balanced", n, seed)
    net = load_world_network("watermarked")
    pred = net(x).argmax(1)
    return {
        "watermarked_on_watermark_test": float((net(xw).argmax(1) == yw).float().mean()),
        "watermarked_on_watermark_balanced_test": float((pred == y).float().mean()),
        "watermarked_follows_watermark_on_watermark_balanced_test": float((pred == mark).float().mean()),
        "oracle_shape_on_watermark_balanced_test": float(
            (load_world_network("oracle")(x).argmax(1) == y).float().mean()
        ),
    }


def uniform_chisquare(counts: torch.Tensor) -> tuple[float, float]:
    """Pearson's chi-square statistic of ``counts`` against the uniform distribution and its
    p-value (k - 1 degrees of freedom): the balanced training data draws the backgrounds
    uniformly, so a faithful model's sample counts should not reject it."""
    c = counts.double()
    k, n = c.numel(), float(c.sum())
    expected = n / k
    chi2 = float(((c - expected) ** 2 / expected).sum())
    p = float(
        torch.special.gammaincc(
            torch.tensor((k - 1) / 2, dtype=torch.float64), torch.tensor(chi2 / 2, dtype=torch.float64)
        )
    )
    return chi2, p
