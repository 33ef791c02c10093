"""The compute side of :class:`~lit_vce.metrics.suite.VCEMetrics`: the synced aggregates,
their 95 % intervals and the description stored with the results (a mixin of the suite)."""

from __future__ import annotations

import math
from typing import Any


from .uncertainty import LEVEL, column_intervals, ratio_intervals

#: the audit's per-sample columns, in the order the suite stores them
AUDIT_COLUMNS = ("success", "shape_changed", "background_only", "watermark_only")


class SummaryMixin:
    """``compute`` (a collective), ``reset`` and ``describe`` of the metric suite."""

    def _intervals(self, m: dict[str, Any]) -> dict[str, list[float]]:
        """95 % bootstrap intervals of the figures in ``m`` (inside ``compute``: states synced)."""
        out: dict[str, list[float]] = {}
        if self.resamples > 0:
            _, values = self.samples.compute()
            if values.numel():
                out.update(column_intervals(values, self._columns, m, self.resamples, self.seed, LEVEL))
        if self.audit is not None and self.resamples > 0:
            _, flags = self.audit_samples.compute()
            if flags.numel():  # ratios over the successful VCEs (of watermarked originals)
                out.update(ratio_intervals(flags, AUDIT_COLUMNS, self.resamples, self.seed, LEVEL))
        if self.literature is not None and self.resamples > 0 and "mnac" in m:
            out.update(self.literature.intervals(self.resamples, self.seed, LEVEL))
        if self.features is not None and self.fid_resamples > 0 and ("fid" in m or "sfid" in m):
            self.sfid.compute()  # a collective; cached when sFID was just computed; sets sfid.synced
            figures = {k: m[k] for k in ("fid", "fid_successful", "sfid", "sfid_successful", "sfid_within") if k in m}
            out.update(self.sfid.bootstrap(figures, self.fid_resamples, self.seed, LEVEL))
        return {k: [round(float(x), 6) if math.isfinite(x) else float("nan") for x in v] for k, v in out.items()}

    def compute(self) -> tuple[dict[str, float | int], dict[str, float | int] | None, int]:
        """(metrics, audit, N): a collective under DDP (call it on every rank, in the same order).
        Also sets ``last_intervals`` (see the module docstring)."""
        import warnings

        with warnings.catch_warnings():
            # a run whose every sample failed never updates the measured figures: they are NaN, as stated
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            return self._compute()

    def _compute(self) -> tuple[dict[str, float | int], dict[str, float | int] | None, int]:
        m: dict[str, float | int] = {
            "flip_rate": float(self.flip_rate.compute()),
            "untargeted_flip_rate": float(self.untargeted_flip_rate.compute()),
            "untargeted_flip_rate_prediction": float(self.untargeted_flip_rate_prediction.compute()),
            "target_confidence": float(self.target_confidence.compute()),
            "flip_rate_source_correct": float(self.flip_rate_source_correct.compute()),
            "n_source_correct": self.flip_rate_source_correct.n_used,
            "l1": float(self.l1.compute()),
            "l2": float(self.l2.compute()),
            "l1_per_value": float(self.l1_per_value.compute()),
        }
        region = float(self.region_change_outside.compute())  # a collective: every rank calls it
        region_area = float(self.region_area.compute())
        if self.region_change_outside.n_used:  # runs with regions (lit_vce.regions)
            m["region_change_outside"], m["region_area"] = region, region_area
            m["region_n"] = self.region_change_outside.n_used
        if "cout" in self.selected:
            m["cout"] = float(self.cout.compute())
            m["cout_source_correct"] = float(self.cout_source_correct.compute())
        if self.s3 is not None:
            m["s3"] = float(self.s3.compute())
        if self.face is not None:
            m.update(self.face.compute())
        n = self.flip_rate.n_used  # the global N, recorded while states were synced
        if self.lpips is not None:
            m["lpips"] = float(self.lpips.compute())
        if self.encoder is not None:
            m["latent_l1"], m["latent_l2"] = float(self.latent_l1.compute()), float(self.latent_l2.compute())
        if self.second is not None:
            m["flip_rate_independent"] = float(self.flip_rate_independent.compute())
            m["target_confidence_independent"] = float(self.target_confidence_independent.compute())
        if self.features is not None and "fid" in self.selected:
            m["fid"] = float(self.fid.compute())
            m["fid_n"] = self.fid.n_used
            m["fid_successful"] = float(self.fid_successful.compute())
            m["fid_successful_n"] = self.fid_successful.n_fake  # successful counterfactuals
            m["fid_successful_n_originals"] = self.fid_successful.n_real  # all originals
        if self.features is not None and "sfid" in self.selected:
            sfid_all, sfid_successful, sfid_within = self.sfid.compute()
            m["sfid"], m["sfid_n"] = float(sfid_all), self.sfid.n_used
            m["sfid_successful"] = float(sfid_successful)
            m["sfid_within"] = float(sfid_within)  # LDCE's table2: each half against itself
        audit = None
        if self.audit is not None:
            audit = {k: (float(v) if v.is_floating_point() else int(v)) for k, v in self.audit.compute().items()}
        if self.literature is not None:
            m.update(self.literature.compute())
        m = {k: (v if not (isinstance(v, float) and math.isinf(v)) else float("nan")) for k, v in m.items()}
        self.last_intervals = self._intervals(m)
        return m, audit, n

    def reset(self) -> None:
        from torchmetrics import Metric

        for mod in self.modules():
            if isinstance(mod, Metric):
                mod.reset()

    def describe(self) -> dict[str, Any]:
        """The settings stored with the results."""
        return {
            "features": self.feature_name,
            "resolution": self.resolution,
            "lpips": self.lpips is not None,
            "lpips_net": getattr(self, "lpips_net", "alex") if self.lpips is not None else None,
            "latent": self.encoder is not None,
            "second_classifier": getattr(self.second, "name", None) if self.second is not None else None,
            "cout_steps": self.cout.steps,
            "metrics": sorted(self.selected),
            "attributes": self.attributes.describe() if self.attributes is not None else None,
            "s3": "SimSiam ResNet-50 (ACE)" if self.s3 is not None else None,
            "face_verification": "VGGFace2 ResNet-50, threshold 0.5 (ACE, DiME)" if self.face is not None else None,
            "intervals": {
                "level": LEVEL,
                "method": "percentile bootstrap over samples",
                "resamples": self.resamples,
                "fid_resamples": self.fid_resamples,
                "seed": self.seed,
            },
        }
