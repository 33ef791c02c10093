"""Frechet distances over feature sums: :class:`FeatureFID` (originals against
counterfactuals) and :class:`SplitFID` (sFID: no counterfactual compared with its own
original), exact under DDP (float64 sums of features and outer products)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torchmetrics import Metric


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

    def update(
        self, images: torch.Tensor | None = None, real: bool = True, features: torch.Tensor | None = None
    ) -> None:
        """Add images (in [0, 1]), or their precomputed ``features`` (N, d) to share one extraction between metrics."""
        f = (self._feats(images) if features is None else features).double()
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + f.sum(0))
        setattr(self, f"{side}_cov", getattr(self, f"{side}_cov") + f.T @ f)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + len(f))

    def compute(self) -> torch.Tensor:
        n_r, n_f = int(self.real_n), int(self.fake_n)
        self.n_used = min(n_r, n_f)  # the global N (states are synced inside compute)
        self.n_real, self.n_fake = n_r, n_f
        if n_r < 2 or n_f < 2:
            warnings.warn(f"FID needs at least 2 images per side (got {n_r}, {n_f}); returning nan")
            return torch.tensor(float("nan"), dtype=torch.float64)
        d = self.real_sum.numel()
        if min(n_r, n_f) <= d:
            warnings.warn(
                f"FID on N={min(n_r, n_f)} images with {d}-d features: covariances are rank-deficient, FID is biased "
                "upwards"
            )
        mu_r, mu_f = self.real_sum / n_r, self.fake_sum / n_f
        cov_r = (self.real_cov - n_r * torch.outer(mu_r, mu_r)) / (n_r - 1)
        cov_f = (self.fake_cov - n_f * torch.outer(mu_f, mu_f)) / (n_f - 1)
        return frechet_distance(mu_r, cov_r, mu_f, cov_f)


_SQRT_CACHE: list[tuple[torch.Tensor, torch.Tensor]] = []  # the last (covariance, its square root)


def sqrt_psd(cov: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a PSD matrix (eigendecomposition, negative rounding
    clamped to 0). The last result is kept: FID and FID over successful
    counterfactuals share their real side, whose root is then computed once."""
    for key, root in _SQRT_CACHE:
        if key.shape == cov.shape and key.dtype == cov.dtype and key.device == cov.device and torch.equal(key, cov):
            return root
    lam, v = torch.linalg.eigh(cov)
    root = (v * lam.clamp_min(0).sqrt()) @ v.T
    _SQRT_CACHE[:] = [(cov.clone(), root)]
    return root


