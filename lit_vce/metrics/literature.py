"""Metrics the VCE literature reports beyond flip rate, closeness and FID, each as its
authors' evaluation code computes it, and their conventions side by side with ours.

- **MNAC** (mean number of attributes changed; ACE's ``compute_MNAC.py``): an
  attribute oracle's decisions (probability > 0.5) on the original and the
  counterfactual; per sample, the number of attributes whose decision differs;
  the mean over the successful counterfactuals (ACE reads its ``CCF`` folders:
  correctly and incorrectly classified originals, successful counterfactuals).
  With ``groups`` (one-hot blocks of a categorical attribute, as the world's
  shape and background), a block counts once.
- **CD** (correlation difference; ACE's ``compute_CD.py``): over the successful
  counterfactuals, the Pearson correlation of each attribute's decision change
  ``cf - original`` with the query attribute's change (0 where undefined, as
  ACE's ``np.corrcoef`` NaN -> 0), and CD = sum over attributes of its absolute
  difference from the attribute's correlation with the query in the dataset.
  The states are sums (n, sum of x, sum of x^2, sum of xy), so DDP is exact.
- **COUT over correctly classified originals** (ACE's ``compute_COUT.py`` reads
  ``CC`` originals with both successful and unsuccessful counterfactuals):
  ``cout_source_correct`` beside ``cout`` over every measured sample.
- **Per-value L1** (ACE's ``main.py`` and DiME's ``main.py``: ``abs().mean(dim=1)``
  over the 3*H*W values in [0, 1]): ``l1_per_value`` beside ``l1``, the sum over
  values. DiME converts to 8 bits by truncation (``.to(torch.uint8)``), ACE not at
  all; ours are the PNG's rounded values (``docs/parity.md``).
"""

from __future__ import annotations

import functools
import math

import torch
from torchmetrics import Metric

from .vce import _SumMean


def attribute_changes(
    decisions_before: torch.Tensor, decisions_after: torch.Tensor, groups: list[list[int]] | None = None
) -> torch.Tensor:
    """Per sample, the number of attributes whose decision differs (N,), float64.

    ``decisions_*`` are (N, A) booleans (probabilities > 0.5, as ACE thresholds);
    with ``groups``, the columns of a group (a one-hot categorical attribute) count as
    one attribute, changed when any of its columns changed."""
    diff = decisions_before.bool() != decisions_after.bool()
    if groups is None:
        return diff.double().sum(1)
    return torch.stack([diff[:, g].any(1) for g in groups], 1).double().sum(1)


class MNAC(_SumMean):
    """Mean number of attributes changed over the successful counterfactuals
    (:func:`attribute_changes` per sample; ACE's ``compute_MNAC.py``)."""

    higher_is_better = False

    def update(self, changes: torch.Tensor, success: torch.Tensor) -> None:
        self._add(changes[success.bool()])


def correlation_difference(deltas: torch.Tensor, query: torch.Tensor, dataset_corr: torch.Tensor) -> torch.Tensor:
    """CD of per-sample decision changes ``deltas`` (N, A) against the query's changes
    ``query`` (N,) and the dataset's correlations ``dataset_corr`` (A,) (ACE's
    ``compute_CorrMetric`` with ``diff=True``). NaN with fewer than 2 samples."""
    d, q = deltas.double(), query.double()
    if len(q) < 2:
        return torch.tensor(float("nan"), dtype=torch.float64)
    n = torch.tensor(float(len(q)), dtype=torch.float64)
    return _cd_from_sums(n, d.sum(0), (d * d).sum(0), q.sum(), (q * q).sum(), (d * q[:, None]).sum(0), dataset_corr)


def _cd_from_sums(n, sx, sxx, sq, sqq, sxq, dataset_corr) -> torch.Tensor:
    cov = n * sxq - sx * sq
    var = (n * sxx - sx * sx) * (n * sqq - sq * sq)
    # np.corrcoef of a constant column is NaN, which ACE sets to 0
    r = torch.where(var > 1e-12, cov / var.clamp_min(1e-300).sqrt(), torch.zeros_like(cov))
    return (dataset_corr.to(r) - r).abs().sum()


