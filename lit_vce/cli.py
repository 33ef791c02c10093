"""The ``lit-vce`` command line.

    lit-vce predict --config world/dvce [--model.classifier robust] \\
        [--writer.output_dir runs/x] [--trainer.devices 2 --trainer.strategy ddp]
    lit-vce demo [--num-samples 64]       # the embedded-world benchmark (scripts/demo.sh)
    lit-vce evaluate RUN_DIR [--devices 2]   # re-read saved PNGs, the full metric suite
    lit-vce evaluate --originals O --counterfactuals C --targets T.csv --classifier X --out DIR
    lit-vce leaderboard RUNS_DIR [--sort-by FR] [--published PRESET]   # leaderboard.md/.html/.tex
    lit-vce diversity RUN RUN [RUN ...]   # sigma_L across seeds (LPIPS-VGG, as DiME and ACE)
    lit-vce report RUN_DIR [RUN_DIR ...] [--rank-by l2]   # report.html
    lit-vce disagree --config world/disagree   # systematic errors (DiG-IN)
    lit-vce neurons --config world/neurons     # neuron visualisation (DiG-IN)
    lit-vce spurious --classifier biased                    # spurious penultimate units
    lit-vce findings                      # the world's shortcut findings, with intervals
    lit-vce fetch --config imagenet/base ...   # load (download) every model of a run, once
    lit-vce methods                       # the registered methods
    lit-vce configs                       # the shipped configs (--config world/dvce, imagenet/base, ...)

``--config`` takes a file or a shipped config's name. ``--quiet`` (before or after
the subcommand) turns progress bars off; user errors end in one line naming the
option and the fix (``LIT_VCE_DEBUG=1`` shows the traceback).

``predict`` is a LightningCLI: every argument of :class:`VCEModule`,
:class:`VCEDataModule`, :class:`VCEPredictionWriter` (as ``--writer.*``) and the
Trainer can be set in YAML or overridden on the command line.
"""

from __future__ import annotations

import argparse
import functools
import sys

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from .data.datamodule import VCEDataModule
from .lightning.module import VCEModule
from .lightning.writer import VCEPredictionWriter

TRAINER_DEFAULTS = {
    "inference_mode": False,  # guidance needs autograd inside predict_step
    "logger": None,  # None: a CSVLogger in the run folder (<output_dir>/logs/metrics.csv); false: none
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "accelerator": "auto",
    "devices": 1,
}


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
            from .io import atomic_write_bytes

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
        from .classifiers.loaders import classifier_class_names

        parser.add_lightning_class_args(VCEPredictionWriter, "writer")
        if "data.class_names" in parser.get_defaults():  # the data maps class-name folders to the classifier's classes
            parser.link_arguments("model.classifier", "data.class_names", compute_fn=classifier_class_names)

    def instantiate_classes(self) -> None:
        """Build the run without its weights: the stage builds its models (the classifier,
        the metrics and the method with its diffusion model) in ``prepare_data`` on the
        process that fetches weights and in ``setup`` on the others (:mod:`lit_vce.weights`).
        A constructor rejecting a setting (``ValueError``, a missing file) is a user
        error: one line, not a traceback."""
        from .errors import ConfigError, LitVCEError
        from .lightning.stage import deferred_build

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
        if cfg["trainer"].get("default_root_dir") is None:  # hpc (requeue) checkpoints go to the run folder, not the cwd
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
        from .analyses.generate import ANALYSIS_FIELDS

        super().add_arguments_to_parser(parser)
        parser.set_defaults({"writer.fields": ANALYSIS_FIELDS, "model.analysis": self.analysis})


def _instantiate_method(config, module_class):
    """The method of a parsed ``model.method`` config (class_path and init_args), built."""
    import typing

    from jsonargparse import ArgumentParser, Namespace

    from .errors import ConfigError

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=typing.get_type_hints(module_class.__init__)["method"])  # as the CLI parsed it
    try:
        return parser.instantiate(Namespace(method=config)).method
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--model.method: {e}") from e


