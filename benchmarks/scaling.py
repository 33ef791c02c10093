#!/usr/bin/env python
"""How seconds per image and peak memory scale with the batch size and the number of
sampling steps, for every VCE method at its world config (CPU), and ``lit-vce
predict`` on one process against two.

    python benchmarks/scaling.py [--methods dvce svce] [--batch-sizes 1 4 16] [--step-factors 0.5 2]
                                 [--processes] [--json scaling.json]

Each (method, batch size, steps) setting runs one batch in a fresh process (so the
memory figure is its own): s/img is the batch's time over its size, and peak
memory is the largest growth of the process's resident memory over its value
with the models loaded (sampled every 2 ms) during a batch-1 warm-up and the
timed batch: what a run needs beyond its weights. The
step rows scale the config's ``num_steps`` at batch 4 (SVCE has no sampler: its
row is blank). ``--processes`` runs ``lit-vce predict`` on the classifier
guidance world config, deterministic, with 1 and 2 processes (DDP on CPU) and
checks that the counterfactual PNGs are byte-identical. Absolute seconds on these
machines are noisy; compare within a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("classifier_guidance", "dvce", "fastdime", "dime", "svce", "ace", "ldce", "digin")


def one_setting(method_name: str, batch_size: int, step_factor: float) -> dict:
    """Runs in the child process: one batch of ``batch_size`` world images."""
    import torch

    from lit_vce import load_method
    from lit_vce.classifiers import load_classifier
    from lit_vce.methods.base import select_batch

    from lit_vce.testing import sampled_peak_growth, world_batch

    probe = load_method(f"world/{method_name}")
    kwargs = {}
    steps = probe.describe().get("num_steps")  # the constructor's argument (SVCE has none)
    if step_factor != 1.0 and steps is not None:
        kwargs["num_steps"] = max(1, round(steps * step_factor))
    method = load_method(f"world/{method_name}", **kwargs) if kwargs else probe
    method.setup(torch.device("cpu"))
    clf = load_classifier("biased")
    batch = world_batch(batch_size + 1)
    t = [0.0]

    def go():
        with torch.enable_grad():
            method.generate(select_batch(batch, [batch_size]), clf)  # warm-up on an image not timed
            timed = select_batch(batch, list(range(batch_size)))
            t0 = time.perf_counter()
            method.generate(timed, clf)
            t[0] = time.perf_counter() - t0

    peak = sampled_peak_growth(go)  # above the loaded models, over the warm-up and the timed batch
    return {
        "method": method_name,
        "batch_size": batch_size,
        "num_steps": kwargs.get("num_steps", steps),
        "s_per_image": t[0] / batch_size,
        "peak_growth_mib": peak,
    }


def _child(method_name: str, batch_size: int, step_factor: float) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method_name, str(batch_size), str(step_factor)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "LIT_VCE_QUIET": "1"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{method_name} batch {batch_size} x{step_factor} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def processes(n: int = 8) -> list[dict]:
    """``lit-vce predict`` (classifier guidance, world, deterministic) on 1 and 2 processes."""
    rows, pngs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for devices in (1, 2):
            out = Path(tmp) / f"p{devices}"
            cmd = [
                sys.executable,
                "-m",
                "lit_vce.cli",
                "predict",
                "--config",
                "world/classifier_guidance",
                "--data.num_samples",
                str(n),
                "--data.batch_size",
                str(n // 2),
                "--model.deterministic",
                "true",
                "--model.second_classifier",
                "null",
                "--writer.output_dir",
                str(out),
                "--trainer.devices",
                str(devices),
            ]
            if devices > 1:
                cmd += ["--trainer.strategy", "ddp"]
            t0 = time.perf_counter()
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore", "LIT_VCE_QUIET": "1"},
            )
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"predict on {devices} processes failed:\n{proc.stderr[-2000:]}")
            pngs.append({p.name: p.read_bytes() for p in sorted((out / "counterfactuals").glob("*.png"))})
            rows.append({"processes": devices, "wall_s": wall, "s_per_image_wall": wall / n})
    same = pngs[0].keys() == pngs[1].keys() and all(pngs[0][k] == pngs[1][k] for k in pngs[0])
    for r in rows:
        r["same_pngs_as_1_process"] = same
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 4, 16])
    p.add_argument("--step-factors", nargs="*", type=float, default=[0.5, 2.0])
    p.add_argument("--processes", action="store_true", help="also lit-vce predict on 1 vs 2 processes")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(one_setting(a.child[0], int(a.child[1]), float(a.child[2]))))
        return
    import torch

    print(f"world configs, CPU, {torch.get_num_threads()} threads; one batch per row in a fresh process")
    print(f"{'method':20s} {'batch':>5s} {'steps':>5s} {'s/img':>7s} {'peak MiB':>9s}")
    rows = []
    for name in a.methods:
        settings = [(b, 1.0) for b in a.batch_sizes] + [(4, f) for f in a.step_factors if name != "svce"]  # no sampler
        for b, f in settings:
            r = _child(name, b, f)
            rows.append(r)
            print(
                f"{name:20s} {b:5d} {str(r['num_steps'] or '-'):>5s} {r['s_per_image']:7.3f} "
                f"{r['peak_growth_mib']:9.1f}",
                flush=True,
            )
    result = {"settings": rows}
    if a.processes:
        result["processes"] = processes()
        for r in result["processes"]:
            print(
                f"lit-vce predict, {r['processes']} process(es): {r['wall_s']:.1f} s wall for 8 images, "
                f"same PNGs as 1 process: {r['same_pngs_as_1_process']}"
            )
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
