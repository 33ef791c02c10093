#!/usr/bin/env python
"""DVCE on the embedded world under the published sampler and its alternatives.

    python benchmarks/dvce_world.py [--n 32] [--only adm]

Explains `biased` (robust partner `robust`) on n balanced test images, each to a
seeded random other class, and prints per setting: flip rate, the oracle's
reading of the target shape, the fraction whose background alone moved to the
target's (shape kept), mean L1 and seconds per image. The settings are the
published sampler (guided-diffusion's respaced ancestral, no clipping, one
clean view) with the world config's weight 1.0 and the published 0.1, with x0
clipping, with 8 augmented views, and the earlier diffusers DDPM eps-shift
sampler (the figures in docs/parity.md).
"""

from __future__ import annotations

import argparse
import time

import torch

from lit_vce.classifiers import load_classifier
from lit_vce.data.world import ShapesWorld
from lit_vce.rngs import sample_rngs
from lit_vce.methods import DVCE, VCEBatch
from lit_vce.world.models import load_world_network

SETTINGS = {
    "published (adm, no clip, 1 view), weight 1.0": dict(
        sampler="adm", clip_sample=False, num_augmentations=1, classifier_weight=1.0
    ),
    "published, weight 0.1 (ImageNet value)": dict(
        sampler="adm", clip_sample=False, num_augmentations=1, classifier_weight=0.1
    ),
    "adm, clip, 1 view, weight 1.0": dict(sampler="adm", clip_sample=True, num_augmentations=1, classifier_weight=1.0),
    "adm, no clip, 8 views, weight 1.0": dict(
        sampler="adm", clip_sample=False, num_augmentations=8, classifier_weight=1.0
    ),
    "diffusers ddpm eps-shift, clip, 8 views, weight 1.0": dict(
        sampler="ddpm", clip_sample=True, num_augmentations=8, classifier_weight=1.0
    ),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--only", nargs="*", default=[], help="run the settings whose name contains one of these")
    a = p.parse_args()
    d = ShapesWorld("balanced", "test", a.n)
    items = [d[i] for i in range(a.n)]
    ids = [it["sample_id"] for it in items]
    src = torch.tensor([it["label"] for it in items])
    tgt = (src + torch.randint(1, 4, (a.n,), generator=torch.Generator().manual_seed(0))) % 4
    x = torch.stack([it["image"] for it in items])
    biased, oracle = load_classifier("biased"), load_world_network("oracle")
    print(f"{'setting':52s} {'FR':>6s} {'shape':>6s} {'bg-only':>7s} {'L1':>7s} {'s/img':>6s}")
    for name, kw in SETTINGS.items():
        if a.only and not any(o in name for o in a.only):
            continue
        m = DVCE(robust_classifier="robust", num_steps=100, skip=0.5, **kw)
        t0 = time.perf_counter()
        r = m.generate(VCEBatch(x.clone(), src, tgt, ids, sample_rngs(0, ids)), biased)
        sec = (time.perf_counter() - t0) / a.n
        with torch.no_grad():
            fr = (biased(r.images).argmax(1) == tgt).float().mean().item()
            shape, back = (t.argmax(1) for t in oracle.both(r.images))
        l1 = (r.images - x).abs().flatten(1).sum(1).mean().item()
        bg_only = ((shape == src) & (back == tgt)).float().mean().item()
        print(f"{name:52s} {fr:6.3f} {(shape == tgt).float().mean().item():6.3f} {bg_only:7.3f} {l1:7.1f} {sec:6.2f}")


if __name__ == "__main__":
    main()
