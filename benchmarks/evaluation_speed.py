#!/usr/bin/env python
"""Images per second and peak memory of ``lit-vce evaluate`` against torch-fidelity's
own FID on the same image files, for 1 and 2 processes.

    python benchmarks/evaluation_speed.py [--n 128] [--inception-weights FILE]

Writes N world test images and perturbed copies as PNG folders with a targets
CSV, then times, each as a fresh command (start-up included on both sides):

- ``lit-vce evaluate --metrics fid`` (Inception FID in both conventions, flip rates,
  L1/L2), and the full suite (also sFID and COUT; LPIPS off), on 1 and 2 CPU processes;
- ``torch_fidelity.calculate_metrics(fid=True)`` on the same two folders.

Without real Inception weights, random weights stand in (speed does not depend
on the values; the two FIDs must still agree). Ratios are measured in one run:
compare them, not absolute seconds across machines.
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


# a fresh wrapper per command, so the peak is this command's (its largest process, DDP workers included)
WRAPPER = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(f'PEAK_KB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); "
    "sys.exit(r.returncode)"
)


def _run(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) of the command's largest process, stdout."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(proc.stderr.rsplit("PEAK_KB=", 1)[1].split()[0])
    return wall, peak_kb / 1024, proc.stdout


def _prepare(root: Path, n: int) -> tuple[Path, Path, Path]:
    import torch

    from lit_vce.data.world import ShapesWorld
    from lit_vce.io import save_png, to_uint8

    data = ShapesWorld("balanced", "test", n)
    orig, cf = root / "orig", root / "cf"
    orig.mkdir(), cf.mkdir()
    g = torch.Generator().manual_seed(0)
    lines = ["file,source,target"]
    for i in range(n):
        item = data[i]
        x = item["image"]
        y = (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        save_png(orig / f"{i:05d}.png", to_uint8(x[None])[0])
        save_png(cf / f"{i:05d}.png", to_uint8(y[None])[0])
        lines.append(f"{i:05d}.png,{item['label']},{(item['label'] + 1) % 4}")
    (root / "targets.csv").write_text("\n".join(lines) + "\n")
    return orig, cf, root / "targets.csv"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128, help="image pairs")
    p.add_argument("--inception-weights", default=None, help="real weights (default: random stand-ins)")
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    from lit_vce.testing import save_random_inception_weights

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        orig, cf, targets = _prepare(root, a.n)
        weights = a.inception_weights or str(save_random_inception_weights(root / "inception.pth"))
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "LIT_VCE_OFFLINE": "1"}
        rows = []
        runs = [
            ("evaluate --metrics fid: FID + flip rate + L1/L2", 1, ["--metrics", "fid"]),
            ("evaluate: full suite (FID, sFID, flip rate, L1/L2, COUT)", 1, []),
            ("evaluate: full suite (FID, sFID, flip rate, L1/L2, COUT)", 2, []),
        ]
        for label, devices, extra in runs:
            out = root / f"ev{len(rows)}"
            cmd = [
                sys.executable,
                "-m",
                "lit_vce.cli",
                "evaluate",
                "--originals",
                str(orig),
                "--counterfactuals",
                str(cf),
                "--targets",
                str(targets),
                "--classifier",
                "robust",
                "--fid-features",
                "inception",
                "--inception-weights",
                weights,
                "--lpips",
                "off",
                "--out",
                str(out),
                "--accelerator",
                "cpu",
                "--devices",
                str(devices),
                "--batch-size",
                str(a.batch_size),
                *extra,
            ]
            wall, mem, _ = _run(cmd, env)
            fid = json.loads((out / "results.json").read_text())["metrics"]["fid"]
            rows.append((f"{label} ({devices} proc)", wall, mem, fid))
        code = (
            "import json, torch_fidelity; r = torch_fidelity.calculate_metrics(input1=%r, input2=%r, fid=True, "
            "cuda=False, "
            "verbose=False, batch_size=%d, feature_extractor_weights_path=%r); print(json.dumps(r))"
            % (str(orig), str(cf), a.batch_size, weights)
        )
        wall, mem, out = _run([sys.executable, "-c", code], env)
        rows.append(
            (
                "torch-fidelity: FID only (1 proc)",
                wall,
                mem,
                json.loads(out.strip().splitlines()[-1])["frechet_inception_distance"],
            )
        )
    ref = rows[-1][1]
    print(f"{a.n} image pairs, Inception-v3 at 299 px on CPU ({os.cpu_count()} cores); wall time includes start-up")
    print(f"{'command':62s} {'s':>7s} {'img/s':>7s} {'peak MiB':>9s} {'time / tfid':>11s} {'FID':>12s}")
    for label, wall, mem, fid in rows:
        print(f"{label:62s} {wall:7.1f} {2 * a.n / wall:7.1f} {mem:9.0f} {wall / ref:11.2f} {fid:12.6f}")
    print(
        "FID agreement (evaluate 1 proc vs torch-fidelity): relative difference "
        f"{abs(rows[0][3] - rows[-1][3]) / abs(rows[-1][3]):.2e}"
    )
    print(f"FID agreement (2 proc vs 1 proc): relative difference {abs(rows[2][3] - rows[1][3]) / abs(rows[1][3]):.2e}")
    print("img/s counts both sides (originals + counterfactuals) through the feature extractor.")


if __name__ == "__main__":
    main()
