"""``lit-vce evaluate``: the metric suite as its own (DDP) stage over saved images.

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

import lightning as L
import torch

from ..classifiers import load_classifier
from ..metrics.build import build_suite
from ..progress import progress_enabled
from .pairs import PairDataset
from .stage import StageModule, deferred_build
from .writer import ROW_FIELDS, gather_rows


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


def _settings_of_run(prev: dict[str, Any], fid_features: str, module_kwargs: dict[str, Any]) -> str:
    """Fill ``module_kwargs`` with a predict run's seed, run name and metric settings (those not
    given); returns the FID features to use (the run's when ``fid_features`` is ``"auto"``)."""
    module_kwargs.setdefault("seed", prev.get("seed", 0))
    module_kwargs.setdefault("run_name", prev.get("run_name"))
    settings = prev.get("config", {}).get("metric_settings", {})
    for key in (
        "second_classifier",
        "world_audit",
        "resolution",
        "lpips",
        "autoencoder",
        "s3",
        "face_verification",
        "lpips_net",
        "attribute_oracle",
        "attributes",
    ):
        if module_kwargs.get(key) is None and settings.get(key) is not None:
            module_kwargs[key] = settings[key]  # the run's metric settings, unless overridden
    if fid_features == "auto" and settings.get("fid_features"):
        return settings["fid_features"]
    return fid_features


def _predict_results(run: Path, module_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The predict run's ``results.json`` as a dict (validated, and checked against the table
    beside it), or None. A run that never finished (``run.json`` without results) adds a
    ``partial`` warning to ``module_kwargs``: only its finished samples are evaluated."""
    from dataclasses import asdict

    from ..report.results import RunResults

    prior = run / "results.json"
    if prior.is_file():
        return asdict(RunResults.load(prior))
    if (run / "run.json").is_file():
        module_kwargs.setdefault("warnings", []).append(
            f"partial: the predict run in {run} did not finish (no results.json); only its finished samples are "
            "evaluated"
        )
    return None


def run_evaluate(
    run_dir: str | None = None,
    originals: str | None = None,
    counterfactuals: str | None = None,
    targets: str | None = None,
    output_dir: str | None = None,
    classifier: str | None = None,
    method: str | None = None,
    fid_features: str = "auto",
    image_size: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    **module_kwargs: Any,
) -> dict[str, Any] | None:
    """Evaluate a run folder or a folder pair; returns the final results (on every rank).

    ``fid_features="auto"`` uses the world's features for world classifiers and
    Inception otherwise. Other keyword arguments go to :class:`EvaluateModule`.
    """
    from torch.utils.data import DataLoader

    from ..data.datamodule import collate

    meta: dict[str, Any] = {}
    protocol = dataset_name = None
    generation_time = float("nan")  # unknown for counterfactuals made elsewhere
    if run_dir is not None:
        if originals or counterfactuals or targets:
            raise ValueError("give either a run folder or --originals/--counterfactuals/--targets, not both")
        run = Path(run_dir)
        prev = _predict_results(run, module_kwargs)
        if prev is not None:
            meta = {"predict_config": prev.get("config", {}), "evaluated": str(run)}
            # the run's classifier with its loader arguments (preprocessing, checkpoint), not only its spec
            classifier = classifier or prev.get("config", {}).get("classifier") or prev.get("classifier")
            method = method or prev.get("method")
            protocol, dataset_name = prev.get("protocol"), prev.get("dataset")
            generation_time = prev.get("wall_time_total_s") or prev.get("wall_time_s")
            fid_features = _settings_of_run(prev, fid_features, module_kwargs)
        data = PairDataset.from_run(run, image_size)
        output_dir = output_dir or str(run / "evaluation")
        method = method or next((e.get("method") for e in data.entries if e.get("method")), None)
    else:
        if not (originals and counterfactuals and targets):
            raise ValueError("evaluate needs a run folder, or all of --originals, --counterfactuals and --targets")
        if not output_dir:
            raise ValueError("--out is required when evaluating plain folders")
        meta = {
            "evaluated": {"originals": str(originals), "counterfactuals": str(counterfactuals), "targets": str(targets)}
        }
        data = None
    if classifier is None:
        raise ValueError("--classifier is required (no predict results.json names one)")
    from ..classifiers.loaders import check_classifier_spec, classifier_class_names

    check_classifier_spec(classifier)
    names = classifier_class_names(classifier)
    clf = classifier if names is not None else load_classifier(classifier)  # a local file: only its weights tell
    names = names if names is not None else list(clf.class_names)
    if data is None:
        data = PairDataset.from_folders(originals, counterfactuals, targets, image_size, class_names=names)
    data.check_classes(len(names))
    if fid_features == "auto":
        from ..world.models import WORLD_MODELS

        fid_features = "world" if classifier in WORLD_MODELS or str(classifier).startswith("world:") else "inception"
    with deferred_build():  # the models are built in prepare_data / setup (one fetching process per node)
        module = EvaluateModule(
            clf,
            output_dir=output_dir,
            method=method or "unknown",
            fid_features=fid_features,
            metadata=meta,
            protocol=protocol,
            dataset=dataset_name,
            **module_kwargs,
        )
    module.classifier_spec = classifier.get("spec", "") if isinstance(classifier, dict) else classifier
    module.generation_time_s = generation_time
    multi = devices > 1 or num_nodes > 1
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if multi else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        inference_mode=False,
        enable_progress_bar=progress_enabled(),
    )  # feature passes: on a terminal, not --quiet
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    trainer.predict(module, loader, return_predictions=False)
    return module.final_results


def main(argv: list[str] | None = None) -> None:
    """``lit-vce evaluate`` (see ``lit-vce evaluate --help``)."""
    import argparse
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    p = argparse.ArgumentParser(
        prog="lit-vce evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", nargs="?", help="a predict run folder (else use --originals/--counterfactuals/--targets)")
    p.add_argument("--originals", help="folder of original images")
    p.add_argument("--counterfactuals", help="folder of counterfactual images (same relative paths)")
    p.add_argument("--targets", help="CSV with columns file,source,target[,sample_id]")
    p.add_argument("--out", help="output folder (default <run_dir>/evaluation)")
    p.add_argument("--classifier", help="the explained classifier (default: the one in the run's results.json)")
    p.add_argument("--method", help="the method's name in the results (default: from the run)")
    p.add_argument(
        "--second-classifier", help="an independent classifier for *_independent validity (default: the run's)"
    )
    p.add_argument("--fid-features", default="auto", choices=["auto", "inception", "world", "none"])
    p.add_argument("--inception-weights", help="local Inception FID weights (else $LIT_VCE_INCEPTION_WEIGHTS, ...)")
    p.add_argument("--lpips", default=None, choices=["auto", "on", "off"], help="default: as the run had it, else auto")
    p.add_argument("--lpips-weights", help="local AlexNet weights for LPIPS (else $LIT_VCE_LPIPS_WEIGHTS, ...)")
    p.add_argument(
        "--s3",
        default=None,
        choices=["auto", "on", "off"],
        help="ACE's SimSiam similarity (weights: $LIT_VCE_WEIGHTS_DIR/simsiam/checkpoint_0099.pth.tar; default: as "
        "the run had it, else auto)",
    )
    p.add_argument(
        "--face-verification",
        default=None,
        choices=["on", "off"],
        help="FVA/FS with the VGGFace2 ResNet-50 ($LIT_VCE_WEIGHTS_DIR/vggface2/resnet50_ft_weight.pkl; default: as "
        "the run, else off)",
    )
    p.add_argument(
        "--world-audit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the world's shape/background audit (default: as the run had it)",
    )
    p.add_argument("--resolution", type=int, help="L1/L2 resolution (default: as the run had it, else native)")
    p.add_argument(
        "--autoencoder", help="first-stage autoencoder for latent L1/L2 (diffusers folder or hub id[:subfolder])"
    )
    p.add_argument("--image-size", type=int, help="resize all images to this square size when reading")
    p.add_argument("--seed", type=int, default=None, help="sFID split seed (default: the run's seed, else 0)")
    p.add_argument(
        "--interval-resamples",
        type=int,
        default=1000,
        help="bootstrap resamples of the 95 %% intervals of means (0: none)",
    )
    p.add_argument(
        "--fid-interval-resamples",
        type=int,
        default=200,
        help="bootstrap resamples of the FID/sFID intervals (0: none; at N >= 2048 each costs two 2048-d "
        "eigendecompositions)",
    )
    p.add_argument(
        "--metrics",
        default=None,
        help="comma-separated optional metrics (fid,sfid,cout,lpips,latent,independent,audit; default: all); "
        "flip rates, confidences and L1/L2 are always computed",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--num-nodes", type=int, default=1)
    a = p.parse_args(argv)
    kwargs: dict[str, Any] = {}
    if a.seed is not None:
        kwargs["seed"] = a.seed
    if a.metrics is not None:
        kwargs["metrics"] = a.metrics
    kwargs.update(interval_resamples=a.interval_resamples, fid_interval_resamples=a.fid_interval_resamples)
    from ..errors import MissingWeightsError
    from ..errors import LitVCEError

    try:
        run_evaluate(
            a.run_dir,
            a.originals,
            a.counterfactuals,
            a.targets,
            a.out,
            a.classifier,
            a.method,
            a.fid_features,
            a.image_size,
            a.batch_size,
            a.num_workers,
            a.accelerator,
            a.devices,
            a.num_nodes,
            second_classifier=a.second_classifier,
            inception_weights=a.inception_weights,
            lpips=a.lpips,
            lpips_weights=a.lpips_weights,
            world_audit=a.world_audit,
            resolution=a.resolution,
            autoencoder=a.autoencoder,
            s3=a.s3,
            face_verification=a.face_verification,
            **kwargs,
        )
    except (ValueError, FileNotFoundError, MissingWeightsError, LitVCEError) as e:
        p.exit(2, f"lit-vce evaluate: {e}\n")
