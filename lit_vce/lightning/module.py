"""``VCEModule``: the LightningModule whose ``predict_step`` runs a VCE method.

It holds the explained classifier, the method and the metrics; it has no method
logic of its own. Per batch it (1) skips samples an earlier run finished (their
saved PNGs re-enter the metrics, so results always cover the whole run), (2)
records unreadable images as failed samples, (3) runs the method through
:func:`lit_vce.batches.explain_batch` (the path of ``explain()`` too), with one
generator per sample seeded by (seed, sample id), which updates the metrics, and (4)
hands the counterfactuals, quantised as a PNG stores them, and the rows to the
:class:`VCEPredictionWriter`. At the
end of the epoch every rank computes the (synced) metrics and rank 0 writes
``samples.csv``, ``results.json`` and ``grid.png``.

Guidance needs autograd: the Trainer must be built with ``inference_mode=False``
(the CLI does this), and the step runs under ``torch.enable_grad()``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from ..classifiers import load_classifier
from ..classifiers.loaders import check_classifier_spec
from ..rngs import sample_rngs
from ..batches import deterministic_kernels, explain_batch
from ..methods.base import VCEBatch, VCEMethod, check_domain
from ..metrics.accounting import NONFINITE_IMAGE
from ..metrics.build import build_suite
from ..metrics.common import OPTIONAL_METRICS, check_metrics
from ..io import quantize
from .finish import FinishMixin
from .stage import StageModule


class VCEModule(FinishMixin, StageModule):
    """Counterfactual generation as a prediction stage.

    Args:
        classifier: the explained classifier's spec (see ``load_classifier``), a mapping
            ``{spec: ..., <loader arguments>}`` (checkpoint, class names, input size,
            mean/std, templates), or an :class:`ImageClassifier` when used from Python.
        method: a :class:`VCEMethod` (default: ``ClassifierGuidance()``).
        seed: global seed; each sample's randomness depends only on (seed, sample id).
        fid_features: FID/sFID features: ``"world"`` (the oracle's), ``"inception"``
            (standard 2048-d Inception-v3; weights from ``inception_weights`` or
            ``$LIT_VCE_INCEPTION_WEIGHTS``, see :mod:`lit_vce.metrics.features`) or ``"none"``.
        world_audit: audit shape/background changes with the world's oracle.
        run_name: a label stored in results (default: ``<method>-<classifier>``).
        second_classifier: an independent classifier (same label space) under which
            flip rate and target confidence are also reported (``*_independent``):
            validity that transfers beyond the explained model.
        lpips: ``"auto"`` (LPIPS-AlexNet when its backbone weights are present),
            ``"on"`` (required: missing weights stop the run before any work) or ``"off"``.
        deterministic: byte-identical outputs whatever the batch size and the
            number of processes: each sample is generated on its own with one
            intra-op CPU thread (on CPU, methods that allow it run that many samples
            concurrently as the process had threads; same bytes) and deterministic
            cuDNN. Without it, outputs
            differ only by float rounding between batch compositions, which a
            long guided trajectory can amplify (see docs/clusters.md, Determinism).
        inception_weights: a local file of the Inception FID weights.
        resolution: L1/L2 are computed at this square resolution (None: native;
            256 is the ImageNet convention).
        lpips_weights: a local file of LPIPS' AlexNet backbone (else ``$LIT_VCE_LPIPS_WEIGHTS``
            or ``$LIT_VCE_WEIGHTS_DIR/lpips/checkpoints/``).
        autoencoder: a first-stage autoencoder (diffusers ``AutoencoderKL`` folder or
            hub id, ``id:subfolder``) for latent L1/L2.
        fetch_per_node: weights are fetched (downloaded when missing) by one process per
            node; ``False``: by global rank 0 only, for a cache shared by every node
            (:mod:`lit_vce.weights`).
        interval_resamples: bootstrap resamples of the 95 % intervals of means in
            ``results.json`` (0: none; :mod:`lit_vce.metrics.uncertainty`).
        fid_interval_resamples: bootstrap resamples of the FID/sFID intervals (0: none;
            each is one Frechet distance, two 2048-d eigendecompositions once N >= 2048).
        s3: ACE's SimSiam similarity (``"auto"``: when ``$LIT_VCE_WEIGHTS_DIR/simsiam/checkpoint_0099.pth.tar``
            is present; ``"on"``: required; ``"off"``).
        face_verification: FVA and FS with the VGGFace2 ResNet-50 (``"on"``: needs
            ``$LIT_VCE_WEIGHTS_DIR/vggface2/resnet50_ft_weight.pkl``; for faces, so ``"off"`` by default).
        lpips_net: ``"alex"`` (default) or ``"vgg"`` (ACE's and DiME's LPIPS).
        metrics: the optional metrics to compute, comma-separated or a list (``fid``, ``sfid``,
            ``cout``, ``lpips``, ``latent``, ``independent``, ``audit``; default: all). Flip rates,
            confidences and L1/L2 are always computed. What is left out is neither loaded nor
            computed (e.g. COUT's 51 classifier passes per batch); ``lit-vce
            evaluate`` of the run computes the same selection unless given ``--metrics``.
        log_images: per batch, the first this many samples (original | counterfactual |
            difference, one row each) go to the loggers that take images (TensorBoard,
            W&B, any logger with ``log_image``); 0: none. The run folder has every PNG anyway.
        preset: the protocol preset the run follows (``configs/presets/``; set by the preset's
            config): stored with the results, where ``lit-vce leaderboard --published PRESET``
            finds the runs to set beside the paper's figures.
        attribute_oracle: ``"off"``, ``"celeba"`` or ``"celebahq"``: MNAC and CD with ACE's
            attribute oracle (``$LIT_VCE_WEIGHTS_DIR/<celeba|celebahq>/oracle.pth``) on CelebA's 40
            attributes; the query attribute and CD's training-partition correlations come from the
            data (``--data.dataset celeba|celebahq``) and are stored with the results.

    The models (classifier, metrics, and the method when the CLI defers it) are built
    by :meth:`build`: in the constructor when used from Python, in ``prepare_data`` /
    ``setup`` when built by the CLI (:func:`~lit_vce.lightning.stage.deferred_build`).
    """

    def __init__(
        self,
        classifier: str | dict = "biased",
        method: VCEMethod | None = None,
        seed: int = 0,
        fid_features: str = "world",
        world_audit: bool = True,
        run_name: str | None = None,
        deterministic: bool = False,
        lpips: str = "auto",
        second_classifier: str | None = None,
        inception_weights: str | None = None,
        resolution: int | None = None,
        autoencoder: str | None = None,
        lpips_weights: str | None = None,
        fetch_per_node: bool = True,
        interval_resamples: int = 1000,
        fid_interval_resamples: int = 200,
        s3: str = "auto",
        face_verification: str = "off",
        lpips_net: str = "alex",
        attribute_oracle: str = "off",
        preset: str | None = None,
        log_images: int = 4,
        metrics: str | list[str] | None = None,
    ):
        super().__init__(fetch_per_node)
        selected = check_metrics(metrics)  # an unknown name fails before anything is built
        if isinstance(log_images, bool) or not isinstance(log_images, int) or log_images < 0:
            raise ValueError(f"log_images must be a whole number >= 0, got {log_images!r}")
        self.log_images = log_images
        if fid_features not in ("world", "inception", "none"):
            raise ValueError("fid_features must be 'world', 'inception' or 'none'")
        if lpips not in ("auto", "on", "off"):
            raise ValueError(f"lpips must be 'auto', 'on' or 'off', got {lpips!r}")
        check_classifier_spec(classifier)
        if second_classifier is not None:
            check_classifier_spec(second_classifier)
        self.classifier_config = classifier if isinstance(classifier, (str, dict)) else classifier.name
        self.classifier_spec = classifier.get("spec", "") if isinstance(classifier, dict) else self.classifier_config
        self._classifier_arg = classifier
        self.method = method
        #: a zero-argument callable building the method in :meth:`build` (the CLI's deferred method)
        self.method_factory: Callable[[], VCEMethod] | None = None
        self.seed = int(seed)
        self.deterministic = bool(deterministic)
        self._run_name = run_name
        # what `lit-vce evaluate RUN` reuses unless told otherwise
        self.metric_settings = {
            "fid_features": fid_features,
            "second_classifier": second_classifier if isinstance(second_classifier, str) else None,
            "world_audit": bool(world_audit),
            "resolution": resolution,
            "lpips": lpips,
            "autoencoder": autoencoder if isinstance(autoencoder, str) else None,
            "s3": s3,
            "face_verification": face_verification,
            "lpips_net": lpips_net,
            "attribute_oracle": attribute_oracle,
            "preset": preset,
            "metrics": None if metrics is None else ",".join(m for m in OPTIONAL_METRICS if m in selected),
        }
        self._suite_args = dict(
            fid_features=fid_features,
            inception_weights=inception_weights,
            second_classifier=second_classifier,
            lpips=lpips,
            world_audit=world_audit,
            resolution=resolution,
            autoencoder=autoencoder,
            seed=self.seed,
            lpips_weights=lpips_weights,
            interval_resamples=interval_resamples,
            fid_interval_resamples=fid_interval_resamples,
            s3=s3,
            face_verification=face_verification,
            lpips_net=lpips_net,
            attribute_oracle=attribute_oracle,
            metrics=metrics,
        )
        self._t0 = 0.0
        self._threads = torch.get_num_threads()
        self._pins = contextlib.ExitStack()  # deterministic_kernels for the run
        self._counts = {"skipped": 0, "failed": 0, "new": 0, "not_selected": 0}
        self._batches = 0
        self._seen: set[str] = set()  # the ids this run covers (attempted or finished earlier)
        self._selects = False
        self.final_results: dict[str, Any] | None = None
        self._build_unless_deferred()

    def build(self) -> None:
        """The classifier, the method (from :attr:`method_factory` when deferred) and the metric
        suite (under :func:`~lit_vce.weights.collecting_missing` each part is tried, so every
        missing weight file is named, and the stage is left incomplete)."""
        from ..weights import needed

        self.classifier = needed(load_classifier, self._classifier_arg)
        if self.method_factory is not None:
            self.method = needed(self.method_factory)
        elif self.method is None:
            from ..methods import ClassifierGuidance

            self.method = ClassifierGuidance()
        self.metrics = needed(build_suite, self.classifier or torch.nn.Identity(), **self._suite_args)
        if self.classifier is None or self.method is None:
            return  # only while collecting what is missing
        if not self.classifier_spec:
            self.classifier_spec = self.classifier.name
        self.run_name = self._run_name or f"{self.method.name}-{self.classifier.name}"

    # --- helpers ---------------------------------------------------------------
    def run_hparams(self) -> dict[str, Any]:
        """What tells this run apart in an experiment tracker: the method and its settings,
        the classifier, the seed, the metric settings and the resolved config (Lightning
        adds the data module's own)."""
        writer = self.writer()
        return {
            "method": self.method.name,
            "classifier": self.classifier_spec,
            "seed": self.seed,
            "deterministic": self.deterministic,
            "method_settings": self.method.describe(),
            "metric_settings": self.metric_settings,
            "run_dir": str(writer.output_dir) if writer is not None else None,
            "config": (self._cli_config(writer) if writer is not None else None) or {},
        }

    def setup(self, stage: str) -> None:
        """Build (see the stage), then give the loggers the run's hyperparameters: before
        Lightning logs the data module's and saves, so ``hparams.yaml`` holds both."""
        super().setup(stage)
        self.log_hparams(self.run_hparams())

    def on_predict_start(self) -> None:
        self.require_autograd("VCE guidance")
        self._t0 = time.perf_counter()
        self._counts = {"skipped": 0, "failed": 0, "new": 0, "not_selected": 0}
        self._seen = set()
        self._domain_checked = False
        self._batches = 0
        dm = getattr(self.trainer, "datamodule", None)
        self._selects = bool(getattr(dm, "selects_by_classifier", False))  # the data's protocol needs the classifier
        dataset = dm.hparams.get("dataset") if dm is not None and hasattr(dm, "hparams") else None
        if self.metrics.audit is not None and dataset not in (None, "world"):
            # the audit reads shapes and backgrounds with the world's oracle: meaningless elsewhere
            self.metrics.audit = None
            self.metrics.set_attributes(None)
            self.metric_settings["world_audit"] = False
        self._attach_attributes(dm)
        self._check_classes()
        # deterministic: thread count and batch shape change kernel reduction orders; pin both
        self._pins.close()
        self._threads = self._pins.enter_context(deterministic_kernels(self.deterministic))
        self.method.setup(self.device)
        writer = self.writer()
        if writer is not None and writer.done_ids():
            self.print(
                f"resuming: {len(writer.done_ids())} samples already finished in {writer.output_dir} will be skipped"
            )

    def _attach_attributes(self, dm) -> None:
        """The face-attribute oracle's query and CD correlations, from the data (stored with the results)."""
        oracle = getattr(self.metrics, "pending_oracle", None)
        if oracle is None:
            return
        info = getattr(dm, "attribute_info", None)
        if info is None or info() is None:
            from ..errors import ConfigError

            raise ConfigError(
                f"attribute_oracle {self.metric_settings['attribute_oracle']!r} reads CelebA's attributes: "
                "it needs --data.dataset celeba or celebahq"
            )
        from ..metrics.oracle import OracleAttributes

        attributes = info()
        self.metrics.set_attributes(
            OracleAttributes(oracle, attributes["query"], attributes["correlations"], attributes["cd_dataset"])
        )
        self.metrics.pending_oracle = None
        self.metric_settings["attributes"] = attributes

    def fingerprint(self) -> dict[str, Any]:
        """What decides a sample's output: seed, classifier, method settings and the data
        (not batch size, workers or the number of samples: a run may grow)."""
        dm = getattr(self.trainer, "datamodule", None)
        data = dict(dm.hparams) if dm is not None and hasattr(dm, "hparams") else {}
        for k in ("batch_size", "num_workers", "num_samples"):
            data.pop(k, None)
        return {"seed": self.seed, "classifier": self.classifier_config, "method": self.method.describe(), "data": data}

    def on_predict_end(self) -> None:
        self._pins.close()  # the thread count and cuDNN settings before the run

    def _check_classes(self) -> None:
        """Stop before any work when a source/target is unknown to the classifier or equal."""
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "class_pairs"):
            return
        k = self.classifier.num_classes
        pairs = dm.class_pairs()
        from ..errors import ConfigError

        bad = sorted({c for p in pairs for c in p if not 0 <= c < k})
        if bad:
            raise ConfigError(
                f"class ids {bad} are unknown to classifier {self.classifier.name!r} (classes 0..{k - 1})"
            )
        if not self._selects:  # the rule of explain() and evaluate as well
            from ..metrics.accounting import check_distinct_targets

            pairs = sorted(set(pairs))
            check_distinct_targets(
                [s for s, _ in pairs], [t for _, t in pairs], [f"class {s}" for s, _ in pairs], what="class pairs"
            )

    def _with_regions(self, vb: VCEBatch, batch: dict[str, Any], idx: torch.Tensor) -> VCEBatch:
        """``vb`` with the data's regions (``--data.regions``; :mod:`lit_vce.regions`), if any."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        spec = getattr(dm, "region_spec", None)
        if spec is None:
            return vb
        import dataclasses

        from ..regions import resolve_regions

        loaded = batch["region"][idx] if "region" in batch else None
        region = resolve_regions(spec, vb.images, vb.source, vb.rngs, self.classifier, loaded, vb.mask)
        return dataclasses.replace(vb, region=region)

    # --- the step --------------------------------------------------------------
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        t_start = time.perf_counter()
        images, source, target = batch["image"], batch["source"], batch["target"]
        ids: list[str] = list(batch["sample_id"])
        errors: list[str] = list(batch.get("error", [""] * len(ids)))
        if not self._domain_checked:  # a default model of another domain is refused, not run
            check_domain(self.method, self.classifier, tuple(images.shape[-2:]))
            self._domain_checked = True
        # 1. finished earlier: their saved files re-enter the metrics
        old = self._reenter_finished(ids, images, source, errors)
        self._counts["skipped"] += len(old)
        self._seen.update(ids[i] for i in old)

        # 2. new samples, with unreadable images recorded as failures
        olds = set(old)
        new = [i for i in range(len(ids)) if i not in olds]
        rows: list[dict[str, Any]] = []
        todo = [i for i in new if not errors[i]]
        if self._selects and todo:  # the data's protocol picks images and sources by the classifier
            todo, source = self._select(todo, images, source, target)
        rows += self._fail_unreadable([i for i in new if errors[i]], ids, errors, source, target)
        if not todo:
            self._counts["failed"] += len(rows)
            return {"new_rows": rows, "counterfactuals": None, "originals": None}
        idx = torch.tensor(todo, device=images.device)
        x, src, tgt = images[idx], source[idx], target[idx]
        sub_ids = [ids[i] for i in todo]
        mask = batch["mask"][idx] if "mask" in batch else None
        captions = [batch["caption"][i] for i in todo] if "caption" in batch else None
        vb = VCEBatch(x, src, tgt, sub_ids, sample_rngs(self.seed, sub_ids, device=x.device), mask, captions)
        vb = self._with_regions(vb, batch, idx)
        # the path explain() takes as well
        result, scored = explain_batch(
            self.method, self.classifier, vb, self.metrics, self.deterministic, self._threads
        )
        cf = quantize(result.images.detach())
        xq = quantize(x)
        seconds = (time.perf_counter() - t_start) / max(len(todo), 1)
        for row in scored:
            rows.append(self._row(row, seconds))
            # a counterfactual that is not finite is not written (the original still is)
            rows[-1]["has_counterfactual"] = row["failure"] != NONFINITE_IMAGE
        self._seen.update(sub_ids)
        self._counts["failed"] += sum(1 for r in rows if r["failure"])
        self._counts["new"] += len(todo)
        self._batches += 1
        done = rows[len(rows) - len(todo) :]
        self.log_values(
            {
                "batch/flip_rate": sum(bool(r.get("success")) for r in done) / len(done),
                "batch/s_per_img": seconds,
                "samples/new": self._counts["new"],
            },
            step=self._batches,
        )
        self.log_samples(xq[: self.log_images], cf[: self.log_images], sub_ids[: self.log_images], self._batches)
        # rows of unreadable images come first; keep images aligned with their rows
        n_err = len(rows) - len(todo)
        pad = torch.zeros((n_err, *cf.shape[1:]), dtype=cf.dtype, device=cf.device)
        return {"new_rows": rows, "counterfactuals": torch.cat([pad, cf]), "originals": torch.cat([pad, xq])}

    def _select(self, todo: list[int], images, source, target) -> tuple[list[int], Any]:
        """The positions the data's protocol keeps among ``todo`` (it picks by the classifier),
        and ``source`` with the protocol's sources at those positions."""
        idx = torch.tensor(todo, device=source.device)
        keep, new_source = self.trainer.datamodule.select(
            quantize(images[todo]), source[idx], self.classifier, target[idx]
        )
        source = source.clone()
        source[idx] = new_source
        self._counts["not_selected"] += len(todo) - int(keep.sum())
        return [i for j, i in enumerate(todo) if keep[j]], source

    def _fail_unreadable(self, unreadable: list[int], ids, errors, source, target) -> list[dict[str, Any]]:
        """The failure rows of the batch's unreadable images (an image listed with alternative
        targets, under a selecting protocol, fails once, not once per target)."""
        if self._selects and unreadable:
            from ..data.protocols import keep_unreadable

            protocol = self.trainer.datamodule.hparams.protocol
            kept = [i for i in unreadable if keep_unreadable(protocol, int(source[i]), int(target[i]))]
            self._counts["not_selected"] += len(unreadable) - len(kept)
            self._seen.update(ids[i] for i in unreadable if i not in kept)
            unreadable = kept
        rows = []
        if unreadable:
            idx = torch.tensor(unreadable, device=source.device)
            failed = self.metrics.update_failed(
                source[idx], target[idx], [ids[i] for i in unreadable], [errors[i] for i in unreadable]
            )
            rows = [dict(self._row(row, 0.0), has_image=False) for row in failed]
        self._seen.update(ids[i] for i in unreadable)
        return rows

    def _reenter_finished(
        self, ids: list[str], images: torch.Tensor, source: torch.Tensor, errors: list[str]
    ) -> list[int]:
        """Positions of the batch's samples finished by an earlier run, whose saved files
        (verified against their sha256) re-enter the metrics as they are; a sample whose
        files are missing or changed is forgotten, so it is generated again."""
        writer = self.writer()
        done = writer.done_ids() if writer is not None else set()
        old = []
        for i, s in enumerate(ids):
            if s not in done:
                continue
            row, cf, problem = writer.load_done(s)
            if problem:
                self.print(f"regenerating sample {s}: {problem}")
                writer.forget(s)
                continue
            old.append(i)
            src_i = torch.tensor([int(row["source"])], device=source.device)
            tgt_i = torch.tensor([int(row["target"])], device=source.device)
            if row.get("failure"):
                self.metrics.update_failed(
                    src_i,
                    tgt_i,
                    [s],
                    [row["failure"]],
                    originals=quantize(images[i : i + 1]) if not errors[i] else None,
                )
            else:
                self.metrics.update(quantize(images[i : i + 1]), cf.to(images)[None], src_i, tgt_i, [s])
        return old

    def _row(self, values: dict[str, Any], seconds: float) -> dict[str, Any]:
        row = dict(values)
        row.update(
            method=self.method.name,
            seed=self.seed,
            seconds=round(float(seconds), 4),
            failure=values.get("failure") or "",
        )
        row["success"] = bool(row.get("success")) and not row["failure"]
        return row
