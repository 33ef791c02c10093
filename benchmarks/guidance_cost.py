#!/usr/bin/env python
"""Seconds per counterfactual of the per-step guided methods on the embedded world.

    python benchmarks/guidance_cost.py [--n 16]

Prints one row per (method, setting) and ratios measured in the same run (these
machines are noisy: compare ratios, not absolute seconds across runs). Settings:
the exact VJP through the denoiser vs the x0-gradient shortcut
(``through_unet=False``), and the inner batch size (a memory knob).
"""

from __future__ import annotations

import argparse
import time

from lit_vce.classifiers import load_classifier
from lit_vce.methods import DVCE, ClassifierGuidance
from lit_vce.testing import world_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16)
    a = p.parse_args()
    clf = load_classifier("robust")
    settings = [
        ("classifier_guidance", lambda **k: ClassifierGuidance(num_steps=50, skip=0.5, **k)),
        ("dvce", lambda **k: DVCE(num_steps=100, skip=0.5, num_augmentations=8, **k)),
    ]
    print(f"{'method':20s} {'setting':28s} {'s/image':>8s} {'ratio':>6s}")
    for name, make in settings:
        base = None
        for label, kw in (
            ("exact VJP (default)", {}),
            ("through_unet=False", {"through_unet": False}),
            ("inner_batch_size=4", {"inner_batch_size": 4}),
        ):
            m = make(**kw)
            b = world_batch(a.n)
            t0 = time.perf_counter()
            m.generate(b, clf)
            s = (time.perf_counter() - t0) / a.n
            base = base or s
            print(f"{name:20s} {label:28s} {s:8.3f} {s / base:6.2f}")


if __name__ == "__main__":
    main()
