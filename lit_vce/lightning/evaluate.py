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

import csv
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset

from ..classifiers import load_classifier
from ..metrics.suite import build_suite, resize_to
from ..io import load_png, sample_key, verify_file
from ..progress import progress_enabled
from .stage import StageModule, deferred_build
from .writer import ROW_FIELDS, gather_rows


def _image_size(path: Path) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # unreadable: reported per sample later
        return None


class PairDataset(Dataset):
    """(original, counterfactual, source, target) pairs read from disk.

    Build it with :meth:`from_run` or :meth:`from_folders`. Items hold
    ``original`` and ``counterfactual`` (3, H, W) in [0, 1] (zeros when
    ``error`` is set), ``source``, ``target``, ``sample_id`` and ``error``.

    Args:
        entries: dicts with ``sample_id``, ``original`` and ``counterfactual``
            (paths), ``source``, ``target`` and optionally ``failure`` (a failure
            recorded upstream; the sample is then not evaluated).
        image_size: resize every image to this square size (None: keep; all
            images must then share the size of the first readable one).
        all_may_fail: a run folder whose every sample failed is evaluated (each a
            failure row); plain folders without one readable image are an error.
    """

    def __init__(self, entries: list[dict[str, Any]], image_size: int | None = None, all_may_fail: bool = False):
        if not entries:
            raise ValueError("nothing to evaluate: no samples found")
        ids = [e["sample_id"] for e in entries]
        if len(set(ids)) != len(ids):
            dup = sorted({s for s in ids if ids.count(s) > 1})[:5]
            raise ValueError(f"duplicate sample ids {dup}")
        self.entries = entries
        self.image_size = image_size
        self.shape: tuple[int, int] | None = (image_size, image_size) if image_size else None
        if self.shape is None:
            for e in entries:
                if not e.get("failure") and Path(e["counterfactual"]).is_file():
                    self.shape = _image_size(Path(e["counterfactual"]))
                    if self.shape is not None:
                        break
        if self.shape is None:
            for e in entries:  # a run whose every counterfactual failed: the originals tell the size
                if Path(e["original"]).is_file():
                    self.shape = _image_size(Path(e["original"]))
                    if self.shape is not None:
                        break
        if self.shape is None and all_may_fail:
            self.shape = (1, 1)  # nothing readable: every sample is a recorded failure
        if self.shape is None:
            raise ValueError("no readable counterfactual image among the samples")

    # --- constructors ----------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, image_size: int | None = None) -> PairDataset:
        """The samples of a run folder written by ``lit-vce predict``."""
        run = Path(run_dir)
        if not (run / "samples").is_dir():
            raise FileNotFoundError(f"{run} is not a predict run folder (no samples/ inside); for plain folders use "
                                    "--originals/--counterfactuals/--targets")
        entries = []
        for p in sorted((run / "samples").glob("*.json")):
            try:
                row = json.loads(p.read_text())
                sid = row["sample_id"]
            except (json.JSONDecodeError, KeyError, OSError) as e:
                raise ValueError(f"unreadable sample record {p}: {e}") from e
            key = sample_key(sid)
            entries.append({"sample_id": sid, "source": int(row["source"]), "target": int(row["target"]),
                            "original": run / "originals" / f"{key}.png", "counterfactual": run / "counterfactuals" / f"{key}.png",
                            "failure": row.get("failure") or "", "method": row.get("method"),
                            "sha256": row.get("files") or {}, "seconds": row.get("seconds")})
        known = {sample_key(e["sample_id"]) for e in entries}
        for png in sorted((run / "counterfactuals").glob("*.png")):
            if png.stem not in known:  # an image without its record: listed as a failure, not dropped
                entries.append({"sample_id": f"(no metadata) {png.stem}", "source": -1, "target": -1, "original": png,
                                "counterfactual": png, "failure": f"sample metadata samples/{png.stem}.json is missing"})
        entries.sort(key=lambda e: e["sample_id"])
        return cls(entries, image_size, all_may_fail=True)

    @classmethod
    def from_folders(cls, originals: str | Path, counterfactuals: str | Path, targets_csv: str | Path,
                     image_size: int | None = None, class_names: list[str] | None = None) -> PairDataset:
        """Pairs ``originals/<file>`` and ``counterfactuals/<file>`` listed in a CSV with
        columns ``file``, ``source``, ``target`` (ids, or names from ``class_names``) and
        optionally ``sample_id``."""
        o, c, t = Path(originals), Path(counterfactuals), Path(targets_csv)
        for p, what in ((o, "originals folder"), (c, "counterfactuals folder")):
            if not p.is_dir():
                raise FileNotFoundError(f"{what} {p} does not exist")
        if not t.is_file():
            raise FileNotFoundError(f"targets CSV {t} does not exist")
        with t.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"file", "source", "target"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{t}: missing column(s) {sorted(missing)}; expected file,source,target[,sample_id]")
            rows = list(reader)
        if not rows:
            raise ValueError(f"{t} lists no samples")
        lookup = {n: i for i, n in enumerate(class_names or [])}

        def cls_id(value: str, line: int, col: str) -> int:
            value = value.strip()
            try:
                return int(value)
            except ValueError:
                if value in lookup:
                    return lookup[value]
                raise ValueError(f"{t} line {line}: unknown {col} class {value!r} (not an id, not a class name)") from None

        entries = []
        for line, r in enumerate(rows, start=2):
            rel = r["file"].strip()
            if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ValueError(f"{t} line {line}: 'file' must be a relative path inside both folders, got {rel!r}")
            entries.append({"sample_id": (r.get("sample_id") or "").strip() or rel, "source": cls_id(r["source"], line, "source"),
                            "target": cls_id(r["target"], line, "target"), "original": o / rel, "counterfactual": c / rel,
                            "failure": ""})
        return cls(entries, image_size)

    # --- checks and items ------------------------------------------------------
    def check_classes(self, num_classes: int) -> None:
        """Raise before any work when a source/target id is outside the classifier's classes,
        or a target equals its source (the rule of predict and explain() as well)."""
        from ..metrics.accounting import check_distinct_targets

        bad = sorted({v for e in self.entries if not e.get("failure") for v in (e["source"], e["target"])
                      if not 0 <= v < num_classes})
        if bad:
            raise ValueError(f"class ids {bad[:10]} are unknown to the classifier (classes 0..{num_classes - 1})")
        live = [e for e in self.entries if not e.get("failure")]
        check_distinct_targets([e["source"] for e in live], [e["target"] for e in live], [e["sample_id"] for e in live])

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, path: Path) -> torch.Tensor:
        return resize_to(load_png(path)[None], self.image_size)[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        h, w = self.shape
        item = {"sample_id": e["sample_id"], "source": e["source"], "target": e["target"], "error": e.get("failure") or "",
                "seconds": float(e["seconds"]) if isinstance(e.get("seconds"), (int, float)) else float("nan")}
        images: dict[str, torch.Tensor] = {}
        problems: dict[str, str] = {}
        for side in ("original", "counterfactual"):
            path = Path(e[side])
            if not path.is_file():
                problems[side] = f"missing {side} file {path}"
                continue
            sha = (e.get("sha256") or {}).get(side)
            problem = verify_file(path, sha) if sha else ""
            if problem:
                problems[side] = f"{side}: {problem}"
                continue
            try:
                images[side] = self._load(path)
            except Exception as err:  # PIL raises many types for corrupt files
                problems[side] = f"unreadable {side} {path}: {type(err).__name__}: {err}"
                continue
        if "original" in images and "counterfactual" in images:
            so, sc = tuple(images["original"].shape[-2:]), tuple(images["counterfactual"].shape[-2:])
            if so != sc:
                problems["counterfactual"] = f"size mismatch: original {so[0]}x{so[1]}, counterfactual {sc[0]}x{sc[1]}"
                del images["counterfactual"]
        for side in list(images):
            sz = tuple(images[side].shape[-2:])
            if sz != (h, w):
                problems.setdefault(side, f"size {sz[0]}x{sz[1]} differs from the other images' {h}x{w} (set image_size to resize)")
                del images[side]
        if not item["error"] and problems:
            item["error"] = problems.get("counterfactual") or problems["original"]
        # the original alone still tells whether the classifier got it right (flip_rate_source_correct)
        item["original_ok"] = "original" in images and e["source"] >= 0
        item["original"] = images.get("original", torch.zeros(3, h, w))
        item["counterfactual"] = images["counterfactual"] if not item["error"] else torch.zeros(3, h, w)
        return item


class EvaluateModule(StageModule):
    """The metric suite over saved (original, counterfactual) pairs, as a prediction stage.

    Args:
        classifier: the explained classifier's spec (or an ``ImageClassifier``).
        output_dir: where ``results.json`` and ``samples.csv`` go.
        method, run_name: labels stored in the results.
        metadata: extra fields for the results' config (e.g. the predict run's config).
        The other arguments are those of :func:`lit_vce.metrics.suite.build_suite`.
    """

    def __init__(self, classifier: str = "biased", output_dir: str = "evaluation", method: str = "unknown",
                 run_name: str | None = None, fid_features: str = "world", inception_weights: str | None = None,
                 second_classifier: str | None = None, lpips: str = "auto", world_audit: bool = False,
                 resolution: int | None = None, autoencoder: str | None = None, seed: int = 0,
                 metadata: dict[str, Any] | None = None, protocol: str | None = None, dataset: str | None = None,
                 lpips_weights: str | None = None, fetch_per_node: bool = True, metrics=None,
                 interval_resamples: int = 1000, fid_interval_resamples: int = 200, warnings: list[str] | None = None,
                 s3: str = "auto", face_verification: str = "off"):
        super().__init__(fetch_per_node)
        self.warnings = list(warnings or [])
        from ..classifiers.loaders import check_classifier_spec

        check_classifier_spec(classifier)
        self._classifier_arg = classifier
        self.classifier_spec = classifier if isinstance(classifier, str) else classifier.name
        self.generation_time_s = float("nan")  # the run's, when known (results keep it; evaluation time is separate)
        self._suite_args = dict(fid_features=fid_features, inception_weights=inception_weights,
                                second_classifier=second_classifier, lpips=lpips or "auto", world_audit=bool(world_audit),
                                resolution=resolution, autoencoder=autoencoder, seed=seed, lpips_weights=lpips_weights,
                                metrics=metrics, interval_resamples=interval_resamples,
                                fid_interval_resamples=fid_interval_resamples, s3=s3 or "auto",
                                face_verification=face_verification or "off")
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
        rows = score_batch(self.metrics, batch["original"], batch["counterfactual"], batch["source"], batch["target"], ids,
                           [e or None for e in errors], original_ok=[bool(v) for v in batch["original_ok"]])
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
            rows, metrics, n, self.method_name, wall_time_s=self.generation_time_s, evaluation_time_s=round(wall, 2),
            audit=audit, config={**self.metadata, "metrics": self.metrics.describe(), "classifier": self.classifier_spec},
            protocol=self.protocol, dataset=self.dataset_name, warnings=self.warnings)
        self.finalize(self.output_dir, rows, results, ROW_FIELDS, grid=False)
        failed = sum(1 for r in rows if r.get("failure"))
        for w in self.warnings:
            print(f"warning: {w}")
        print(f"evaluated {n} samples ({failed} failed): flip rate {metrics['flip_rate']:.3f}, L2 {metrics['l2']:.3f}"
              + (f", FID {metrics['fid']:.3f} (N={metrics['fid_n']})" if "fid" in metrics else "")
              + f"; results in {self.output_dir / 'results.json'}")


