#!/usr/bin/env python
"""DiME's cost next to FastDiME's and MaskDiME's on the embedded world: seconds and UNet calls per VCE.

    python benchmarks/dime_cost.py [--n 8] [--steps 100] [--skip 0.7]

One classifier scale each (no retries), the same sampler and images for every row:
FastDiME (one-step x0-prediction, tau UNet calls), MaskDiME (the same, inside its gradient
masks; tau calls; the world config's 3 px blur), DiME as published (a full nested unguided
denoise after every step: tau + tau (tau - 1) / 2 calls) and DiME with the nested denoise
capped at ``max_inner_steps`` DDIM jumps. Prints seconds per VCE, UNet calls per VCE, the
ratio to FastDiME, the ratio of DiME's (published) time to each, flip rate and L1 (these
machines are noisy: compare ratios within one run).
"""

from __future__ import annotations

import argparse
import time

import torch

from lit_vce.classifiers import load_classifier
from lit_vce.methods.dime import DiME
from lit_vce.methods.fastdime import FastDiME
from lit_vce.methods.maskdime import MaskDiME
from lit_vce.testing import world_batch  # the world images guidance_cost.py uses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--skip", type=float, default=0.7)
    p.add_argument("--scale", type=float, default=300.0)
    a = p.parse_args()
    torch.manual_seed(0)
    clf = load_classifier("robust")
    common = dict(scales=(a.scale,), num_steps=a.steps, skip=a.skip)
    tau = a.steps - int(round(a.skip * a.steps))
    rows = [
        ("FastDiME", FastDiME(warmup=tau // 2, **common), tau),
        ("MaskDiME", MaskDiME(blur_kernel=3, blur_sigma=1.0, **common), tau),
        ("DiME (published)", DiME(**common), tau + tau * (tau - 1) // 2),
    ]
    for cap in (5, 10):
        calls = tau + sum(min(k, cap) for k in range(1, tau))
        rows.append((f"DiME, max_inner_steps={cap}", DiME(max_inner_steps=cap, **common), calls))
    base = None
    print(f"{a.n} world images of `robust`, {a.steps} respaced steps, tau={tau}, scale {a.scale:g}")
    print(f"{'method':<28} {'s/VCE':>7} {'UNet calls':>10} {'x FastDiME':>10} {'DiME /':>7} {'FR':>6} {'L1':>7}")
    measured = []
    for name, method, calls in rows:
        batch = world_batch(a.n)
        t0 = time.perf_counter()
        out = method.generate(batch, clf)
        sec = (time.perf_counter() - t0) / a.n
        base = base or sec
        with torch.no_grad():
            fr = float((clf(out.images).argmax(1) == batch.target).float().mean())
        l1 = float((out.images - batch.images).abs().flatten(1).sum(1).mean())
        measured.append((name, sec, calls, fr, l1))
    dime = next(sec for name, sec, *_ in measured if name == "DiME (published)")
    for name, sec, calls, fr, l1 in measured:
        print(f"{name:<28} {sec:7.2f} {calls:10d} {sec / base:10.2f} {dime / sec:7.1f} {fr:6.3f} {l1:7.1f}")


if __name__ == "__main__":
    main()