def _class_path(name: str) -> str | None:
    """The class path of a registered method name (``None`` when ``name`` is not one)."""
    from .registry import METHODS

    if not isinstance(name, str) or "." in name or name not in METHODS:
        return None
    cls = METHODS.get(name)
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve_config_file(path: str) -> str:
    """A YAML config whose ``model.method`` is a registered name (``method: dvce``) or has
    one as ``class_path`` becomes a resolved copy (a temporary file); others stay as they are."""
    import atexit
    import os
    import tempfile
    from pathlib import Path

    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return path  # jsonargparse reports unreadable configs itself
    model = cfg.get("model") if isinstance(cfg, dict) else None
    method = model.get("method") if isinstance(model, dict) else None
    if isinstance(method, str) and _class_path(method):
        model["method"] = {"class_path": _class_path(method)}
    elif isinstance(method, dict) and _class_path(method.get("class_path")):
        method["class_path"] = _class_path(method["class_path"])
    else:
        return path
    fd, out = tempfile.mkstemp(prefix=f"{Path(path).stem}-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    atexit.register(lambda p=out: os.path.exists(p) and os.remove(p))
    return out


def resolve_method_names(argv: list[str]) -> list[str]:
    """Registered method names become class paths, so jsonargparse can build the method
    and its arguments follow as ``--model.method.init_args.<arg>`` (or ``--model.method.<arg>``):
    on the command line ``--model.method NAME`` (or ``=NAME``, or ``--model.method.class_path
    NAME``), and in YAML files given with ``--config`` ``method: NAME`` or ``class_path: NAME``."""
    keys = ("--model.method", "--model.method.class_path")
    out = list(argv)
    for i, a in enumerate(out):
        key, eq, value = a.partition("=")
        j = i if eq else i + 1
        value = value if eq else (out[j] if j < len(out) else "")
        if key == "--config" and value:
            from .config_files import find_config

            new = _resolve_config_file(str(find_config(value)))
        elif key in keys and _class_path(value):
            new = _class_path(value)
        elif key in keys and value and "." not in value:  # neither registered nor a class path
            from .errors import UnknownNameError, suggest
            from .registry import METHODS

            raise UnknownNameError(f"{key} {value}: no such method{suggest(value, METHODS.names())} "
                                   f"(`lit-vce methods` lists {', '.join(METHODS.names())})")
        else:
            continue
        if eq:
            out[i] = f"{key}={new}"
        else:
            out[j] = new
    return out


def run_analysis(analysis: str, args: list[str] | None) -> None:
    """Run ``disagree`` or ``neurons`` (``args=None`` parses ``sys.argv[2:]``)."""
    import warnings

    from .analyses.generate import AnalysisModule, GenerationDataModule

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    argv = resolve_method_names(list(sys.argv[2:] if args is None else args))
    cli = type(f"{analysis.title()}CLI", (AnalysisCLI,), {"analysis": analysis})
    cli(AnalysisModule, GenerationDataModule, args=["predict", *argv], trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=RunConfig, seed_everything_default=False)


def run_predict(args: list[str] | None, run: bool = True) -> None:
    """Run ``predict``; ``args=None`` parses ``sys.argv`` (the console script). With
    ``run=False`` only build everything (``lit-vce fetch``: every weight file the run
    needs is loaded, so downloaded into its cache, once, before a multi-process launch)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    args = resolve_method_names(list(sys.argv[2:] if args is None else args))
    cli = VCECLI(
        VCEModule, VCEDataModule, args=["predict", *args] if run else args, trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=RunConfig, seed_everything_default=False, run=run,
    )
    if not run:
        cli.model.prepare_data()  # what a run's fetching process does: build everything, downloading what is missing
        print("fetch: every model of this run loaded (its weights are in their caches)")


def main(argv: list[str] | None = None) -> None:
    """The ``lit-vce`` console script: errors of the user's input (:class:`LitVCEError`)
    end in one line (exit status 2) instead of a traceback."""
    import os

    from .errors import LitVCEError

    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quiet" in argv:
        from .progress import set_quiet

        set_quiet()
        argv.remove("--quiet")
        if argv and argv[0] in ("predict", "disagree", "neurons", "fetch"):
            argv.append("--trainer.enable_progress_bar=false")
        if from_console:  # `predict` re-reads sys.argv
            sys.argv = [sys.argv[0], *argv]
    try:
        return _dispatch(argv, from_console)
    except BrokenPipeError:  # `lit-vce configs | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except LitVCEError as e:
        if os.environ.get("LIT_VCE_DEBUG", "0") not in ("", "0"):
            raise
        command = argv[0] if argv and not argv[0].startswith("-") else ""
        sys.stderr.write(f"lit-vce{' ' + command if command else ''}: {e}\n")
        raise SystemExit(2) from None


#: the subcommands whose module has a ``main(argv)`` of its own
_MAIN_OF = {"spurious": ".analyses.spurious", "evaluate": ".lightning.evaluate", "compare": ".report.compare",
            "diversity": ".report.diversity", "demo": ".demo", "findings": ".findings", "cost": ".cost"}


def _dispatch(argv: list[str], from_console: bool) -> None:
    if argv and argv[0] == "predict":
        return run_predict(None if from_console else argv[1:])
    if argv and argv[0] == "fetch":
        return run_predict(argv[1:], run=False)
    if argv and argv[0] in ("disagree", "neurons"):
        return run_analysis(argv[0], argv[1:])
    if argv and argv[0] in _MAIN_OF:  # commands with their own argparse main(), imported when used
        import importlib

        return getattr(importlib.import_module(_MAIN_OF[argv[0]], __package__), "main")(argv[1:])
    p = argparse.ArgumentParser(prog="lit-vce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("predict", help="generate counterfactuals (LightningCLI; see `lit-vce predict --help`)")
    sub.add_parser("fetch", help="load every model a predict config needs (downloads once, before a cluster launch)")
    sub.add_parser("disagree", help="DiG-IN: images on which two classifiers disagree most (LightningCLI)")
    sub.add_parser("neurons", help="DiG-IN: visualise a unit of a classifier (LightningCLI)")
    sub.add_parser("spurious", help="rank a class's penultimate units, correlate them with known factors, ablate them")
    sub.add_parser("evaluate", help="the metric suite over saved images (see `lit-vce evaluate --help`)")
    sub.add_parser("cost", help="expected GPU time and memory of a predict run, from a FLOP count (see `lit-vce cost --help`)")
    sub.add_parser("diversity", help="sigma_L: LPIPS between the counterfactuals of runs with different seeds (DiME, ACE)")
    sub.add_parser("demo", help="the main job on the embedded world (see `lit-vce demo --help`)")
    sub.add_parser("findings", help="the world's shortcut findings with 95 %% intervals (see `lit-vce findings --help`)")
    sub.add_parser("compare", help="do two runs on the same samples differ? paired bootstrap per metric")
    lb = sub.add_parser("leaderboard", help="render leaderboard.{md,html,tex} from the results.json files under a folder")
    lb.add_argument("results_dir")
    lb.add_argument("--sort-by", default="FR", help="a column header, e.g. FR, L2, FID (sorted in its declared direction)")
    lb.add_argument("--formats", default="md,html,tex", help="comma-separated subset of md,html,tex")
    lb.add_argument("--published", metavar="PRESET", default=None,
                    help="also set the runs of a protocol preset beside the papers' figures for it, in their metric "
                         "conventions (published-PRESET.md; e.g. ace-imagenet, celebahq-smile)")
    rp = sub.add_parser("report", help="an HTML report (image grids, best/median/worst, plots) of one or more runs")
    rp.add_argument("runs", nargs="+", help="run folders (or folders holding run folders)")
    rp.add_argument("--out", default=None, help="the report file (default: <first folder>/report.html)")
    rp.add_argument("--rank-by", default="l2", help="per-sample metric for best/median/worst (l1, l2, lpips, cout, ...)")
    rp.add_argument("--examples", type=int, default=4, help="samples shown per best/median/worst group")
    sub.add_parser("methods", help="list registered methods")
    sub.add_parser("configs", help="list the shipped configs (give one to --config by name, e.g. world/dvce)")
    args = p.parse_args(argv)
    if args.command == "leaderboard":
        from .report.leaderboard import write_leaderboard

        try:
            outs = write_leaderboard(args.results_dir, args.sort_by, tuple(f.strip() for f in args.formats.split(",") if f.strip()))
        except (FileNotFoundError, ValueError) as e:
            p.exit(2, f"lit-vce leaderboard: {e}\n")
        if args.published:
            from .report.published import write_published

            try:
                outs["published"] = write_published(args.results_dir, args.published)
            except ValueError as e:
                p.exit(2, f"lit-vce leaderboard: {e}\n")
        if "md" in outs:
            print(outs["md"].read_text())
        if "published" in outs:
            print(outs["published"].read_text())
        print("written: " + ", ".join(str(v) for v in outs.values()))
    elif args.command == "report":
        from .report.html import write_report

        try:
            out = write_report(args.runs, args.out, rank_by=args.rank_by, examples=args.examples)
        except (FileNotFoundError, ValueError) as e:
            p.exit(2, f"lit-vce report: {e}\n")
        print(f"report written to {out}")
    elif args.command == "methods":
        from .registry import METHODS, describe_method

        for name in METHODS.names():
            print(describe_method(name, METHODS.get(name)) + "\n")
    elif args.command == "configs":
        from .config_files import config_root, shipped_configs

        print(f"shipped configs (in {config_root()}); give one as --config NAME:")
        for name in shipped_configs():
            print(f"  {name}")


if __name__ == "__main__":
    main()
