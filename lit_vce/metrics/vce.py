"""VCE metrics as torchmetrics ``Metric``s: states are sums (reduced across
processes by addition), so one DDP run gives exactly what one process gives.

Definitions follow ``metrics.md``: flip rate = fraction of counterfactuals whose
top-1 is the target; closeness = per-image L1/L2 over all 3*H*W values in
[0, 1], averaged over images; FID on a pluggable feature extractor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from .fid import FeatureFID, SplitFID, fid_from_features, frechet_distance, sqrt_psd  # noqa: F401  (their home until split out)


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


def lp_per_sample(original: torch.Tensor, counterfactual: torch.Tensor, p: int) -> torch.Tensor:
    """Per-image ``||x - x'||_p`` over all values (float64)."""
    d = (counterfactual - original).flatten(1).double()
    return d.abs().sum(1) if p == 1 else d.norm(dim=1)


class LpDistance(_SumMean):
    """Mean per-image ``||x - x'||_p`` over all 3*H*W values in [0, 1] (p = 1 or 2)."""

    higher_is_better = False

    def __init__(self, p: int = 1, **kwargs):
        super().__init__(**kwargs)
        if p not in (1, 2):
            raise ValueError("p must be 1 or 2")
        self.p = p

    def update(self, original: torch.Tensor, counterfactual: torch.Tensor) -> None:
        self._add(lp_per_sample(original, counterfactual, self.p))


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
    """What successful world VCEs changed, read by the oracle (shape, background) and
    from the pixels (the watermark patch).

    Over the successful VCEs of originals that the classifier did not already
    assign to the target (``success`` as the suite passes it; an original already
    read as the target is "explained" without any change, and on balanced data
    a quarter of ``biased``'s originals show the target's background):
    ``shape_changed``: fraction whose shape the oracle reads as the target.
    ``background_only``: fraction where the oracle still reads the source shape but
    the background became the target's background (the spurious feature;
    background k goes with class k in the biased regime). ``watermark_only`` (only
    when originals carry the watermark patch, given to :meth:`update`): fraction of
    those of watermarked originals whose shape and background (oracle) stayed and
    whose patch changed: a mean absolute change over the patch of at least
    :data:`WATERMARK_EDIT` (:func:`lit_vce.data.world.watermark_change`). The edit
    need not draw another of the four patterns: the classifier's notion of a
    pattern is its own (SVCE flips ``watermarked`` from "white over black" to
    "black" by darkening two rows of the patch).
    """

    higher_is_better = None
    full_state_update = False

    def __init__(self, oracle: nn.Module | None = None, **kwargs):
        super().__init__(**kwargs)
        if oracle is None:
            from ..world.models import load_world_network

            oracle = load_world_network("oracle")
        self.oracle = oracle.eval().requires_grad_(False)
        for name in ("success", "shape_changed", "background_only", "marked_success", "watermark_only"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def read(
        self,
        counterfactual: torch.Tensor,
        source: torch.Tensor,
        target: torch.Tensor,
        original: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample audit flags (success not applied): ``shape_changed``, ``background_only``,
        ``watermark_only`` (float, NaN where the original carries no patch, or everywhere
        without ``original``)."""
        from ..data.world import WATERMARK_EDIT, read_watermark, watermark_change

        shape_logits, bg_logits = self.oracle.both(counterfactual)
        shape, bg = shape_logits.argmax(1), bg_logits.argmax(1)
        out = {"shape_changed": shape == target, "background_only": (shape == source) & (bg == target)}
        marked = torch.zeros_like(target, dtype=torch.bool)
        mark_only = torch.zeros_like(marked)
        if original is not None:
            marked = read_watermark(original) >= 0
            if bool(marked.any()):
                bg_before = self.oracle.both(original)[1].argmax(1)
                moved = watermark_change(original, counterfactual) >= WATERMARK_EDIT
                mark_only = marked & (shape == source) & (bg == bg_before) & moved
        out["watermark_only"] = torch.where(
            marked, mark_only.double(), torch.full_like(mark_only, float("nan"), dtype=torch.float64)
        )
        return out

    @torch.no_grad()
    def update(
        self,
        counterfactual: torch.Tensor,
        source: torch.Tensor,
        target: torch.Tensor,
        success: torch.Tensor,
        original: torch.Tensor | None = None,
        flags: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Add a batch (``flags``: :meth:`read`'s output when already computed)."""
        if flags is None:
            flags = self.read(counterfactual, source, target, original)
        s = success.bool()
        self.success += s.sum()
        self.shape_changed += (s & flags["shape_changed"]).sum()
        self.background_only += (s & flags["background_only"]).sum()
        marked = torch.isfinite(flags["watermark_only"])
        self.marked_success += (s & marked).sum()
        self.watermark_only += (s & marked & (flags["watermark_only"] == 1)).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.success.clamp_min(1).double()
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        out = {
            "n_success": self.success,
            "shape_changed": self.shape_changed / n if self.success > 0 else nan,
            "background_only": self.background_only / n if self.success > 0 else nan,
        }
        if self.marked_success > 0:
            out["watermark_only"] = self.watermark_only / self.marked_success.double()
        return out


def cout_curves(
    classifier: nn.Module,
    original: torch.Tensor,
    counterfactual: torch.Tensor,
    source: torch.Tensor,
    target: torch.Tensor,
    steps: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """p(source) and p(target), (N, steps + 1), as counterfactual pixels are pasted into the
    original in ``steps`` increments, most-changed pixels (channel-summed |x' - x|) first."""
    n, c, h, w = original.shape
    change = (counterfactual - original).abs().sum(1).flatten(1)  # (N, H*W)
    order = torch.argsort(change, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=order.device).expand(n, -1))
    p_src, p_tgt = [], []
    with torch.no_grad():
        for k in range(steps + 1):
            count = round(k * h * w / steps)
            mask = (rank < count).view(n, 1, h, w)
            probs = classifier(torch.where(mask, counterfactual, original)).softmax(1)
            p_src.append(probs.gather(1, source[:, None]).squeeze(1))
            p_tgt.append(probs.gather(1, target[:, None]).squeeze(1))
    return torch.stack(p_src, 1), torch.stack(p_tgt, 1)


def cout_scores(classifier, original, counterfactual, source, target, steps: int = 50) -> torch.Tensor:
    """COUT per sample: AUC(p_target) - AUC(p_source) over the insertion curve (trapezoid, in [-1, 1])."""
    p_src, p_tgt = cout_curves(classifier, original, counterfactual, source, target, steps)
    dx = 1.0 / steps
    return torch.trapezoid(p_tgt.double(), dx=dx, dim=1) - torch.trapezoid(p_src.double(), dx=dx, dim=1)


class COUT(_SumMean):
    """Mean COUT (counterfactual transition, Khorram & Fuxin 2022 style) of the explained
    classifier; per-sample values are kept in ``values`` (concatenated across processes)."""

    higher_is_better = True

    def __init__(self, classifier: nn.Module, steps: int = 50, **kwargs):
        super().__init__(**kwargs)
        self.classifier, self.steps = classifier, steps
        self.add_state("values", [], dist_reduce_fx="cat")

    def update(
        self, original=None, counterfactual=None, source=None, target=None, values: torch.Tensor | None = None
    ) -> None:
        """Add a batch, or per-sample COUT ``values`` the caller computed with :func:`cout_scores`."""
        v = (
            values
            if values is not None
            else cout_scores(self.classifier, original, counterfactual, source, target, self.steps)
        )
        self.values.append(v)
        self._add(v)