def _settings_of_run(prev: dict[str, Any], fid_features: str, module_kwargs: dict[str, Any]) -> str:
    """Fill ``module_kwargs`` with a predict run's seed, run name and metric settings (those not
    given); returns the FID features to use (the run's when ``fid_features`` is ``"auto"``)."""
    module_kwargs.setdefault("seed", prev.get("seed", 0))
    module_kwargs.setdefault("run_name", prev.get("run_name"))
    settings = prev.get("config", {}).get("metric_settings", {})
    for key in ("second_classifier", "world_audit", "resolution", "lpips", "autoencoder", "s3", "face_verification"):
        if module_kwargs.get(key) is None and settings.get(key) is not None:
            module_kwargs[key] = settings[key]  # the run's metric settings, unless overridden
    if fid_features == "auto" and settings.get("fid_features"):
        return settings["fid_features"]
    return fid_features


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
        prior = run / "results.json"
        if not prior.is_file() and (run / "run.json").is_file():
            # a predict run that never finished: its finished samples only, and the results say so
            module_kwargs.setdefault("warnings", []).append(
                f"partial: the predict run in {run} did not finish (no results.json); only its finished samples are evaluated")
        if prior.is_file():
            from ..report.results import RunResults

            RunResults.load(prior)  # readable, valid and the results of the table beside it
            prev = json.loads(prior.read_text())
            meta = {"predict_config": prev.get("config", {}), "evaluated": str(run)}
            classifier = classifier or prev.get("classifier")
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
        meta = {"evaluated": {"originals": str(originals), "counterfactuals": str(counterfactuals), "targets": str(targets)}}
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
        module = EvaluateModule(clf, output_dir=output_dir, method=method or "unknown", fid_features=fid_features,
                                metadata=meta, protocol=protocol, dataset=dataset_name, **module_kwargs)
    module.classifier_spec = classifier
    module.generation_time_s = generation_time
    multi = devices > 1 or num_nodes > 1
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy="ddp" if multi else "auto",
                        logger=False, enable_checkpointing=False, enable_model_summary=False, inference_mode=False,
                        enable_progress_bar=progress_enabled())  # feature passes: on a terminal, not --quiet
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    trainer.predict(module, loader, return_predictions=False)
    return module.final_results


