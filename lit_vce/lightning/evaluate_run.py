"""Running ``lit-vce evaluate``: where the inputs come from (a run folder and its
``results.json``, or a folder pair with a targets CSV), the :class:`EvaluateModule`
stage built for them, its Trainer (:func:`~lit_vce.lightning.trainers.build_trainer`,
the defaults ``predict`` uses) and the command's arguments (:func:`main`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..classifiers import load_classifier
from .evaluate import EvaluateModule
from .pairs import PairDataset
from .stage import deferred_build
from .trainers import build_trainer


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
        "metrics",
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


@dataclass
class _Inputs:
    """What an evaluation reads: the flags as given, filled from a predict run's folder."""

    classifier: Any
    method: str | None
    fid_features: str
    output_dir: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    protocol: str | None = None
    dataset: str | None = None
    generation_time: float = float("nan")  # unknown for counterfactuals made elsewhere
    data: PairDataset | None = None

    def read_run(self, run: Path, image_size: int | None, module_kwargs: dict[str, Any]) -> None:
        """The run folder's pairs, and from its ``results.json`` (when it has one) what the
        flags leave open: classifier, method, protocol, dataset, generation time, metric settings."""
        prev = _predict_results(run, module_kwargs)
        if prev is not None:
            self.meta = {"predict_config": prev.get("config", {}), "evaluated": str(run)}
            # the run's classifier with its loader arguments (preprocessing, checkpoint), not only its spec
            self.classifier = self.classifier or prev.get("config", {}).get("classifier") or prev.get("classifier")
            self.method = self.method or prev.get("method")
            self.protocol, self.dataset = prev.get("protocol"), prev.get("dataset")
            self.generation_time = prev.get("wall_time_total_s") or prev.get("wall_time_s")
            self.fid_features = _settings_of_run(prev, self.fid_features, module_kwargs)
        self.data = PairDataset.from_run(run, image_size)
        self.output_dir = self.output_dir or str(run / "evaluation")
        self.method = self.method or next((e.get("method") for e in self.data.entries if e.get("method")), None)


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

    src = _Inputs(classifier=classifier, method=method, fid_features=fid_features, output_dir=output_dir)
    if run_dir is not None:
        if originals or counterfactuals or targets:
            raise ValueError("give either a run folder or --originals/--counterfactuals/--targets, not both")
        src.read_run(Path(run_dir), image_size, module_kwargs)
    else:
        if not (originals and counterfactuals and targets):
            raise ValueError("evaluate needs a run folder, or all of --originals, --counterfactuals and --targets")
        if not output_dir:
            raise ValueError("--out is required when evaluating plain folders")
        src.meta = {
            "evaluated": {"originals": str(originals), "counterfactuals": str(counterfactuals), "targets": str(targets)}
        }
    classifier, method, fid_features, data = src.classifier, src.method, src.fid_features, src.data
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
            output_dir=src.output_dir,
            method=method or "unknown",
            fid_features=fid_features,
            metadata=src.meta,
            protocol=src.protocol,
            dataset=src.dataset,
            **module_kwargs,
        )
    module.classifier_spec = classifier.get("spec", "") if isinstance(classifier, dict) else classifier
    module.generation_time_s = src.generation_time
    # the defaults predict uses; evaluation writes no logs (its results.json is the record)
    trainer = build_trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, logger=False)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    trainer.predict(module, loader, return_predictions=False)
    return module.final_results


def _parser():
    """The arguments of ``lit-vce evaluate``."""
    import argparse

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
        help="comma-separated optional metrics (fid,sfid,cout,lpips,latent,independent,audit; default: the run's "
        "selection, --model.metrics, else all); "
        "flip rates, confidences and L1/L2 are always computed",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--num-nodes", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> None:
    """``lit-vce evaluate`` (see ``lit-vce evaluate --help``)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    p = _parser()
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