def frechet_distance(mu1, cov1, mu2, cov2) -> torch.Tensor:
    """``|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2))`` in float64.

    The trace of the matrix square root is the sum of square roots of the eigenvalues
    of ``cov1 @ cov2``, which are those of the symmetric PSD ``S cov2 S`` with
    ``S = cov1^(1/2)``: two symmetric eigendecompositions instead of one general one
    (1.4x faster at 2048-d, and the eigenvalues are real by construction).
    """
    s1 = sqrt_psd(cov1)
    m = s1 @ cov2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The Frechet distance between two feature sets (n1, d) and (n2, d), in float64.

    With fewer samples than dimensions (bootstrap resamples of a small run at 2048-d)
    it is computed in sample space: with centred features A, B, ``tr C1 = |A|^2 / (n1 - 1)``
    and the non-zero eigenvalues of ``C1 C2`` are those of the n x n PSD matrix
    ``(A B^T)(A B^T)^T / ((n1 - 1)(n2 - 1))``: the same value without a d x d matrix.
    """
    real, fake = real.double(), fake.double()
    n1, n2, d = len(real), len(fake), real.shape[1]
    if n1 < 2 or n2 < 2:
        return torch.tensor(math.nan, dtype=torch.float64)
    mu1, mu2 = real.mean(0), fake.mean(0)
    if min(n1, n2) >= d:
        return frechet_distance(mu1, torch.cov(real.T), mu2, torch.cov(fake.T))
    a, b = real - mu1, fake - mu2
    k = a @ b.T
    m = k @ k.T if n1 <= n2 else k.T @ k
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum() / math.sqrt((n1 - 1) * (n2 - 1))
    return ((mu1 - mu2) ** 2).sum() + (a**2).sum() / (n1 - 1) + (b**2).sum() / (n2 - 1) - 2 * tr_sqrt


class SplitFID(Metric):
    """sFID: FID without comparing a counterfactual with its own original, under two conventions.

    The explained instances are ordered by a seeded hash of their sample key
    and split in halves A and B. ``compute`` returns both:

    - all vs all (the design note's definition): mean(FID(orig_A, cf_B),
      FID(orig_B, cf_A)) over every instance, halves of sizes floor(N/2) and
      ceil(N/2);
    - ACE's ``compute_sFID.sh``: the same with only the **successful**
      counterfactuals of each half against all originals of the other, and
      halves of floor(N/2) each (with N odd, the middle instance is left out,
      as ACE's ``head``/``tail`` split does);
    - LDCE's ``eval_utils/table2.py`` (``compute_fid(sfid=True, class_balanced=True)``
      on a run of several buckets): mean(FID(orig_A, cf_A), FID(orig_B, cf_B)),
      each half against itself, every instance (``sfid_within``).

    Features are kept per sample (concatenated across processes) with their
    keys, so the split does not depend on batch order or the number of processes.
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, feature: nn.Module, seed: int = 0, split: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.feature = feature.eval().requires_grad_(False)
        self.seed, self.split = seed, bool(split)
        self.synced = None
        self.add_state("real", [], dist_reduce_fx="cat")
        self.add_state("fake", [], dist_reduce_fx="cat")
        self.add_state("keys", [], dist_reduce_fx="cat")
        self.add_state("success", [], dist_reduce_fx="cat")

    @torch.no_grad()
    def update(
        self,
        original: torch.Tensor | None = None,
        counterfactual: torch.Tensor | None = None,
        keys: torch.Tensor | None = None,
        real: torch.Tensor | None = None,
        fake: torch.Tensor | None = None,
        success: torch.Tensor | None = None,
    ) -> None:
        """Add originals and counterfactuals (or their features ``real``/``fake``) with their sample
        keys and success flags."""
        if real is None:
            real, fake = self.feature(original), self.feature(counterfactual)
        self.real.append(real.double())
        self.fake.append(fake.double())
        self.keys.append(keys.long())
        self.success.append(
            (torch.ones(len(keys), dtype=torch.bool) if success is None else success.bool()).to(keys.device)
        )

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sFID all vs all, as ACE over successful counterfactuals, within halves as LDCE); all NaN
        when ``split=False`` (features only kept). The synced features, ordered by sample key, stay
        in ``self.synced`` as ``(real, fake, success, halves)`` for :meth:`bootstrap`."""
        from torchmetrics.utilities import dim_zero_cat

        nan = torch.tensor(float("nan"), dtype=torch.float64)
        self.synced = None
        if isinstance(self.keys, list) and not self.keys:  # nothing added (e.g. every sample failed)
            self.n_used = 0
            return nan, nan, nan
        real, fake, keys = dim_zero_cat(self.real), dim_zero_cat(self.fake), dim_zero_cat(self.keys)
        success = dim_zero_cat(self.success).bool()
        n = len(keys)
        self.n_used = n
        by_key = torch.argsort(keys.cpu(), stable=True).to(real.device)  # a process-independent order
        real, fake, keys, success = real[by_key], fake[by_key], keys[by_key], success[by_key]
        g = torch.Generator().manual_seed(self.seed)
        salt = torch.randint(1, 2**62, (1,), generator=g).item()
        order = torch.argsort((keys.cpu() ^ salt), stable=True).to(real.device)
        halves = (order[: n // 2], order[n // 2 :], order[: n // 2], order[n - n // 2 :])
        self.synced = (real, fake, success, halves)
        if not self.split:
            return nan, nan, nan
        if n < 4:
            warnings.warn(f"sFID needs at least 4 samples (got {n}); returning nan")
            return nan, nan, nan
        return _split_fids(real, fake, success, halves)

    def bootstrap(self, figures: dict[str, float], resamples: int, seed: int, level: float) -> dict[str, list[float]]:
        """95 % intervals over the sample set (after :meth:`compute`) of ``figures``, a map from
        ``fid``, ``fid_successful``, ``sfid`` or ``sfid_successful`` to its value on the sample,
        to which the interval is bias-shifted (:func:`~lit_vce.metrics.uncertainty.percentile_interval`).
        FIDs resample all samples; sFIDs resample each half on its own (the split is part of
        the definition). Only the figures asked for are resampled."""
        from .uncertainty import percentile_interval, resample_indices

        if self.synced is None or len(self.synced[0]) < 2:
            return {}
        real, fake, success, halves = self.synced
        out: dict[str, list[float]] = {}
        idx = resample_indices(len(real), resamples, seed, real.device)
        if "fid" in figures:
            fid = torch.stack([fid_from_features(real[i], fake[i]) for i in idx])
            out["fid"] = percentile_interval(fid, level, figures["fid"])
        if "fid_successful" in figures:
            fid_s = torch.stack([fid_from_features(real[i], fake[i][success[i]]) for i in idx])
            out["fid_successful"] = percentile_interval(fid_s, level, figures["fid_successful"])
        if self.split and len(real) >= 4 and ({"sfid", "sfid_successful", "sfid_within"} & set(figures)):
            g = torch.Generator().manual_seed(int(seed) + 1)
            split = []
            for _ in range(resamples):
                hs = tuple(h[torch.randint(0, len(h), (len(h),), generator=g).to(h.device)] for h in halves)
                split.append(torch.stack(_split_fids(real, fake, success, hs)))
            split = torch.stack(split)
            for j, key in enumerate(("sfid", "sfid_successful", "sfid_within")):
                if key in figures:
                    out[key] = percentile_interval(split[:, j], level, figures[key])
        return out


def _split_fids(real, fake, success, halves) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sFID in the three conventions for halves ``(a, b, a2, b2)`` (see :class:`SplitFID`)."""
    a, b, a2, b2 = halves
    all_vs_all = 0.5 * (fid_from_features(real[a], fake[b]) + fid_from_features(real[b], fake[a]))
    within = 0.5 * (fid_from_features(real[a], fake[a]) + fid_from_features(real[b], fake[b]))
    sa, sb = a2[success[a2]], b2[success[b2]]
    if len(sa) < 2 or len(sb) < 2:
        return all_vs_all, torch.tensor(float("nan"), dtype=torch.float64), within
    return all_vs_all, 0.5 * (fid_from_features(real[a2], fake[sb]) + fid_from_features(real[b2], fake[sa])), within
