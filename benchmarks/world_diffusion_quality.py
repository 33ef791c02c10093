#!/usr/bin/env python
"""How faithfully the world's diffusion model draws the world, per sampler setting.

    python benchmarks/world_diffusion_quality.py [--n 1024] [--settings ddpm-100 ddim-50 ddpm-100-cfg2]

Class-conditional samples (classes cycled, so shapes are balanced) are read by
the oracle: the fraction whose shape is the class asked for, and the background
histogram. The balanced training data draws backgrounds uniformly and
independently of the class, so a faithful model's histogram is uniform: the
chi-square test of the counts against uniform should not reject at 1 %. A
setting is ``<sampler>-<steps>[-cfg<scale>]``; the first is the default the
world's metadata reports (``ddpm-100``, classifier-free scale 1).
"""

from __future__ import annotations

import argparse
import time

from lit_vce.data.world import BACKGROUNDS
from lit_vce.diffusion.world_quality import ddpm_sample_accuracy


def parse(setting: str) -> tuple[str, int, float]:
    parts = setting.split("-")
    if len(parts) not in (2, 3) or (len(parts) == 3 and not parts[2].startswith("cfg")):
        raise ValueError(f"a setting is <sampler>-<steps>[-cfg<scale>], got {setting!r}")
    return parts[0], int(parts[1]), float(parts[2][3:]) if len(parts) == 3 else 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--settings", nargs="*", default=["ddpm-100", "ddpm-250", "ddim-50", "ddpm-100-cfg2"])
    a = p.parse_args()
    print(f"{a.n} class-conditional samples per setting, read by the oracle")
    print(
        f"{'setting':16s} {'shape acc.':>10s} "
        + " ".join(f"{b:>8s}" for b in BACKGROUNDS)
        + f" {'chi2 p':>10s} {'s':>6s}"
    )
    for setting in a.settings:
        sampler, steps, cfg = parse(setting)
        t0 = time.perf_counter()
        r = ddpm_sample_accuracy(n=a.n, steps=steps, cfg_scale=cfg, sampler=sampler)
        hist = r["ddpm_background_histogram"]
        pval = r["ddpm_background_chi2_p"]
        print(
            f"{setting:16s} {r['ddpm_sample_shape_accuracy']:10.3f} "
            + " ".join(f"{h:8.3f}" for h in hist)
            + f" {pval:10.2e} {time.perf_counter() - t0:6.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
