"""Start-up of the commands that do not run a model: ``lit-vce --help``, ``methods``,
``configs`` and ``leaderboard`` (target: <= 2 s each; Lightning's CLI is imported only by
``predict``, ``fetch``, ``disagree`` and ``neurons``).

    python benchmarks/startup.py [--repeats 3]

Prints, per command, the median wall time over the repeats of a fresh process, its peak
resident memory (VmHWM: the process's own, reset by exec, unlike ru_maxrss), and whether torch / Lightning's CLI were
imported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = (
    "import sys; sys.argv = ['lit-vce'] + sys.argv[1:]\n"
    "try:\n    from lit_vce.cli import main; main()\nexcept SystemExit:\n    pass\n"
    "sys.stderr.write('\\nMODULES ' + str(int('torch' in sys.modules)) + str(int('lightning.pytorch.cli' in "
    "sys.modules))"
    " + ' ' + [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
)


def _results_folder(root: Path) -> Path:
    from lit_vce.report.results import build_results

    for name, fr in (("a", 0.5), ("b", 0.9)):
        res = build_results(
            run_name=name,
            method=name,
            classifier="c",
            n=10,
            n_success=int(fr * 10),
            n_failed=0,
            metrics={"flip_rate": fr, "target_confidence": fr, "l1": 1.0, "l2": 1.0},
            seed=0,
            wall_time_s=1.0,
            sample_ids_hash="h",
            config={},
        )
        (root / name).mkdir(parents=True)
        (root / name / "results.json").write_text(json.dumps(res))
    return root


def _run(args: list[str]) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    flags, _, rss_kib = out.stderr.rsplit("MODULES ", 1)[-1].strip().partition(" ")
    return wall, float(rss_kib) / 1024, flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = _results_folder(Path(tmp) / "runs")
        commands = {
            "--help": ["--help"],
            "methods": ["methods"],
            "configs": ["configs"],
            "leaderboard": ["leaderboard", str(runs)],
        }
        print(f"{'command':<12} {'median s':>9} {'max RSS MiB':>12}  torch  lightning.pytorch.cli")
        for name, args in commands.items():
            walls, peak, flags = [], 0.0, "??"
            for _ in range(a.repeats):
                wall, peak, flags = _run(args)
                walls.append(wall)
            print(
                f"{name:<12} {statistics.median(walls):>9.2f} {peak:>12.0f}  {'yes' if flags[:1] == '1' else 'no':>5}"
                f"  {'yes' if flags[1:2] == '1' else 'no'}"
            )


if __name__ == "__main__":
    main()
