#!/usr/bin/env python
"""Deterministic mode of the per-step methods: one sample after another (the code
before issue 13) against samples on concurrent worker threads (the new default),
at the world configs of classifier guidance and DVCE.

    python benchmarks/deterministic_speed.py [--n 8] [--rounds 2] [--workers 2]

Deterministic mode generates each sample on its own with one intra-op CPU thread,
so its bytes do not depend on the batch. Before, that left every core but one
idle; now samples run on ``--workers`` threads at once (the process's thread
count in ``lit-vce predict --model.deterministic true``), each still on one
thread, so the bytes are the same. The contenders alternate in one process
(``--rounds`` times, medians); the benchmark checks that the counterfactuals and
every diagnostic are bit-identical and prints seconds per image and the ratio,
and, for reference, the batched (not deterministic) time on every thread.

Why not fewer FLOPs: both methods already do one denoiser forward and two
vector-Jacobian products per step (classifier guidance: one per rescaled term;
DVCE: the explained and the robust classifier's gradients, which the cone
projection needs separately), with the sampler reusing the forward's output;
the profile has no repeated computation to remove. Kernel changes (channels-last,
batched VJPs) change the bytes; docs/parity.md has the measurements.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lit_vce import load_method
from lit_vce.classifiers import load_classifier
from lit_vce.methods.base import generate_one_by_one
from lit_vce.testing import world_batch

CONFIGS = {"classifier_guidance": "world/classifier_guidance", "dvce": "world/dvce"}


def run(method, clf, n: int, workers: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what deterministic mode pins
    try:
        batch = world_batch(n)
        t0 = time.perf_counter()
        with torch.enable_grad():
            out = generate_one_by_one(method, batch, clf, workers)
        return (time.perf_counter() - t0) / n, out
    finally:
        torch.set_num_threads(threads)


def run_batched(method, clf, n: int):
    """Not deterministic: the whole batch in one call on every thread (for reference)."""
    batch = world_batch(n)
    t0 = time.perf_counter()
    with torch.enable_grad():
        method.generate(batch, clf)
    return (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="images per run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=torch.get_num_threads(), help="threads of the new default")
    p.add_argument("--methods", nargs="*", default=list(CONFIGS))
    a = p.parse_args()
    clf = load_classifier("biased")
    print(f"deterministic mode, {a.n} world images, {a.rounds} alternated rounds, {a.workers} workers vs 1")
    print(
        f"{'method':20s} {'sequential s/img':>17s} {'concurrent s/img':>17s} {'ratio':>6s} {'speed-up':>9s} "
        f"{'same bytes':>10s} {'batched s/img':>14s}"
    )
    for name in a.methods:
        method = load_method(CONFIGS[name])
        method.setup(torch.device("cpu"))
        seq, con, bat, same = [], [], [], True
        for _ in range(a.rounds):
            s1, ref = run(method, clf, a.n, 1)
            s2, out = run(method, clf, a.n, a.workers)
            bat.append(run_batched(method, clf, a.n))
            seq.append(s1)
            con.append(s2)
            same &= (
                torch.equal(ref.images, out.images)
                and ref.failure == out.failure
                and all(torch.equal(v, out.diagnostics[k]) for k, v in ref.diagnostics.items())
            )
        t1, t2 = statistics.median(seq), statistics.median(con)
        print(
            f"{name:20s} {t1:17.3f} {t2:17.3f} {t2 / t1:6.3f} {t1 / t2:8.2f}x {str(same):>10s} "
            f"{statistics.median(bat):14.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
