"""The LightningCLI side of ``lit-vce``: ``predict``, ``fetch``, ``disagree`` and ``neurons``
(:func:`run_predict`, :func:`run_analysis`), with the prediction writer attached as
``--writer.*``, registered method names resolved to class paths, the parsed config saved
in the run folder and the run's CSV logger. Imported only by the commands that run it
(``lit_vce.cli`` stays light, so ``lit-vce --help`` does not load Lightning's CLI)."""

from __future__ import annotations

import functools
import sys

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from ..data.datamodule import VCEDataModule
from .cli_args import (  # noqa: F401  (importable from here too)
    AUTO_OUTPUT_DIR,
    PARSER_KWARGS,
    _instantiate_method,
    configs_first,
    default_output_dir,
    parse_error_line,
    resolve_method_names,
)
from .module import VCEModule
from .trainers import TRAINER_DEFAULTS  # noqa: F401  (imported from here too)
from .writer import VCEPredictionWriter


class RunConfig(SaveConfigCallback):
    """Saves the parsed config as ``config.yaml`` in the run's output folder (the
    writer's ``output_dir``), not in the working directory; rank 0 only. The writer
    claims the folder first (lock, configuration check, ``run.json``): a refused run
    writes nothing. The file is written atomically."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        writers = [c for c in trainer.callbacks if isinstance(c, VCEPredictionWriter)]
        for w in writers:
            w.claim(trainer, pl_module)
        if trainer.is_global_zero and writers:
            from ..io import atomic_write_bytes

            out = writers[0].output_dir
            out.mkdir(parents=True, exist_ok=True)
            text = self.parser.dump(self.config, skip_unset=False)
            atomic_write_bytes(out / self.config_filename, text.encode())
        self.already_saved = trainer.strategy.broadcast(True)


def run_logger(save_dir: str):
    """The default logger: ``<run>/logs/metrics.csv``, kept across attempts (Lightning's
    CSVLogger deletes an existing file when it starts; a resumed or refused run must not)."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class _KeepingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:  # keep the earlier attempts' rows; new ones are appended
            import csv

            if self._fs.isfile(self.metrics_file_path):
                try:
                    with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                        self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])
                except (OSError, UnicodeDecodeError):
                    self.metrics_keys = []

    class RunCSVLogger(CSVLogger):
        @property
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = _KeepingWriter(log_dir=self.log_dir)
            return self._experiment

    return RunCSVLogger(save_dir=save_dir, name="logs", version="")


class VCECLI(LightningCLI):
    """LightningCLI with the prediction writer always attached as ``--writer.*``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"predict": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        from ..classifiers.loaders import classifier_class_names

        parser.add_lightning_class_args(VCEPredictionWriter, "writer")
        if "data.class_names" in parser.get_defaults():  # the data maps class-name folders to the classifier's classes
            parser.link_arguments("model.classifier", "data.class_names", compute_fn=classifier_class_names)

    def parse_arguments(self, parser, args) -> None:
        """Parse; a setting the run does not have (a typo in a flag, in a YAML file, in a
        method's arguments) is one line with a did-you-mean, not the parser's dump."""
        from jsonargparse import ArgumentError

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as e:
            from ..errors import ConfigError

            raise ConfigError(parse_error_line(str(e), parser)) from None

    def before_instantiate_classes(self) -> None:
        """``--writer.output_dir auto`` (the default) or a template becomes a folder named by
        the run (:func:`default_output_dir`), before anything is built or saved."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        cfg["writer"]["output_dir"] = default_output_dir(cfg)

    def instantiate_classes(self) -> None:
        """Build the run without its weights: the stage builds its models (the classifier,
        the metrics and the method with its diffusion model) in ``prepare_data`` on the
        process that fetches weights and in ``setup`` on the others (:mod:`lit_vce.weights`).
        A constructor rejecting a setting (``ValueError``, a missing file) is a user
        error: one line, not a traceback."""
        from ..errors import ConfigError, LitVCEError
        from .stage import deferred_build

        cfg = self.config[self.subcommand] if self.subcommand else self.config
        method = cfg["model"].get("method")
        if method is not None:  # validated by the parse; built in the stage's build()
            cfg["model"]["method"] = None
        try:
            with deferred_build():
                super().instantiate_classes()
        except LitVCEError:
            raise
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from e
        finally:
            cfg["model"]["method"] = method  # config.yaml is saved whole
        if method is not None:
            self.model.method_factory = functools.partial(_instantiate_method, method, type(self.model))
        out = cfg["writer"]["output_dir"]
        if (
            cfg["trainer"].get("default_root_dir") is None
        ):  # hpc (requeue) checkpoints go to the run folder, not the cwd
            self.trainer._default_root_dir = str(out)
        if cfg["trainer"].get("logger") is None:  # the default: metrics.csv in the run folder
            self.trainer.loggers = [run_logger(str(out))]

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        # the writer stores images as they come; accumulating them on every rank would exhaust memory
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        return kwargs


class AnalysisCLI(VCECLI):
    """``lit-vce disagree`` / ``lit-vce neurons``: the same CLI over :class:`AnalysisModule`."""

    analysis = "disagree"

    def add_arguments_to_parser(self, parser) -> None:
        from ..analyses.generate import ANALYSIS_FIELDS

        super().add_arguments_to_parser(parser)
        parser.set_defaults({"writer.fields": ANALYSIS_FIELDS, "model.analysis": self.analysis})


def run_analysis(analysis: str, args: list[str] | None) -> None:
    """Run ``disagree`` or ``neurons`` (``args=None`` parses ``sys.argv[2:]``)."""
    import warnings

    from ..analyses.generate import AnalysisModule, GenerationDataModule

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    argv = resolve_method_names(configs_first(list(sys.argv[2:] if args is None else args)))
    cli = type(f"{analysis.title()}CLI", (AnalysisCLI,), {"analysis": analysis})
    cli(
        AnalysisModule,
        GenerationDataModule,
        args=["predict", *argv],
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=RunConfig,
        seed_everything_default=False,
        parser_kwargs=PARSER_KWARGS,
    )


def run_predict(args: list[str] | None, run: bool = True) -> None:
    """Run ``predict``; ``args=None`` parses ``sys.argv`` (the console script). With
    ``run=False`` only build everything (``lit-vce fetch``: every weight file the run
    needs is loaded, so downloaded into its cache, once, before a multi-process launch)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    args = resolve_method_names(configs_first(list(sys.argv[2:] if args is None else args)))
    if not run:  # fetch: one process on this machine's CPU (a login node has no GPU), whatever the run's layout
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1"]
        args += ["--trainer.strategy", "auto", "--trainer.logger", "false"]
    cli = VCECLI(
        VCEModule,
        VCEDataModule,
        args=["predict", *args] if run else args,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=RunConfig,
        seed_everything_default=False,
        run=run,
        parser_kwargs=PARSER_KWARGS,
    )
    if not run:
        from ..errors import MissingWeightsError
        from ..weights import collecting_missing

        # what a run's fetching process does: build everything, downloading what is missing;
        # every part is tried, so all missing files are named at once
        with collecting_missing() as missing:
            cli.model.prepare_data()
        if missing:
            lines = "\n".join(f"  - {m}" for m in missing)
            raise MissingWeightsError(f"{len(missing)} weight file(s) of this run are missing:\n{lines}")
        print("fetch: every model of this run loaded (its weights are in their caches)")
