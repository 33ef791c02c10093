"""VCE metrics as torchmetrics ``Metric``s: states are sums (reduced across
processes by addition), so one DDP run gives exactly what one process gives.

Definitions follow ``metrics.md``: flip rate = fraction of counterfactuals whose
top-1 is the target; closeness = per-image L1/L2 over all 3*H*W values in
[0, 1], averaged over images; FID on a pluggable feature extractor.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric


class _SumMean(Metric):
    """Mean of per-sample values as (sum, count) states."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, values: torch.Tensor) -> None:
        self.total += values.detach().double().sum()
        self.count += values.numel()

    def compute(self) -> torch.Tensor:
        # states are synced inside compute (and restored after): keep the global N
        self.n_used = int(self.count)
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.total / self.count


class FlipRate(_SumMean):
    """Flip rate: fraction of counterfactuals whose top-1 is the target (targeted),
    or is no longer the source (``targeted=False``; pass the source labels)."""

    higher_is_better = True

    def __init__(self, targeted: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.targeted = targeted

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        pred = logits.argmax(1)
        self._add((pred == labels if self.targeted else pred != labels).float())


class TargetConfidence(_SumMean):
    """Mean softmax probability of the target on the counterfactual."""

    higher_is_better = True

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self._add(logits.softmax(1).gather(1, target[:, None]).squeeze(1))


class LpDistance(_SumMean):
    """Mean per-image ``||x - x'||_p`` over all 3*H*W values in [0, 1] (p = 1 or 2)."""

    higher_is_better = False

    def __init__(self, p: int = 1, **kwargs):
        super().__init__(**kwargs)
        if p not in (1, 2):
            raise ValueError("p must be 1 or 2")
        self.p = p

    def update(self, original: torch.Tensor, counterfactual: torch.Tensor) -> None:
        d = (counterfactual - original).flatten(1).double()
        self._add(d.abs().sum(1) if self.p == 1 else d.norm(dim=1))


class FeatureFID(Metric):
    """Frechet distance between features of originals and counterfactuals.

    ``feature`` is any ``nn.Module`` mapping images in [0, 1] to (N, d) features.
    States are float64 sums of features and outer products, so the DDP result is
    exact. ``compute`` returns the FID; ``n`` holds the number of image pairs, and
    a warning is issued when N <= d (rank-deficient covariances bias FID upwards).
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, feature: nn.Module, num_features: int, **kwargs):
        super().__init__(**kwargs)
        self.feature = feature.eval().requires_grad_(False)
        d = num_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_cov", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def _feats(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature(images).double()

    def update(self, images: torch.Tensor, real: bool) -> None:
        f = self._feats(images)
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f.sum(0))
        setattr(self, f"{side}_cov", getattr(self, f"{side}_cov") + f.T @ f)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + len(f))

    def compute(self) -> torch.Tensor:
        n_r, n_f = int(self.real_n), int(self.fake_n)
        self.n_used = min(n_r, n_f)  # the global N (states are synced inside compute)
        if n_r < 2 or n_f < 2:
            warnings.warn(f"FID needs at least 2 images per side (got {n_r}, {n_f}); returning nan")
            return torch.tensor(float("nan"), dtype=torch.float64)
        d = self.real_sum.numel()
        if min(n_r, n_f) <= d:
            warnings.warn(f"FID on N={min(n_r, n_f)} images with {d}-d features: covariances are rank-deficient, FID is biased upwards")
        mu_r, mu_f = self.real_sum / n_r, self.fake_sum / n_f
        cov_r = (self.real_cov - n_r * torch.outer(mu_r, mu_r)) / (n_r - 1)
        cov_f = (self.fake_cov - n_f * torch.outer(mu_f, mu_f)) / (n_f - 1)
        return frechet_distance(mu_r, cov_r, mu_f, cov_f)


def frechet_distance(mu1, cov1, mu2, cov2) -> torch.Tensor:
    """``|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2))`` in float64.

    The trace of the matrix square root is the sum of square roots of the
    eigenvalues of ``cov1 @ cov2`` (real and >= 0 up to rounding, since both are PSD).
    """
    eig = torch.linalg.eigvals(cov1 @ cov2)
    tr_sqrt = eig.real.clamp_min(0).sqrt().sum()
    return ((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt


class WorldFeatures(nn.Module):
    """The world's feature extractor: the oracle's 128-d penultimate features."""

    num_features = 128

    def __init__(self, oracle: nn.Module | None = None):
        super().__init__()
        if oracle is None:
            from ..world.models import load_world_network

            oracle = load_world_network("oracle")
        self.oracle = oracle

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != 32:
            images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.oracle.features(images)


class WorldAudit(Metric):
    """What successful world VCEs changed, read by the oracle.

    ``shape_changed``: fraction of successful VCEs whose shape the oracle reads as
    the target. ``background_only``: fraction where the oracle still reads the
    source shape but the background became the target's background (the
    spurious feature; background k goes with class k in the biased regime).
    """

    higher_is_better = None
    full_state_update = False

    def __init__(self, oracle: nn.Module | None = None, **kwargs):
        super().__init__(**kwargs)
        if oracle is None:
            from ..world.models import load_world_network

            oracle = load_world_network("oracle")
        self.oracle = oracle.eval().requires_grad_(False)
        for name in ("success", "shape_changed", "background_only"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, counterfactual: torch.Tensor, source: torch.Tensor, target: torch.Tensor, success: torch.Tensor) -> None:
        shape_logits, bg_logits = self.oracle.both(counterfactual)
        shape, bg = shape_logits.argmax(1), bg_logits.argmax(1)
        s = success.bool()
        self.success += s.sum()
        self.shape_changed += (s & (shape == target)).sum()
        self.background_only += (s & (shape == source) & (bg == target)).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.success.clamp_min(1).double()
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return {
            "n_success": self.success,
            "shape_changed": self.shape_changed / n if self.success > 0 else nan,
            "background_only": self.background_only / n if self.success > 0 else nan,
        }
