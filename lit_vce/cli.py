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
import sys

#: names that moved to :mod:`lit_vce.lightning.cli` (loaded on first use, so that the
#: commands that do not run Lightning's CLI start without importing it)
_LIGHTNING_CLI = (
    "TRAINER_DEFAULTS",
    "RunConfig",
    "run_logger",
    "VCECLI",
    "AnalysisCLI",
    "resolve_method_names",
    "run_analysis",
    "run_predict",
)


def __getattr__(name):
    if name in _LIGHTNING_CLI:
        from .lightning import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'lit_vce.cli' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    """The ``lit-vce`` console script: errors of the user's input (:class:`LitVCEError`)
    end in one line (exit status 2) instead of a traceback."""
    import os

    from .errors import LitVCEError

    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    from .logs import one_line_warnings, tame_library_logs

    tame_library_logs()
    if from_console:
        one_line_warnings()
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
_MAIN_OF = {
    "spurious": ".analyses.spurious",
    "evaluate": ".lightning.evaluate_run",
    "compare": ".report.compare",
    "diversity": ".report.diversity",
    "demo": ".demo",
    "findings": ".findings",
    "cost": ".cost",
}


def _parser() -> argparse.ArgumentParser:
    """The top-level parser: every subcommand with its one-line help; the commands with
    their own parsers are listed here and parse their own arguments."""
    p = argparse.ArgumentParser(
        prog="lit-vce", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("predict", help="generate counterfactuals (LightningCLI; see `lit-vce predict --help`)")
    sub.add_parser("fetch", help="load every model a predict config needs (downloads once, before a cluster launch)")
    sub.add_parser("disagree", help="DiG-IN: images on which two classifiers disagree most (LightningCLI)")
    sub.add_parser("neurons", help="DiG-IN: visualise a unit of a classifier (LightningCLI)")
    sub.add_parser("spurious", help="rank a class's penultimate units, correlate them with known factors, ablate them")
    sub.add_parser("evaluate", help="the metric suite over saved images (see `lit-vce evaluate --help`)")
    sub.add_parser(
        "cost", help="expected GPU time and memory of a predict run, from a FLOP count (see `lit-vce cost --help`)"
    )
    sub.add_parser(
        "diversity", help="sigma_L: LPIPS between the counterfactuals of runs with different seeds (DiME, ACE)"
    )
    sub.add_parser("demo", help="the main job on the embedded world (see `lit-vce demo --help`)")
    sub.add_parser(
        "findings", help="the world's shortcut findings with 95 %% intervals (see `lit-vce findings --help`)"
    )
    sub.add_parser("compare", help="do two runs on the same samples differ? paired bootstrap per metric")
    lb = sub.add_parser(
        "leaderboard", help="render leaderboard.{md,html,tex} from the results.json files under a folder"
    )
    lb.add_argument("results_dir")
    lb.add_argument(
        "--sort-by", default="FR", help="a column header, e.g. FR, L2, FID (sorted in its declared direction)"
    )
    lb.add_argument("--formats", default="md,html,tex", help="comma-separated subset of md,html,tex")
    lb.add_argument(
        "--published",
        metavar="PRESET",
        default=None,
        help="also set the runs of a protocol preset beside the papers' figures for it, in their metric "
        "conventions (published-PRESET.md; e.g. ace-imagenet, celebahq-smile)",
    )
    rp = sub.add_parser("report", help="an HTML report (image grids, best/median/worst, plots) of one or more runs")
    rp.add_argument("runs", nargs="+", help="run folders (or folders holding run folders)")
    rp.add_argument("--out", default=None, help="the report file (default: <first folder>/report.html)")
    rp.add_argument(
        "--rank-by", default="l2", help="per-sample metric for best/median/worst (l1, l2, lpips, cout, ...)"
    )
    rp.add_argument("--examples", type=int, default=4, help="samples shown per best/median/worst group")
    sub.add_parser("methods", help="list registered methods")
    sub.add_parser("configs", help="list the shipped configs (give one to --config by name, e.g. world/dvce)")
    return p


def _dispatch(argv: list[str], from_console: bool) -> None:
    if argv and argv[0] in ("predict", "fetch", "disagree", "neurons"):
        from .lightning.cli import run_analysis, run_predict
    if argv and argv[0] == "predict":
        return run_predict(None if from_console else argv[1:])
    if argv and argv[0] == "fetch":
        return run_predict(argv[1:], run=False)
    if argv and argv[0] in ("disagree", "neurons"):
        return run_analysis(argv[0], argv[1:])
    if argv and argv[0] in _MAIN_OF:  # commands with their own argparse main(), imported when used
        import importlib

        return getattr(importlib.import_module(_MAIN_OF[argv[0]], __package__), "main")(argv[1:])
    p = _parser()
    args = p.parse_args(argv)
    if args.command == "leaderboard":
        from .report.leaderboard import write_leaderboard

        try:
            outs = write_leaderboard(
                args.results_dir, args.sort_by, tuple(f.strip() for f in args.formats.split(",") if f.strip())
            )
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
