"""``lit-vce evaluate``: the metric suite as its own (DDP) stage over saved images
(:class:`EvaluateModule`; the command that runs it: :mod:`lit_vce.lightning.evaluate_run`).

Inputs are either a run folder written by :class:`VCEPredictionWriter`
(``originals/``, ``counterfactuals/``, ``samples/*.json``), or, for methods run
elsewhere, a plain pair of folders with a CSV of targets::

    file,source,target            # file: the path relative to both folders
    n01440764/img1.png,0,391      # source/target: class ids (or class names)

The saved PNGs are re-read, so the numbers match what is on disk. Per-sample
problems (a missing or unreadable file, a counterfactual whose size differs from
its original's or from the run's) become failure rows; problems with the whole
input (no samples, a malformed CSV, a class id the classifier does not know) are
errors raised before any work. Results are written only at the end, atomically:
``results.json`` and ``samples.csv`` in the output folder (default
``<run>/evaluation``), so an interrupted evaluation leaves nothing half-written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..classifiers import load_classifier
from ..metrics.build import build_suite
from .stage import StageModule
from .collectives import gather_rows
from .writer import ROW_FIELDS


class EvaluateModule(StageModule):
    """The metric suite over saved (original, counterfactual) pairs, as a prediction stage.

    Args:
        classifier: the explained classifier's spec (or an ``ImageClassifier``).
        output_dir: where ``results.json`` and ``samples.csv`` go.
        method, run_name: labels stored in the results.
        metadata: extra fields for the results' config (e.g. the predict run's config).
        The other arguments are those of :func:`lit_vce.metrics.build.build_suite`.
    """

    def __init__(
        self,
        classifier: str = "biased",
        output_dir: str = "evaluation",
        method: str = "unknown",
        run_name: str | None = None,
        fid_features: str = "world",
        inception_weights: str | None = None,
        second_classifier: str | None = None,
        lpips: str = "auto",
        world_audit: bool = False,
        resolution: int | None = None,
        autoencoder: str | None = None,
        seed: int = 0,
        metadata: dict[str, Any] | None = None,
        protocol: str | None = None,
        dataset: str | None = None,
        lpips_weights: str | None = None,
        fetch_per_node: bool = True,
        metrics=None,
        interval_resamples: int = 1000,
        fid_interval_resamples: int = 200,
        warnings: list[str] | None = None,
        s3: str = "auto",
        face_verification: str = "off",
        lpips_net: str | None = None,
        attribute_oracle: str | None = None,
        attributes: dict | None = None,
    ):
        super().__init__(fetch_per_node)
        self.warnings = list(warnings or [])
        from ..classifiers.loaders import check_classifier_spec

        check_classifier_spec(classifier)
        self._classifier_arg = classifier
        self.classifier_spec = (
            classifier
            if isinstance(classifier, str)
            else (classifier.get("spec", "") if isinstance(classifier, dict) else classifier.name)
        )
        self.generation_time_s = float("nan")  # the run's, when known (results keep it; evaluation time is separate)
        self._suite_args = dict(
            fid_features=fid_features,
            inception_weights=inception_weights,
            second_classifier=second_classifier,
            lpips=lpips or "auto",
            world_audit=bool(world_audit),
            resolution=resolution,
            autoencoder=autoencoder,
            seed=seed,
            lpips_weights=lpips_weights,
            metrics=metrics,
            interval_resamples=interval_resamples,
            fid_interval_resamples=fid_interval_resamples,
            s3=s3 or "auto",
            face_verification=face_verification or "off",
            lpips_net=lpips_net or "alex",
            attribute_oracle=attribute_oracle or "off",
            attributes=attributes,
        )
        from ..metrics.suite import check_metrics

        check_metrics(metrics)  # an unknown name fails before anything is built
        self.output_dir = Path(output_dir)
        self.method_name, self.seed = method, seed
        self._run_name = run_name
        self.metadata = dict(metadata or {})
        self.protocol, self.dataset_name = protocol, dataset
        self._rows: list[dict[str, Any]] = []
        self._t0 = 0.0
        self.final_results: dict[str, Any] | None = None
        self._build_unless_deferred()

    def _classifier_config(self):
        """The classifier as given (a mapping keeps its loader arguments), else its spec."""
        arg = self._classifier_arg
        return arg if isinstance(arg, (str, dict)) else self.classifier_spec

    def build(self) -> None:
        """The classifier and the metric suite."""
        self.classifier = load_classifier(self._classifier_arg)
        self.run_name = self._run_name or f"{self.method_name}-{self.classifier.name}"
        self.metrics = build_suite(self.classifier, **self._suite_args)

    stage = "evaluate"

    def on_predict_start(self) -> None:
        self._rows, self._t0 = [], time.perf_counter()

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> int:
        from ..metrics.accounting import score_batch

        ids, errors = list(batch["sample_id"]), list(batch["error"])
        # every sample was attempted: a missing, unreadable or changed file is a failure (not flipped)
        rows = score_batch(
            self.metrics,
            batch["original"],
            batch["counterfactual"],
            batch["source"],
            batch["target"],
            ids,
            [e or None for e in errors],
            original_ok=[bool(v) for v in batch["original_ok"]],
        )
        for r, sec in zip(rows, batch.get("seconds", [None] * len(rows))):
            r.update(method=self.method_name, seed=self.seed)
            if sec is not None and float(sec) == float(sec):
                r["seconds"] = float(sec)
        self._rows.extend(rows)
        return len(ids)

    def on_predict_epoch_end(self) -> None:
        metrics, audit, n = self.metrics.compute()  # a collective: every rank
        rows = gather_rows(self._rows)
        rows.sort(key=lambda r: r["sample_id"])
        wall = time.perf_counter() - self._t0
        self.final_results = {"metrics": metrics, "audit": audit, "n": n, "rows": rows, "wall_time_s": wall}
        if self.trainer.is_global_zero:
            self._write(metrics, audit, n, rows, wall)
        self.trainer.strategy.barrier()
        self.metrics.reset()

    def _write(self, metrics, audit, n, rows, wall) -> None:
        results = self.results(
            rows,
            metrics,
            n,
            self.method_name,
            wall_time_s=self.generation_time_s,
            evaluation_time_s=round(wall, 2),
            audit=audit,
            config={**self.metadata, "metrics": self.metrics.describe(), "classifier": self._classifier_config()},
            protocol=self.protocol,
            dataset=self.dataset_name,
            warnings=self.warnings,
        )
        self.finalize(self.output_dir, rows, results, ROW_FIELDS, grid=False)
        failed = sum(1 for r in rows if r.get("failure"))
        for w in self.warnings:
            print(f"warning: {w}")
        print(
            f"evaluated {n} samples ({failed} failed): flip rate {metrics['flip_rate']:.3f}, L2 {metrics['l2']:.3f}"
            + (f", FID {metrics['fid']:.3f} (N={metrics['fid_n']})" if "fid" in metrics else "")
            + f"; results in {self.output_dir / 'results.json'}"
        )