class CorrelationDifference(Metric):
    """CD (:func:`correlation_difference`) as sums, exact under DDP.

    Args:
        dataset_corr: (A,) each attribute's correlation with the query attribute in
            the dataset (ACE: the training partition's labels, ``np.corrcoef``).
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, dataset_corr: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("dataset_corr", torch.as_tensor(dataset_corr, dtype=torch.float64), persistent=False)
        a = len(self.dataset_corr)
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name, shape in (("sx", (a,)), ("sxx", (a,)), ("sxq", (a,)), ("sq", ()), ("sqq", ())):
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, deltas: torch.Tensor, query: torch.Tensor, success: torch.Tensor) -> None:
        keep = success.bool()
        d, q = deltas[keep].double(), query[keep].double()
        self.n += len(q)
        self.sx += d.sum(0)
        self.sxx += (d * d).sum(0)
        self.sxq += (d * q[:, None]).sum(0)
        self.sq += q.sum()
        self.sqq += (q * q).sum()

    def compute(self) -> torch.Tensor:
        self.n_used = int(self.n)
        if self.n < 2:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return _cd_from_sums(self.n, self.sx, self.sxx, self.sq, self.sqq, self.sxq, self.dataset_corr)


# --- the world's attributes ---------------------------------------------------------
#: the world's attributes as the oracle and the pixels read them (one categorical each)
WORLD_ATTRIBUTES = ("shape", "background", "watermark")


@torch.no_grad()
def world_readings(oracle, images: torch.Tensor) -> torch.Tensor:
    """(N, 3) long: the oracle's shape and background and the watermark pattern read from
    the pixels (-1: none)."""
    from ..data.world import read_watermark

    shape_logits, bg_logits = oracle.both(images)
    return torch.stack([shape_logits.argmax(1), bg_logits.argmax(1), read_watermark(images).to(shape_logits.device)], 1)


def world_changes(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per sample, how many of the world's attributes (shape, background, watermark) the
    counterfactual changed: MNAC's count with each categorical attribute as one."""
    return (before != after).double().sum(1)