def main(argv: list[str] | None = None) -> None:
    """``lit-vce evaluate`` (see ``lit-vce evaluate --help``)."""
    import argparse
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    p = argparse.ArgumentParser(prog="lit-vce evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="a predict run folder (else use --originals/--counterfactuals/--targets)")
    p.add_argument("--originals", help="folder of original images")
    p.add_argument("--counterfactuals", help="folder of counterfactual images (same relative paths)")
    p.add_argument("--targets", help="CSV with columns file,source,target[,sample_id]")
    p.add_argument("--out", help="output folder (default <run_dir>/evaluation)")
    p.add_argument("--classifier", help="the explained classifier (default: the one in the run's results.json)")
    p.add_argument("--method", help="the method's name in the results (default: from the run)")
    p.add_argument("--second-classifier", help="an independent classifier for *_independent validity (default: the run's)")
    p.add_argument("--fid-features", default="auto", choices=["auto", "inception", "world", "none"])
    p.add_argument("--inception-weights", help="local Inception FID weights (else $LIT_VCE_INCEPTION_WEIGHTS, ...)")
    p.add_argument("--lpips", default=None, choices=["auto", "on", "off"], help="default: as the run had it, else auto")
    p.add_argument("--lpips-weights", help="local AlexNet weights for LPIPS (else $LIT_VCE_LPIPS_WEIGHTS, ...)")
    p.add_argument("--s3", default=None, choices=["auto", "on", "off"],
                   help="ACE's SimSiam similarity (weights: $LIT_VCE_WEIGHTS_DIR/simsiam/checkpoint_0099.pth.tar; default: as the run had it, else auto)")
    p.add_argument("--face-verification", default=None, choices=["on", "off"],
                   help="FVA/FS with the VGGFace2 ResNet-50 ($LIT_VCE_WEIGHTS_DIR/vggface2/resnet50_ft_weight.pkl; default: as the run, else off)")
    p.add_argument("--world-audit", action=argparse.BooleanOptionalAction, default=None,
                   help="the world's shape/background audit (default: as the run had it)")
    p.add_argument("--resolution", type=int, help="L1/L2 resolution (default: as the run had it, else native)")
    p.add_argument("--autoencoder", help="first-stage autoencoder for latent L1/L2 (diffusers folder or hub id[:subfolder])")
    p.add_argument("--image-size", type=int, help="resize all images to this square size when reading")
    p.add_argument("--seed", type=int, default=None, help="sFID split seed (default: the run's seed, else 0)")
    p.add_argument("--interval-resamples", type=int, default=1000, help="bootstrap resamples of the 95 %% intervals of means (0: none)")
    p.add_argument("--fid-interval-resamples", type=int, default=200,
                   help="bootstrap resamples of the FID/sFID intervals (0: none; at N >= 2048 each costs two 2048-d eigendecompositions)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated optional metrics (fid,sfid,cout,lpips,latent,independent,audit; default: all); "
                        "flip rates, confidences and L1/L2 are always computed")
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
    from ..classifiers import MissingWeightsError
    from ..errors import LitVCEError

    try:
        run_evaluate(a.run_dir, a.originals, a.counterfactuals, a.targets, a.out, a.classifier, a.method, a.fid_features,
                     a.image_size, a.batch_size, a.num_workers, a.accelerator, a.devices, a.num_nodes,
                     second_classifier=a.second_classifier, inception_weights=a.inception_weights, lpips=a.lpips,
                     lpips_weights=a.lpips_weights,
                     world_audit=a.world_audit, resolution=a.resolution, autoencoder=a.autoencoder, s3=a.s3,
                     face_verification=a.face_verification, **kwargs)
    except (ValueError, FileNotFoundError, MissingWeightsError, LitVCEError) as e:
        p.exit(2, f"lit-vce evaluate: {e}\n")

