"""The main job on the embedded world (``./scripts/demo.sh`` = ``lit-vce demo``).

Runs every (method, classifier) pair of the demo (all ten methods on ``biased``
and ``robust``) through ``lit-vce predict`` on balanced test images (each to a
random other shape; by default on fewer images, the slow methods on the fewest,
see :data:`QUICK_SAMPLES`, so the demo finishes in about 10 minutes on 2 cores;
``--full`` runs every method on all of them) with the full metric suite
(FID/sFID on the world's oracle features, LPIPS when its weights are present),
then one DiG-IN disagreement run (``biased`` vs ``robust``) and one neuron run,
writes one folder per run under ``runs/demo/`` and renders
``runs/demo/leaderboard.{md,html,tex}`` and the HTML report
``runs/demo/report.html``. The finding to
see: VCEs of ``biased`` change the background (its shortcut), VCEs of ``robust``
change the shape.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEMO_METHODS = ("classifier_guidance", "dvce", "fastdime", "digin", "svce", "dime", "ace", "ldce", "maskdime", "rcsb")
DEMO_CLASSIFIERS = ("biased", "robust")
#: images per run of the slow methods in the default (quick) demo; ``--full`` gives every run ``num_samples``
QUICK_SAMPLES = {
    "classifier_guidance": 32,
    "dvce": 16,
    "fastdime": 24,
    "svce": 32,
    "digin": 8,
    "ldce": 8,
    "dime": 4,
    "ace": 4,
    "maskdime": 8,
    "rcsb": 4,
}
#: analysis overrides of the quick demo (``--full``: the configs as they are)
QUICK_ANALYSES = {"disagree": ["--data.per_class", "2"], "neurons": ["--data.num_samples", "4"]}


def default_config_dir() -> Path:
    """The shipped world configs (inside the package, so an installed wheel runs the demo)."""
    from .config_files import config_root

    return config_root() / "world"


def run_demo(
    out: str | Path = "runs/demo",
    num_samples: int = 64,
    batch_size: int = 32,
    methods=DEMO_METHODS,
    classifiers=DEMO_CLASSIFIERS,
    config_dir: str | Path | None = None,
    extra: list[str] | None = None,
    analyses: bool = True,
    full: bool = False,
) -> str:
    """Run the demo grid (and, with ``analyses``, one disagreement and one neuron run)
    and return the leaderboard (Markdown). Without ``full`` the slow methods run on
    :data:`QUICK_SAMPLES` images (the leaderboard's N column says how many)."""
    from .lightning.cli import run_predict
    from .logs import hide_banners, tame_library_logs
    from .report.html import write_report
    from .report.leaderboard import write_leaderboard

    config_dir = Path(config_dir) if config_dir else default_config_dir()
    out = Path(out)
    t0 = time.perf_counter()
    tame_library_logs()
    hide_banners()  # twenty runs: each has its own header line instead of Lightning's banner
    for method in methods:
        cfg = config_dir / f"{method}.yaml"
        if not cfg.is_file():
            raise FileNotFoundError(f"demo config {cfg} is missing (pass --configs DIR)")
        n = num_samples if full else min(num_samples, QUICK_SAMPLES.get(method, num_samples))
        for clf in classifiers:
            print(f"\n=== {method} on {clf} ({n} balanced test images) ===", flush=True)
            run_predict(
                [
                    "--config",
                    str(cfg),
                    "--model.classifier",
                    clf,
                    "--data.num_samples",
                    str(n),
                    "--data.batch_size",
                    str(batch_size),
                    "--writer.output_dir",
                    str(out / f"{method}-{clf}"),
                    *(extra or []),
                ]
            )
    if analyses:
        from .lightning.cli import run_analysis

        for name in ("disagree", "neurons"):
            print(f"\n=== DiG-IN analysis: {name} ===", flush=True)
            quick = [] if full else QUICK_ANALYSES.get(name, [])
            run_analysis(
                name,
                [
                    "--config",
                    str(config_dir / f"{name}.yaml"),
                    "--writer.output_dir",
                    str(out / "analyses" / name),
                    *quick,
                ],
            )
    boards = write_leaderboard(out)
    table = boards["md"].read_text()
    report = write_report([out], out / "report.html", rank_by="l2")
    wall = time.perf_counter() - t0
    print("\n" + table)
    print(_finding(out))
    print(f"demo wall time: {wall:.0f} s; results, grids and samples under {out}/")
    print(
        f"open {report} in a browser for the visual report; leaderboards: {', '.join(str(p) for p in boards.values())}"
    )
    (out / "demo_wall_time_s.json").write_text(json.dumps({"wall_time_s": round(wall, 1), "full": bool(full)}) + "\n")
    return table


def _finding(out: Path) -> str:
    lines = ["What the counterfactuals changed (oracle audit of successful VCEs):"]
    for p in sorted(out.glob("*/results.json")):
        r = json.loads(p.read_text())
        a = r.get("audit") or {}
        lines.append(
            f"  {r['method']:>20s} on {r['classifier']:<7s} flip rate {r['metrics']['flip_rate']:.2f}: "
            f"shape changed {a.get('shape_changed', float('nan')):.2f}, "
            f"background only {a.get('background_only', float('nan')):.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="lit-vce demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--methods", nargs="+", default=list(DEMO_METHODS))
    p.add_argument("--classifiers", nargs="+", default=list(DEMO_CLASSIFIERS))
    p.add_argument(
        "--configs",
        default=None,
        help="folder of <method>.yaml (default: the shipped world configs, `lit-vce configs`)",
    )
    p.add_argument("--no-analyses", action="store_true", help="skip the DiG-IN disagreement and neuron runs")
    p.add_argument(
        "--full",
        action="store_true",
        help="the complete benchmark: every method and analysis on all --num-samples images (about an hour "
        "on 2 cores; the default runs the slow methods on fewer images)",
    )
    a = p.parse_args(argv)
    run_demo(
        a.out, a.num_samples, a.batch_size, a.methods, a.classifiers, a.configs, analyses=not a.no_analyses, full=a.full
    )
