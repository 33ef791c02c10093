"""``VCEModule``: the LightningModule whose ``predict_step`` runs a VCE method.

It holds the explained classifier, the method and the metrics; it has no method
logic of its own. Per batch it (1) skips samples an earlier run finished (their
saved PNGs re-enter the metrics, so results always cover the whole run), (2)
records unreadable images as failed samples, (3) calls
``method.generate(batch, classifier)`` with one generator per sample seeded by
(seed, sample id), (4) quantises the counterfactuals as a PNG would, updates the
metrics and hands images and rows to the :class:`VCEPredictionWriter`. At the
end of the epoch every rank computes the (synced) metrics and rank 0 writes
``samples.csv``, ``results.json`` and ``grid.png``.

Guidance needs autograd: the Trainer must be built with ``inference_mode=False``
(the CLI does this), and the step runs under ``torch.enable_grad()``.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import lightning as L
import torch
from torchmetrics import Metric

from ..classifiers import load_classifier
from ..generators.noise import sample_generators, sample_seed
from ..methods.base import VCEBatch, VCEMethod, generate_in_chunks
from ..metrics import COUT, FeatureFID, FlipRate, LpDistance, SplitFID, TargetConfidence, WorldAudit, WorldFeatures
from ..metrics.lpips import build_lpips, lpips_available
from .writer import VCEPredictionWriter, quantize


class VCEModule(L.LightningModule):
    """Counterfactual generation as a prediction stage.

    Args:
        classifier: the explained classifier's spec (see ``load_classifier``), or an
            :class:`ImageClassifier` when used from Python.
        method: a :class:`VCEMethod` (default: ``ClassifierGuidance()``).
        seed: global seed; each sample's randomness depends only on (seed, sample id).
        fid_features: ``"world"`` (the oracle's features) or ``"none"``.
        world_audit: audit shape/background changes with the world's oracle.
        run_name: a label stored in results (default: ``<method>-<classifier>``).
        second_classifier: an independent classifier (same label space) under which
            flip rate and target confidence are also reported (``*_independent``):
            validity that transfers beyond the explained model.
        lpips: ``"auto"`` (LPIPS-AlexNet when its backbone weights are present),
            ``"on"`` (required: missing weights stop the run before any work) or ``"off"``.
        deterministic: byte-identical outputs whatever the batch size and the
            number of processes: samples are generated one at a time, with one
            CPU thread per process and deterministic cuDNN. Without it, outputs
            differ only by float rounding between batch compositions, which a
            long guided trajectory can amplify (see README, Determinism).
    """

    def __init__(
        self,
        classifier: str = "biased",
        method: VCEMethod | None = None,
        seed: int = 0,
        fid_features: str = "world",
        world_audit: bool = True,
        run_name: str | None = None,
        deterministic: bool = False,
        lpips: str = "auto",
        second_classifier: str | None = None,
    ):
        super().__init__()
        if fid_features not in ("world", "none"):
            raise ValueError("fid_features must be 'world' or 'none'")
        self.classifier = load_classifier(classifier)
        self.classifier_spec = classifier if isinstance(classifier, str) else self.classifier.name
        if method is None:
            from ..methods import ClassifierGuidance

            method = ClassifierGuidance()
        self.method = method
        self.seed = int(seed)
        self.deterministic = bool(deterministic)
        self.run_name = run_name or f"{method.name}-{self.classifier.name}"
        self.flip_rate = FlipRate()
        self.untargeted_flip_rate = FlipRate(targeted=False)
        self.target_confidence = TargetConfidence()
        self.l1, self.l2 = LpDistance(1), LpDistance(2)
        if lpips not in ("auto", "on", "off"):
            raise ValueError("lpips must be 'auto', 'on' or 'off'")
        self.lpips = build_lpips() if lpips == "on" or (lpips == "auto" and lpips_available()) else None
        self.cout = COUT(self.classifier)
        self.second = load_classifier(second_classifier) if second_classifier else None
        if self.second is not None:
            if self.second.num_classes != self.classifier.num_classes:
                raise ValueError(f"second_classifier has {self.second.num_classes} classes, the explained one "
                                 f"{self.classifier.num_classes}: they must share the label space")
            self.flip_rate_independent, self.target_confidence_independent = FlipRate(), TargetConfidence()
        if fid_features == "world":
            self.features = WorldFeatures()
            self.fid = FeatureFID(self.features, WorldFeatures.num_features)
            # the ACE/DiME convention: successful counterfactuals (and their originals) only
            self.fid_successful = FeatureFID(self.features, WorldFeatures.num_features)
            self.sfid = SplitFID(self.features, seed=self.seed)
        else:
            self.features = self.fid = self.fid_successful = self.sfid = None
        self.audit = WorldAudit() if world_audit else None
        self._t0 = 0.0
        self._threads = torch.get_num_threads()
        self._counts = {"skipped": 0, "failed": 0, "new": 0}
        self.final_results: dict[str, Any] | None = None

    # --- helpers ---------------------------------------------------------------
    def _writer(self) -> VCEPredictionWriter | None:
        if self._trainer is None:
            return None
        return next((c for c in self.trainer.callbacks if isinstance(c, VCEPredictionWriter)), None)

    def on_predict_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("VCE guidance needs autograd: build the Trainer with inference_mode=False")
        self._t0 = time.perf_counter()
        self._counts = {"skipped": 0, "failed": 0, "new": 0}
        self._check_classes()
        self._threads = torch.get_num_threads()
        if self.deterministic:
            # thread count and batch shape change kernel reduction orders; pin both
            torch.set_num_threads(1)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        self.method.setup(self.device)
        writer = self._writer()
        if writer is not None and writer.done_ids():
            self.print(f"resuming: {len(writer.done_ids())} samples already finished in {writer.output_dir} will be skipped")

    def on_predict_end(self) -> None:
        torch.set_num_threads(self._threads)

    def _check_classes(self) -> None:
        """Stop before any work when a source/target is unknown to the classifier or equal."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "class_pairs"):
            return
        k = self.classifier.num_classes
        pairs = dm.class_pairs()
        bad = sorted({c for p in pairs for c in p if not 0 <= c < k})
        if bad:
            raise ValueError(f"class ids {bad} are unknown to classifier {self.classifier.name!r} (classes 0..{k - 1})")
        same = sorted(s for s, t in pairs if s == t)
        if same:
            raise ValueError(f"target equals source for class(es) {same}: a counterfactual needs a different target")

    def _update_metrics(self, original, cf, source, target, logits, ids) -> None:
        self.flip_rate.update(logits, target)
        self.untargeted_flip_rate.update(logits, source)
        self.target_confidence.update(logits, target)
        self.l1.update(original, cf)
        self.l2.update(original, cf)
        self.cout.update(original, cf, source, target)
        if self.second is not None:
            with torch.no_grad():
                second = self.second(cf)
            self.flip_rate_independent.update(second, target)
            self.target_confidence_independent.update(second, target)
        if self.lpips is not None:
            self.lpips.update(cf, original)
        success = logits.argmax(1) == target
        if self.fid is not None:
            # one feature extraction serves FID (both conventions) and sFID
            with torch.no_grad():
                f_orig, f_cf = self.features(original), self.features(cf)
            self.fid.update_features(f_orig, real=True)
            self.fid.update_features(f_cf, real=False)
            self.fid_successful.update_features(f_orig[success], real=True)
            self.fid_successful.update_features(f_cf[success], real=False)
            keys = torch.tensor([sample_seed(0, s) for s in ids], device=cf.device)
            self.sfid.update_features(f_orig, f_cf, keys)
        if self.audit is not None:
            self.audit.update(cf, source, target, success)

    # --- the step --------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        t_start = time.perf_counter()
        images, source, target = batch["image"], batch["source"], batch["target"]
        ids: list[str] = list(batch["sample_id"])
        errors: list[str] = list(batch.get("error", [""] * len(ids)))
        writer = self._writer()
        done = writer.done_ids() if writer is not None else set()
        # 1. finished earlier: reload from disk so the metrics cover the whole run
        old = [i for i, s in enumerate(ids) if s in done]
        for i in old:
            row, cf = writer.load_done(ids[i])
            if cf is not None and not row.get("failure"):
                cf = cf.to(images)[None]
                with torch.no_grad():
                    logits = self.classifier(cf)
                self._update_metrics(quantize(images[i : i + 1]), cf, source[i : i + 1], target[i : i + 1], logits, [ids[i]])
        self._counts["skipped"] += len(old)

        # 2. new samples, with unreadable images recorded as failures
        new = [i for i, s in enumerate(ids) if s not in done]
        rows: list[dict[str, Any]] = []
        todo = [i for i in new if not errors[i]]
        for i in new:
            if errors[i]:
                rows.append(self._row(ids[i], source[i], target[i], None, None, errors[i], 0.0))
                rows[-1]["has_image"] = False
        if not todo:
            self._counts["failed"] += len(rows)
            return {"new_rows": rows, "counterfactuals": None, "originals": None}
        idx = torch.tensor(todo, device=images.device)
        x, src, tgt = images[idx], source[idx], target[idx]
        sub_ids = [ids[i] for i in todo]
        mask = batch["mask"][idx] if "mask" in batch else None
        vb = VCEBatch(x, src, tgt, sub_ids, sample_generators(self.seed, sub_ids, device=x.device), mask)
        with torch.enable_grad():
            result = generate_in_chunks(self.method, vb, self.classifier, 1 if self.deterministic else None)
        cf = quantize(result.images.detach())
        xq = quantize(x)
        with torch.no_grad():
            before = self.classifier(xq)
            after = self.classifier(cf)
        self._update_metrics(xq, cf, src, tgt, after, sub_ids)
        seconds = (time.perf_counter() - t_start) / max(len(todo), 1)
        diff = (cf - xq).flatten(1).double()
        l1s, l2s = diff.abs().sum(1).tolist(), diff.norm(dim=1).tolist()
        for j, i in enumerate(todo):
            rows.append(self._row(ids[i], src[j], tgt[j], before[j], after[j], result.failure[j], seconds))
            rows[-1].update(l1=round(l1s[j], 4), l2=round(l2s[j], 4))
        self._counts["failed"] += sum(1 for r in rows if r["failure"])
        self._counts["new"] += len(todo)
        # rows of unreadable images come first; keep images aligned with their rows
        n_err = len(rows) - len(todo)
        pad = torch.zeros((n_err, *cf.shape[1:]), dtype=cf.dtype, device=cf.device)
        return {"new_rows": rows, "counterfactuals": torch.cat([pad, cf]), "originals": torch.cat([pad, xq])}

    def _row(self, sid, source, target, before, after, failure, seconds) -> dict[str, Any]:
        row: dict[str, Any] = {"sample_id": sid, "source": int(source), "target": int(target), "method": self.method.name,
                               "seed": self.seed, "seconds": round(float(seconds), 4), "failure": failure or ""}
        if before is not None:
            pb, pa = before.softmax(0), after.softmax(0)
            row.update(
                pred_before=int(pb.argmax()), conf_before=round(float(pb.max()), 6),
                target_conf_before=round(float(pb[int(target)]), 6),
                pred_after=int(pa.argmax()), conf_after=round(float(pa.max()), 6),
                target_conf_after=round(float(pa[int(target)]), 6),
                success=bool(int(pa.argmax()) == int(target)) and not failure,
            )
        else:
            row["success"] = False
        return row

    # --- the end ---------------------------------------------------------------
    def on_predict_epoch_end(self) -> None:
        # compute() is a collective: every rank calls it, in the same order
        metrics = {
            "flip_rate": float(self.flip_rate.compute()),
            "untargeted_flip_rate": float(self.untargeted_flip_rate.compute()),
            "target_confidence": float(self.target_confidence.compute()),
            "l1": float(self.l1.compute()),
            "l2": float(self.l2.compute()),
            "cout": float(self.cout.compute()),
        }
        if self.lpips is not None:
            metrics["lpips"] = float(self.lpips.compute())
        if self.second is not None:
            metrics["flip_rate_independent"] = float(self.flip_rate_independent.compute())
            metrics["target_confidence_independent"] = float(self.target_confidence_independent.compute())
        n = self.flip_rate.n_used  # global N, recorded while the states were synced
        if self.fid is not None:
            metrics["fid"] = float(self.fid.compute())
            metrics["fid_n"] = self.fid.n_used
            metrics["fid_successful"] = float(self.fid_successful.compute())
            metrics["fid_successful_n"] = self.fid_successful.n_used
            metrics["sfid"] = float(self.sfid.compute())
        audit = None
        if self.audit is not None:
            audit = {k: (float(v) if v.is_floating_point() else int(v)) for k, v in self.audit.compute().items()}
        counts = torch.tensor([self._counts["skipped"], self._counts["failed"], self._counts["new"]], device=self.device)
        counts = self.trainer.strategy.reduce(counts.float(), reduce_op="sum").long().tolist()
        self.trainer.strategy.barrier()
        wall = time.perf_counter() - self._t0
        self.final_results = {"metrics": metrics, "audit": audit, "n": n, "counts": counts, "wall_time_s": wall}
        writer = self._writer()
        if writer is not None and self.trainer.is_global_zero:
            self._finalize(writer, metrics, audit, n, counts, wall)
        for m in self.modules():
            if isinstance(m, Metric):
                m.reset()

    def _finalize(self, writer, metrics, audit, n, counts, wall) -> None:
        from ..report.results import build_results
        from ..report.grids import save_grid

        rows = writer.collect_rows()
        writer.write_table(rows)
        ids_hash = hashlib.sha256("\n".join(r["sample_id"] for r in rows).encode()).hexdigest()[:16]
        dm = self.trainer.datamodule
        results = build_results(
            run_name=self.run_name, method=self.method.name, classifier=self.classifier_spec, n=n,
            n_success=sum(1 for r in rows if r.get("success")), n_failed=sum(1 for r in rows if r.get("failure")),
            metrics=metrics, audit=audit, seed=self.seed, wall_time_s=wall, sample_ids_hash=ids_hash,
            config={"method": self.method.describe(), "deterministic": self.deterministic, "data": dict(dm.hparams) if dm is not None else {},
                    "classifier": self.classifier_spec},
            world_size=self.trainer.world_size, resumed=counts[0],
        )
        writer.write_json("results.json", results)
        save_grid(writer.output_dir, rows[:16])
        skipped = f", {counts[0]} skipped (already done)" if counts[0] else ""
        self.print(f"{self.run_name}: {counts[2]} new samples{skipped}, {counts[1]} failed; flip rate {metrics['flip_rate']:.3f}; "
                   f"results in {writer.output_dir / 'results.json'}")
