"""``VCEMetrics``: the whole metric suite of one run, shared by ``predict``
(in-line) and ``evaluate`` (re-reading saved PNGs), so both give the same numbers.

``update`` takes a batch of (original, counterfactual, source, target, sample id)
and returns one row of per-sample values per image (written to the per-sample
table, from which any aggregate can be recomputed); ``compute`` is a collective
(every rank calls it) and returns the synced aggregates.

Metrics (definitions in ``metrics.md``):

- validity: ``flip_rate`` (targeted), ``untargeted_flip_rate``,
  ``target_confidence``, and the same under an independent second classifier
  (``*_independent``); ``flip_rate_source_correct`` over the originals that the
  classifier gets right (``n_source_correct`` of them);
- closeness: ``l1``/``l2`` over all 3*H*W values in [0, 1] at ``resolution``
  (native when None; ``l1_per_value``: ACE's and DiME's mean over the values),
  ``lpips``, ``latent_l1``/``latent_l2`` (first-stage autoencoder), ``cout``
  (``cout_source_correct``: over the correctly classified originals, as ACE);
- attributes (world classifiers, with the audit): ``mnac`` and ``cd`` on the
  world's shape, background and watermark (:mod:`lit_vce.metrics.literature`);
- realism: ``fid`` (all counterfactuals) and ``fid_successful`` (successful ones
  and their originals), each with its N, and ``sfid``, on a pluggable extractor.

After ``compute``, ``last_intervals`` maps each figure to its 95 % interval
``[lo, hi]``: a seeded bootstrap over samples (:mod:`lit_vce.metrics.uncertainty`;
for FID and sFID over the sample set), the same on any number of processes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..rngs import sample_seed
from .common import OPTIONAL_METRICS, check_metrics, resize_to  # noqa: F401 (imported from here)
from .embeddings import S3, FaceVerification, cosine_similarity
from .features import LatentEncoder, build_features
from .summary import AUDIT_COLUMNS, SummaryMixin
from .uncertainty import FID_RESAMPLES, RESAMPLES, SampleValues
from .vce import (
    COUT,
    FeatureFID,
    FlipRate,
    SplitFID,
    TargetConfidence,
    WorldAudit,
    _SumMean,
    cout_scores,
    lp_per_sample,
)


class PerSampleMean(_SumMean):
    """The mean of per-sample distances computed by the caller (so they can also be stored per sample)."""

    higher_is_better = False

    def update(self, values: torch.Tensor) -> None:
        self._add(values)


#: per-sample values kept for the audit's intervals: success (of an original not already read as
#: the target), then WorldAudit's flags


class VCEMetrics(SummaryMixin, nn.Module):
    """The metric suite of one (method, classifier, protocol, dataset) run.

    Args:
        classifier: the explained classifier (an ``nn.Module`` giving logits).
        features: FID/sFID features: ``"inception"`` (2048-d, standard),
            ``"world"`` (the oracle), ``"none"`` or an ``nn.Module`` with ``num_features``.
        inception_weights: a local Inception weights file (else looked up, see
            :mod:`lit_vce.metrics.features`).
        second_classifier: an independent classifier of the same label space.
        lpips: an :class:`LPIPSDistance` (see ``build_lpips``) or None.
        audit: the world's audit (shape, background, watermark) of the successful VCEs of
            originals the classifier did not already assign to the target.
        resolution: L1/L2 are computed at this square resolution (None: native).
        autoencoder: a first-stage autoencoder (module or spec) for latent L1/L2.
        seed: the sFID split seed.
        cout_steps: insertion increments of COUT.
        resamples: bootstrap resamples of the intervals of means (0: no intervals).
        fid_resamples: bootstrap resamples of the FID and sFID intervals, one Frechet
            distance each (four for sFID); 0: none. In sample space while N < d, so cheap
            for small runs; at N >= d each costs two d x d eigendecompositions.
        metrics: the optional metrics to compute (:data:`OPTIONAL_METRICS`; None: every
            one that is configured): FID and sFID share one feature pass, the others cost
            their own passes (COUT: ``cout_steps + 1`` classifier calls per batch).
    """

    def __init__(
        self,
        classifier: nn.Module,
        features: str | nn.Module | None = "world",
        inception_weights: str | None = None,
        second_classifier: nn.Module | None = None,
        lpips: nn.Module | None = None,
        audit: bool = False,
        resolution: int | None = None,
        autoencoder: str | nn.Module | None = None,
        seed: int = 0,
        cout_steps: int = 50,
        metrics=None,
        resamples: int = RESAMPLES,
        fid_resamples: int = FID_RESAMPLES,
        cd_regime: str = "balanced",
        s3_encoder: nn.Module | None = None,
        face_encoder: nn.Module | None = None,
        attribute_oracle=None,
    ):
        super().__init__()
        self.seed, self.resamples, self.fid_resamples = int(seed), int(resamples), int(fid_resamples)
        self.last_intervals: dict[str, list[float]] = {}
        self.selected = sel = check_metrics(metrics)
        lpips = lpips if "lpips" in sel else None
        second_classifier = second_classifier if "independent" in sel else None
        autoencoder = autoencoder if "latent" in sel else None
        features = features if ("fid" in sel or "sfid" in sel) else None
        audit = audit and "audit" in sel
        self.classifier = classifier
        self.resolution = resolution
        self.flip_rate = FlipRate()
        self.untargeted_flip_rate = FlipRate(targeted=False)  # top-1 != the source label
        self.untargeted_flip_rate_prediction = FlipRate(targeted=False)  # != the original's prediction (ACE)
        self.target_confidence = TargetConfidence()
        self.flip_rate_source_correct = FlipRate()
        self.l1, self.l2 = PerSampleMean(), PerSampleMean()
        self.l1_per_value = PerSampleMean()  # ACE's and DiME's L1: the mean over the 3*H*W values
        # regions (lit_vce.regions): the share of each measured sample's change outside its region, and its area
        self.region_change_outside, self.region_area = PerSampleMean(), PerSampleMean()
        self.cout = COUT(classifier, steps=cout_steps)
        self.cout_source_correct = PerSampleMean()  # ACE's compute_COUT.py: correctly classified originals only
        self.lpips = lpips
        self.second = second_classifier
        if second_classifier is not None:
            k1, k2 = getattr(classifier, "num_classes", None), getattr(second_classifier, "num_classes", None)
            if k1 is not None and k2 is not None and k1 != k2:
                raise ValueError(
                    f"second_classifier has {k2} classes, the explained one {k1}: they must share the label space"
                )
            self.flip_rate_independent, self.target_confidence_independent = FlipRate(), TargetConfidence()
        self.encoder = LatentEncoder(autoencoder) if autoencoder is not None else None
        if self.encoder is not None:
            self.latent_l1, self.latent_l2 = PerSampleMean(), PerSampleMean()
        self.features = build_features(features, inception_weights)
        if self.features is not None:
            d = self.features.num_features
            self.fid = FeatureFID(self.features, d)
            self.fid_successful = FeatureFID(self.features, d)
            # per-sample features: sFID's split, and the FID intervals
            self.sfid = SplitFID(self.features, seed=seed, split="sfid" in sel)
        self.audit = WorldAudit() if audit else None
        self.cd_regime = cd_regime
        self.s3_encoder = s3_encoder.eval().requires_grad_(False) if s3_encoder is not None else None
        self.s3 = S3() if s3_encoder is not None else None  # ACE: SimSiam similarity, correctly classified originals
        self.face_encoder = face_encoder.eval().requires_grad_(False) if face_encoder is not None else None
        self.face = FaceVerification() if face_encoder is not None else None  # FVA / FS over successful VCEs
        # MNAC and CD: on the world's attributes with the audit, else with a face-attribute oracle
        from .literature import WorldAttributes

        self.literature = None
        self.set_attributes(
            WorldAttributes(self.audit.oracle, cd_regime) if self.audit is not None else attribute_oracle
        )
        self.samples = SampleValues()  # per-sample values for the intervals, in the order of _columns
        self.audit_samples = SampleValues()  # per-sample success and audit flags, in the order of AUDIT_COLUMNS
        self._columns = (
            [
                "flip_rate",
                "untargeted_flip_rate",
                "untargeted_flip_rate_prediction",
                "target_confidence",
                "source_correct",
                "l1",
                "l2",
                "l1_per_value",
            ]
            + (["cout"] if "cout" in sel else [])
            + (["lpips"] if lpips is not None else [])
            + (["latent_l1", "latent_l2"] if self.encoder is not None else [])
            + (["flip_rate_independent", "target_confidence_independent"] if second_classifier is not None else [])
            + (["s3"] if s3_encoder is not None else [])
            + (["face_similarity"] if face_encoder is not None else [])
        )

    def set_attributes(self, reader) -> None:
        """MNAC and CD read by ``reader`` (:class:`~lit_vce.metrics.literature.WorldAttributes`,
        :class:`~lit_vce.metrics.oracle.OracleAttributes`; None: neither). Before the first update."""
        from .literature import AttributeMetrics

        dev = next((b.device for b in self.buffers()), torch.device("cpu"))
        self.literature = None if reader is None else AttributeMetrics(reader).to(dev)

    @property
    def attributes(self):
        """The attribute reader of MNAC and CD, or None."""
        return None if self.literature is None else self.literature.reader

    @property
    def feature_name(self) -> str | None:
        if self.features is None:
            return None
        return {"InceptionFeatures": "inception-v3-2048", "WorldFeatures": "world-oracle-128"}.get(
            type(self.features).__name__, type(self.features).__name__
        )

    @torch.no_grad()
    def update(
        self,
        original: torch.Tensor,
        counterfactual: torch.Tensor,
        source: torch.Tensor,
        target: torch.Tensor,
        sample_ids: list[str],
        logits_before: torch.Tensor | None = None,
        logits_after: torch.Tensor | None = None,
    ) -> list[dict[str, Any]]:
        """Add a batch (images in [0, 1], same shape); returns one dict of per-sample values per image.

        A sample on which the classifier gives NaN or infinite logits (on the
        original or the counterfactual) has failed (:meth:`update_failed`): its row
        carries the reason under ``failure``, it counts as not flipped and is left out
        of every measured figure (:mod:`lit_vce.metrics.accounting`).
        """
        if original.shape != counterfactual.shape:
            raise ValueError(
                f"originals {tuple(original.shape)} and counterfactuals {tuple(counterfactual.shape)} differ in shape"
            )
        before = self.classifier(original) if logits_before is None else logits_before
        after = self.classifier(counterfactual) if logits_after is None else logits_after
        ok_b, ok_a = torch.isfinite(before).all(1), torch.isfinite(after).all(1)
        if bool((ok_b & ok_a).all()):
            return self._update(original, counterfactual, source, target, sample_ids, before, after)
        keep = torch.nonzero(ok_b & ok_a).flatten()
        drop = torch.nonzero(~(ok_b & ok_a)).flatten()
        kept = iter(
            self._update(
                original[keep],
                counterfactual[keep],
                source[keep],
                target[keep],
                [sample_ids[i] for i in keep.tolist()],
                before[keep],
                after[keep],
            )
            if len(keep)
            else []
        )
        reasons = [
            f"non-finite logits from the classifier on {'the original' if not ok_b[i] else 'the counterfactual'}"
            for i in drop.tolist()
        ]
        failed = iter(
            self.update_failed(
                source[drop], target[drop], [sample_ids[i] for i in drop.tolist()], reasons, logits_before=before[drop]
            )
        )
        return [next(kept) if ok_b[i] and ok_a[i] else next(failed) for i in range(len(sample_ids))]

    @torch.no_grad()
    def update_regions(self, change_outside: torch.Tensor, area: torch.Tensor) -> None:
        """Add measured samples' region figures (per sample: the share of the change outside the
        region and the region's area), reported as ``region_change_outside`` / ``region_area``."""
        self.region_change_outside.update(change_outside.to(self.region_area.total.device))
        self.region_area.update(area.to(self.region_area.total.device))

    @torch.no_grad()
    def update_failed(
        self,
        source: torch.Tensor,
        target: torch.Tensor,
        sample_ids: list[str],
        reasons: list[str],
        originals: torch.Tensor | None = None,
        logits_before: torch.Tensor | None = None,
    ) -> list[dict[str, Any]]:
        """Add attempted samples that failed (:mod:`lit_vce.metrics.accounting`): each counts
        as not flipped in every flip rate and enters no measured figure. With the originals
        (or their logits), a correctly classified original also counts, as not flipped, in
        ``flip_rate_source_correct``. Returns one failure row per sample."""
        from .accounting import failure_row

        k = len(sample_ids)
        if len(reasons) != k or any(not r for r in reasons):
            raise ValueError("update_failed needs one non-empty reason per sample")
        rows = [
            failure_row(s, int(a), int(b), r)
            for s, a, b, r in zip(sample_ids, source.tolist(), target.tolist(), reasons)
        ]
        if k == 0:
            return rows
        dev = source.device
        zeros = torch.zeros(k, dtype=torch.float64, device=dev)
        for metric in (self.flip_rate, self.untargeted_flip_rate, self.untargeted_flip_rate_prediction):
            metric._add(zeros)
        if self.second is not None:
            self.flip_rate_independent._add(zeros)
        correct = torch.full((k,), float("nan"), dtype=torch.float64, device=dev)
        if logits_before is None and originals is not None:
            logits_before = self.classifier(originals)
        if logits_before is not None:
            finite = torch.isfinite(logits_before).all(1)
            is_correct = (logits_before.argmax(1) == source) & finite
            correct = torch.where(finite, is_correct.double(), correct)
            self.flip_rate_source_correct._add(zeros[is_correct])
        nan = torch.full((k,), float("nan"), dtype=torch.float64, device=dev)
        col = {
            "flip_rate": zeros,
            "untargeted_flip_rate": zeros,
            "untargeted_flip_rate_prediction": zeros,
            "source_correct": correct,
            "flip_rate_independent": zeros,
        }
        self.samples.update(self._keys(sample_ids, dev), torch.stack([col.get(c, nan) for c in self._columns], 1))
        if self.audit is not None:  # not a flipped VCE: in no audit ratio, but kept so the rows stay aligned
            self.audit_samples.update(
                self._keys(sample_ids, dev), torch.stack([zeros] + [nan for _ in AUDIT_COLUMNS[1:]], 1)
            )
        if self.literature is not None:
            self.literature.update_failed(self._keys(sample_ids, dev))
        return rows

    def _update(self, original, counterfactual, source, target, sample_ids, before, after) -> list[dict[str, Any]]:
        success = after.argmax(1) == target
        self.flip_rate.update(after, target)
        self.untargeted_flip_rate.update(after, source)
        self.untargeted_flip_rate_prediction.update(after, before.argmax(1))
        self.target_confidence.update(after, target)
        correct = before.argmax(1) == source
        self.flip_rate_source_correct.update(after[correct], target[correct])
        per = self._closeness(original, counterfactual, source, target, correct, success)
        success_ind = None
        if self.second is not None:
            second = self.second(counterfactual)
            self.flip_rate_independent.update(second, target)
            self.target_confidence_independent.update(second, target)
            success_ind = second.argmax(1) == target
        if self.features is not None:
            # one extraction serves FID (both conventions) and sFID
            f_o, f_c = self.features(original), self.features(counterfactual)
            if "fid" in self.selected:
                self.fid.update(real=True, features=f_o)
                self.fid.update(real=False, features=f_c)
                # ACE/DiME's compute_FID: all originals against the successful counterfactuals
                self.fid_successful.update(real=True, features=f_o)
                self.fid_successful.update(real=False, features=f_c[success])
            self.sfid.update(keys=self._keys(sample_ids, original.device), real=f_o, fake=f_c, success=success)
        audit_flags = None
        if self.audit is not None:
            audit_flags = self.audit.read(counterfactual, source, target, original)
            flipped = success & (before.argmax(1) != target)  # an original already read as the target needs no edit
            self.audit.update(counterfactual, source, target, flipped, flags=audit_flags)
            self.audit_samples.update(
                self._keys(sample_ids, original.device),
                torch.stack(
                    [flipped.double()] + [audit_flags[c].double().to(original.device) for c in AUDIT_COLUMNS[1:]], 1
                ),
            )
        if self.literature is not None:
            changes = self.literature.update(
                original, counterfactual, target, success, self._keys(sample_ids, original.device)
            )
        pb, pa = before.softmax(1), after.softmax(1)
        col = {
            "flip_rate": success,
            "untargeted_flip_rate": after.argmax(1) != source,
            "untargeted_flip_rate_prediction": after.argmax(1) != before.argmax(1),
            "target_confidence": pa.gather(1, target[:, None]).squeeze(1),
            "source_correct": correct,
            **per,
        }
        if self.second is not None:
            col["flip_rate_independent"] = success_ind
            col["target_confidence_independent"] = second.softmax(1).gather(1, target[:, None]).squeeze(1)
        self.samples.update(
            self._keys(sample_ids, original.device),
            torch.stack([col[c].double().to(original.device) for c in self._columns], 1),
        )
        extra = {"success_independent": success_ind.tolist() if success_ind is not None else None}
        if self.attributes is not None:
            extra["attributes_changed"] = [int(c) for c in changes.tolist()]
        return self._rows(sample_ids, source, target, pb, pa, success, per, extra, audit_flags)

    def _closeness(self, original, counterfactual, source, target, correct, success) -> dict[str, torch.Tensor]:
        """The per-sample closeness and embedding values of a measured batch, their metrics updated
        (COUT over correct originals and S3 also on their subsets, FVA/FS on the successes only)."""
        o_r, c_r = resize_to(original, self.resolution), resize_to(counterfactual, self.resolution)
        per: dict[str, torch.Tensor] = {"l1": lp_per_sample(o_r, c_r, 1), "l2": lp_per_sample(o_r, c_r, 2)}
        per["l1_per_value"] = per["l1"] / o_r[0].numel()
        if "cout" in self.selected:
            per["cout"] = cout_scores(self.classifier, original, counterfactual, source, target, self.cout.steps)
            self.cout_source_correct.update(values=per["cout"][correct])
        if self.lpips is not None:
            per["lpips"] = self.lpips.per_sample(counterfactual, original)
        if self.encoder is not None:
            z_o, z_c = self.encoder(original), self.encoder(counterfactual)
            per["latent_l1"], per["latent_l2"] = lp_per_sample(z_o, z_c, 1), lp_per_sample(z_o, z_c, 2)
        for k, v in per.items():  # means over every measured sample
            getattr(self, k).update(values=v)
        if self.s3 is not None:
            per["s3"] = cosine_similarity(self.s3_encoder, original, counterfactual)
            self.s3.update(per["s3"], correct)
        if self.face is not None:
            per["face_similarity"] = cosine_similarity(self.face_encoder, original, counterfactual)
            self.face.update(per["face_similarity"], success)
        return per

    @staticmethod
    def _rows(sample_ids, source, target, pb, pa, success, per, extra, audit_flags) -> list[dict[str, Any]]:
        """One row of per-sample values per measured sample (``pb``/``pa``: probabilities before/after)."""
        rows = []
        for i, sid in enumerate(sample_ids):
            t = int(target[i])
            row: dict[str, Any] = {
                "sample_id": sid,
                "source": int(source[i]),
                "target": t,
                "pred_before": int(pb[i].argmax()),
                "conf_before": round(float(pb[i].max()), 6),
                "target_conf_before": round(float(pb[i, t]), 6),
                "pred_after": int(pa[i].argmax()),
                "conf_after": round(float(pa[i].max()), 6),
                "target_conf_after": round(float(pa[i, t]), 6),
                "success": bool(success[i]),
            }
            for k, v in per.items():
                row[k] = round(float(v[i]), 6)
            for k, values in extra.items():
                if values is not None:
                    row[k] = values[i]
            if audit_flags is not None:
                for c in AUDIT_COLUMNS[1:]:
                    v = float(audit_flags[c][i])
                    if math.isfinite(v):
                        row[f"audit_{c}"] = bool(v)
            rows.append(row)
        return rows

    @staticmethod
    def _keys(sample_ids: list[str], device) -> torch.Tensor:
        return torch.tensor([sample_seed(0, s) for s in sample_ids], dtype=torch.long, device=device)
