#!/usr/bin/env python
"""Seconds and peak memory per DiG-IN VCE on the embedded world, against the number
of sampling steps and outer iterations, with and without gradient checkpointing.

    python benchmarks/digin_cost.py [--n 8]

Each configuration runs in a fresh process (so the peak resident memory is its
own): null-text inversion, the settings search and the optimisation of ``n``
world images explained by ``robust``. Compare ratios within one run; these
machines are noisy. The GPU counterpart on a Stable Diffusion 1.5-sized model is
``scripts/gpu_digin_sd15.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = [(10, 5, False), (20, 5, False), (20, 10, False), (20, 5, True), (20, 10, True)]


def one(steps: int, outer: int, checkpointing: bool, n: int) -> dict:
    from lit_vce.classifiers import load_classifier
    from lit_vce.methods import DiGIN
    from lit_vce.testing import world_batch

    batch = world_batch(n, masks=True)
    clf = load_classifier("robust")
    m = DiGIN(
        "world",
        num_steps=steps,
        outer_steps=outer,
        num_cutouts=8,
        null_text_steps=5,
        gradient_checkpointing=checkpointing,
    )
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    r = m.generate(batch, clf)
    sec = time.perf_counter() - t0
    flip = float((clf(r.images).argmax(1) == batch.target).float().mean())
    return {
        "s_per_vce": sec / n,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
        "flip_rate": flip,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="images per configuration (one batch)")
    p.add_argument("--one", nargs=3, metavar=("STEPS", "OUTER", "CKPT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(int(a.one[0]), int(a.one[1]), a.one[2] == "1", a.n)))
        return
    rows = []
    for steps, outer, ckpt in CONFIGS:
        out = (
            subprocess.run(
                [sys.executable, __file__, "--n", str(a.n), "--one", str(steps), str(outer), "1" if ckpt else "0"],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        rows.append((steps, outer, ckpt, json.loads(out)))
    base = rows[1][3]
    print(f"DiG-IN on the world, {a.n} images per batch, robust classifier, 8 cutouts, null-text 5 inner steps")
    print(
        f"{'steps':>5s} {'outer':>5s} {'ckpt':>5s} {'s/VCE':>8s} {'time ratio':>10s} {'peak MiB':>9s} "
        f"{'growth MiB':>10s} {'FR':>5s}"
    )
    for steps, outer, ckpt, r in rows:
        print(
            f"{steps:5d} {outer:5d} {str(ckpt):>5s} {r['s_per_vce']:8.2f} {r['s_per_vce'] / base['s_per_vce']:10.2f} "
            f"{r['peak_mib']:9.0f} {r['growth_mib']:10.0f} {r['flip_rate']:5.2f}"
        )
    print(
        "time ratio: against 20 steps, 5 outer iterations, no checkpointing; growth: peak RSS increase during generate"
    )


if __name__ == "__main__":
    main()
