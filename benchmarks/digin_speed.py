#!/usr/bin/env python
"""DiG-IN's cost per VCE at equal settings under each checkpointing mode, alternated in one
process, on a tiny random Stable Diffusion. (The code path before the speed-ups, which
the README's Performance figures were measured against, was retired once the tests held
the default path to that path's outputs: ``tests/test_digin.py``.)

    python benchmarks/digin_speed.py [--rounds 3] [--size 64] [--threads 1]

Settings (the issue's): fp32, one CPU thread, a 64 px tiny random Stable Diffusion
(:func:`lit_vce.testing.stable_diffusion_components`), 20 DDIM steps, guidance 3,
10 null-text inner steps, 5 outer Adam steps, 8 cutouts, one searched setting
(injection 0.3, no blend), a random-init ResNet-18 at 64 px; one image per VCE,
inversion included. Contenders:

- ``checkpoint_all``: every UNet, decoder and classifier call checkpointed (as the
  official code runs);
- ``no_checkpoint``: none;
- ``auto``: the default, only what the memory budget needs.

Prints each contender's median seconds over the rounds (the contenders alternate
within every round, so drift hits them alike), the ratio to ``checkpoint_all``, FLOPs per
VCE (``FlopCounterMode``, one extra run each), peak memory (a fresh process per
contender: how far the resident memory rises during a VCE, sampled every 2 ms), the null-text
reconstruction error and the final loss (must be no worse).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONTENDERS = {
    "checkpoint_all": {"gradient_checkpointing": True},
    "no_checkpoint": {"gradient_checkpointing": False},
    "auto": {},
}


def build(size: int):
    import timm
    import torch

    from lit_vce.classifiers import ImageClassifier
    from lit_vce.testing import stable_diffusion_components

    parts = stable_diffusion_components("tiny", size)
    torch.manual_seed(0)
    clf = ImageClassifier(
        timm.create_model("resnet18", pretrained=False, num_classes=4),
        size,
        ["circle", "square", "triangle", "star"],
        name="resnet18",
    )
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return parts, clf, image


def one_vce(parts, clf, image, settings: dict):
    """(seconds, result) of one VCE: a fresh diffusion wrapper and method on the shared weights."""
    import torch

    from lit_vce.diffusion import LatentDiffusion
    from lit_vce.methods import VCEBatch
    from lit_vce.methods.digin import DiGIN, InversionSettings, MemorySettings, OptimisationSettings, SearchSettings
    from lit_vce.rngs import sample_rngs

    bb = LatentDiffusion(num_steps=20, guidance_scale=3.0, **parts)
    method = DiGIN(
        bb,
        num_steps=20,
        guidance_scale=3.0,
        optimisation=OptimisationSettings(outer_steps=5, num_cutouts=8),
        inversion=InversionSettings(null_text_steps=10),
        search=SearchSettings(injection_fractions=(0.3,), blend_fractions=(0.0,)),
        memory=MemorySettings(**settings),
        class_names=list(clf.class_names),
    )
    ids = ["img0"]
    batch = VCEBatch(image, torch.tensor([0]), torch.tensor([1]), ids, sample_rngs(0, ids))
    t0 = time.perf_counter()
    result = method.generate(batch, clf)
    return time.perf_counter() - t0, result


def peak_growth(name: str, size: int, threads: int) -> float:
    """Peak RSS growth (MiB) of one VCE of ``name`` in a fresh process (after one warm-up VCE)."""
    out = subprocess.run(
        [sys.executable, __file__, "--peak", name, "--size", str(size), "--threads", str(threads)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peak", help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch

    from lit_vce.testing import count_flops, sampled_peak_growth

    torch.set_num_threads(a.threads)
    parts, clf, image = build(a.size)
    if a.peak:
        one_vce(parts, clf, image, CONTENDERS[a.peak])  # first-call allocations (allocator pools, caches)
        print(sampled_peak_growth(lambda: one_vce(parts, clf, image, CONTENDERS[a.peak])))
        return
    one_vce(parts, clf, image, CONTENDERS["new"])  # warm-up (first-call allocations)
    times: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    results = {}
    for r in range(a.rounds):
        order = list(CONTENDERS) if r % 2 == 0 else list(CONTENDERS)[::-1]
        for name in order:
            sec, results[name] = one_vce(parts, clf, image, CONTENDERS[name])
            times[name].append(sec)
        print(f"round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in CONTENDERS), flush=True)
    base = statistics.median(times["checkpoint_all"])
    rows = []
    for name, settings in CONTENDERS.items():
        _, flops = count_flops(lambda s=settings: one_vce(parts, clf, image, s))
        res = results[name]
        med = statistics.median(times[name])
        rows.append(
            {
                "contender": name,
                "median_s": round(med, 2),
                "ratio_to_checkpoint_all": round(med / base, 3),
                "gflop_per_vce": round(flops / 1e9, 2),
                "peak_growth_mib": round(peak_growth(name, a.size, a.threads), 1),
                "reconstruction_mse": float(res.diagnostics["reconstruction_mse"][0]),
                "final_loss": float(res.diagnostics["loss"][0]),
                "checkpointed_unet_calls": int(res.diagnostics["checkpointed_unet_calls"][0]),
            }
        )
    print(
        f"\n{'contender':<15} {'median s':>9} {'ratio':>6} {'GFLOP/VCE':>10} {'peak MiB':>9} {'recon MSE':>10} "
        f"{'loss':>8}"
    )
    for row in rows:
        print(
            f"{row['contender']:<15} {row['median_s']:>9.2f} {row['ratio_to_checkpoint_all']:>6.3f} "
            f"{row['gflop_per_vce']:>10.2f} "
            f"{row['peak_growth_mib']:>9.1f} {row['reconstruction_mse']:>10.5f} {row['final_loss']:>8.4f}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