def world_target_deltas(before: torch.Tensor, after: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, 3) decision changes of the target-relative binary attributes ``shape is the
    target``, ``background is the target's`` (the background the biased regime pairs
    with it), ``watermark is the target's pattern``: CD's inputs on the world, whose
    first column is the query."""
    t = target.to(before.device)[:, None]
    return (after == t).double() - (before == t).double()


@functools.lru_cache(maxsize=8)
def world_dataset_correlations(regime: str = "balanced", n: int = 4096, seed: int = 0) -> tuple[float, float, float]:
    """The correlation, over ``n`` training images of ``regime``, of ``shape is class k``
    with each target-relative attribute (shape, background, watermark is class k's),
    averaged over the classes k (a constant attribute counts 0, as ACE's NaN -> 0):
    CD's dataset correlations on the world (ACE takes CelebA's training partition)."""
    from ..data.world import SHAPES, sample_item

    items = [sample_item(seed, regime, "train", i) for i in range(n)]
    cols = torch.tensor([[it.shape, it.background, it.watermark] for it in items])
    out = torch.zeros(3, dtype=torch.float64)
    for k in range(len(SHAPES)):
        q = (cols[:, 0] == k).double()
        for j in range(3):
            c = float(torch.corrcoef(torch.stack([q, (cols[:, j] == k).double()]))[0, 1])
            out[j] += c if math.isfinite(c) else 0.0
    return tuple(float(v) for v in out / len(SHAPES))


class WorldAttributes:
    """MNAC's and CD's inputs on the world: the oracle's shape and background and the
    pixels' watermark (:func:`world_readings`), the query is ``shape is the target``."""

    num_attributes = len(WORLD_ATTRIBUTES)
    query = 0

    def __init__(self, oracle, regime: str = "balanced"):
        self.oracle, self.regime = oracle, regime
        self.corr = torch.tensor(world_dataset_correlations(regime), dtype=torch.float64)

    def read(self, images: torch.Tensor) -> torch.Tensor:
        return world_readings(self.oracle, images)

    def changes(self, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        return world_changes(before, after)

    def deltas(self, before: torch.Tensor, after: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return world_target_deltas(before, after, target)

    def describe(self) -> dict:
        return {
            "attributes": list(WORLD_ATTRIBUTES),
            "reader": "world oracle + watermark pixels",
            "cd_dataset": f"world {self.regime} train (4096 images)",
        }


def cd_interval(
    deltas: torch.Tensor,
    success: torch.Tensor,
    dataset_corr: torch.Tensor,
    resamples: int,
    seed: int,
    level: float,
    query: int = 0,
) -> list[float]:
    """The percentile bootstrap interval of CD over samples (:mod:`lit_vce.metrics.uncertainty`):
    each resample's CD from its successful samples' sums (a resample with fewer than two
    is left out)."""
    from .uncertainty import percentile_interval, resample_indices

    n = len(success)
    if int(success.bool().sum()) < 2 or resamples <= 0:  # CD itself is undefined: so is its interval
        return [math.nan, math.nan]
    idx = resample_indices(n, resamples, seed, deltas.device)
    counts = torch.zeros(resamples, n, dtype=torch.float64, device=deltas.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    w = counts * success.double()[None]  # (R, N): how often each successful sample is drawn
    d, q = deltas.double(), deltas[:, query].double()
    sn, sx, sxx = w.sum(1), w @ d, w @ (d * d)
    sq, sqq, sxq = w @ q, w @ (q * q), w @ (d * q[:, None])
    values = torch.stack(
        [
            _cd_from_sums(sn[r], sx[r], sxx[r], sq[r], sqq[r], sxq[r], dataset_corr)
            if sn[r] >= 2
            else torch.tensor(float("nan"), dtype=torch.float64)
            for r in range(resamples)
        ]
    )
    return percentile_interval(values, level)


class AttributeMetrics(torch.nn.Module):
    """MNAC and CD on the attributes an attribute reader returns (:class:`WorldAttributes`,
    :class:`~lit_vce.metrics.oracle.OracleAttributes`), with the per-sample values (success,
    attributes changed, the per-attribute deltas) their intervals resample."""

    def __init__(self, reader):
        from .uncertainty import SampleValues

        super().__init__()
        self.reader = reader
        self.mnac = MNAC()
        self.cd = CorrelationDifference(reader.corr) if reader.corr is not None else None
        self.samples = SampleValues()

    def update(self, original, counterfactual, target, success, keys) -> torch.Tensor:
        """Read both images; returns the per-sample number of attributes changed."""
        a = self.reader
        before, after = a.read(original), a.read(counterfactual)
        changes = a.changes(before, after)
        deltas = a.deltas(before, after, target).double()
        self.mnac.update(changes, success)
        if self.cd is not None:
            self.cd.update(deltas, deltas[:, a.query], success)
        self.samples.update(
            keys, torch.cat([success.double()[:, None], changes[:, None], deltas], 1).to(original.device)
        )
        return changes

    def update_failed(self, keys: torch.Tensor) -> None:
        """Failed samples: not successful, no reading (kept so the rows stay aligned)."""
        k = len(keys)
        zeros = torch.zeros(k, dtype=torch.float64, device=keys.device)
        nan = torch.full((k, 1 + self.reader.num_attributes), float("nan"), dtype=torch.float64, device=keys.device)
        self.samples.update(keys, torch.cat([zeros[:, None], nan], 1))

    def compute(self) -> dict[str, float]:
        out = {"mnac": float(self.mnac.compute())}
        if self.cd is not None:
            out["cd"] = float(self.cd.compute())
        return out

    def intervals(self, resamples: int, seed: int, level: float) -> dict[str, list[float]]:
        """95 % bootstrap intervals of MNAC and CD over samples (inside ``compute``: states synced)."""
        from .uncertainty import mean_interval

        _, lit = self.samples.compute()
        if not lit.numel():
            return {}
        ok = torch.nan_to_num(lit[:, 0])
        out = {"mnac": mean_interval(torch.nan_to_num(lit[:, 1]), resamples, seed, level, weights=ok)}
        if self.cd is not None:
            out["cd"] = cd_interval(
                torch.nan_to_num(lit[:, 2:]), ok, self.cd.dataset_corr, resamples, seed, level, query=self.reader.query
            )
        return out
