#!/usr/bin/env python
"""The effect of the start noise level of DiME, FastDiME and LDCE on the embedded world.

    python benchmarks/noise_offset.py [--n 8] [--methods fastdime dime ldce]

The authors' code noises the image to ``start_step`` (LDCE: DDIM index ``t_enc``)
and guides from one step below (``noise_offset=1``, our default since issue 25);
before, we noised to the first guided step (``noise_offset=0``). For each method's world
config, classifier and offset: flip rate and mean L1 on the same balanced test
images (each into the next class), every sample's randomness from its id.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--methods", nargs="+", default=["fastdime", "dime"])
    p.add_argument("--classifiers", nargs="+", default=["biased", "robust"])
    a = p.parse_args()
    from lit_vce import explain
    from lit_vce.testing import world_batch

    b = world_batch(a.n)
    print(f"{'method':10s} {'classifier':10s} {'offset':>6s} {'flip rate':>9s} {'L1':>8s} {'s/img':>7s}")
    for method in a.methods:
        for clf in a.classifiers:
            for offset in (0, 1):
                t0 = time.perf_counter()
                out = explain(
                    b.images,
                    b.target,
                    classifier=clf,
                    method=f"world/{method}",
                    sources=b.source,
                    sample_ids=b.sample_ids,
                    noise_offset=offset,
                    fid_features="none",
                )
                s = (time.perf_counter() - t0) / a.n
                print(
                    f"{method:10s} {clf:10s} {offset:6d} {out.metrics['flip_rate']:9.3f} {out.metrics['l1']:8.1f} "
                    f"{s:7.2f}"
                )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
