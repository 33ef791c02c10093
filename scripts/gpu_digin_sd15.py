#!/usr/bin/env python
"""One DiG-IN VCE on the Stable Diffusion 1.5 architecture with random weights (random
weights cost what real ones cost), at the published settings, on one GPU: fp32 and
bf16, each with checkpointing as the memory needs (the default, ``"auto"``) and with every
call checkpointed (``gradient_checkpointing=True``, as the official code runs).

    .venv/bin/python scripts/gpu_digin_sd15.py              # 512 px, published settings (one H200: a few minutes)
    .venv/bin/python scripts/gpu_digin_sd15.py --tiny       # the same code path, tiny components, on the CPU
    .venv/bin/python scripts/gpu_digin_sd15.py --no-flops   # skip the FLOP-counting passes

Published settings: 512 px, 20 DDIM steps, guidance 3, null-text inversion with 10
inner steps, the 6-setting search (blend {0, 0.3} x injection {0.3, 0.4, 0.5}),
20 outer Adam steps, 16 cutouts; a random-init ResNet-50 at 224 px explains.

Prints one JSON row per run (seconds, peak GPU memory, FLOPs per VCE, achieved
TFLOP/s, UNet calls checkpointed, null-text reconstruction error, final loss) and a
one-line summary. FLOPs do not depend on the dtype: they are counted once per mode,
in a separate bf16 pass under ``FlopCounterMode`` (matmuls and convolutions, backward
included), so the timed runs carry no counting overhead.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

MODES = {"auto": {}, "checkpoint_all": {"gradient_checkpointing": True}}


def build(tiny: bool, size: int, device: str):
    import timm

    from lit_vce.classifiers import ImageClassifier
    from lit_vce.testing import stable_diffusion_components

    parts = stable_diffusion_components("tiny" if tiny else "sd15", size)
    for key in ("unet", "vae", "text_encoder"):
        parts[key] = parts[key].to(device)
    arch, res = ("resnet18", 32) if tiny else ("resnet50", 224)
    clf = ImageClassifier(
        timm.create_model(arch, pretrained=False, num_classes=4), res, ["zebra", "sorrel", "cat", "dog"], name=arch
    ).to(device)
    return parts, clf


def one_vce(parts, clf, dtype: str, mode: str, a, device: str):
    from lit_vce.diffusion import LatentDiffusion
    from lit_vce.methods import VCEBatch
    from lit_vce.methods.digin import DiGIN, InversionSettings, LossSettings, MemorySettings, OptimisationSettings
    from lit_vce.rngs import sample_rngs

    bb = LatentDiffusion(num_steps=a.steps, guidance_scale=3.0, **parts).to(device)
    size = bb.image_size
    ids = ["img0"]
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    batch = VCEBatch(
        image,
        torch.tensor([0], device=device),
        torch.tensor([1], device=device),
        ids,
        sample_rngs(0, ids, device=device),
    )
    method = DiGIN(
        bb,
        num_steps=a.steps,
        optimisation=OptimisationSettings(outer_steps=a.outer, num_cutouts=a.cutouts),
        inversion=InversionSettings(null_text_steps=a.null_text_steps),
        loss=LossSettings(background_latent_weight=0.0, background_pixel_weight=0.0),
        memory=MemorySettings(autocast=None if dtype == "float32" else dtype, **MODES[mode]),
    )
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = method.generate(batch, clf)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--outer", type=int, default=20)
    p.add_argument("--cutouts", type=int, default=16)
    p.add_argument("--null-text-steps", type=int, default=10)
    p.add_argument("--size", type=int, default=512, help="image size (the SD 1.5 architecture at this resolution)")
    p.add_argument("--tiny", action="store_true", help="tiny components on the CPU (smoke run of the same code path)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting passes")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args()
    from lit_vce.testing import count_flops

    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    size = 64 if a.tiny else a.size
    t_start = time.perf_counter()
    parts, clf = build(a.tiny, size, device)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"device: {name}; models built in {time.perf_counter() - t_start:.1f} s", flush=True)
    flops = {}
    if not a.no_flops:
        for mode in a.modes:
            _, flops[mode] = count_flops(
                lambda m=mode: one_vce(parts, clf, "bfloat16" if device == "cuda" else "float32", m, a, device)
            )
            print(f"FLOPs per VCE, {mode}: {flops[mode] / 1e12:.1f} TFLOP", flush=True)
    rows = []
    for dtype in a.dtypes:
        for mode in a.modes:
            sec, r = one_vce(parts, clf, dtype, mode, a, device)
            f = flops.get(mode)
            rows.append(
                {
                    "dtype": dtype,
                    "mode": mode,
                    "image_size": size,
                    "seconds": round(sec, 2),
                    "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
                    "flop_per_vce": f,
                    "achieved_tflop_s": round(f / 1e12 / sec, 1) if f else None,
                    "checkpointed_unet_calls": int(r.diagnostics["checkpointed_unet_calls"][0]),
                    "reconstruction_mse": float(r.diagnostics["reconstruction_mse"][0]),
                    "final_loss": float(r.diagnostics["loss"][0]),
                    "finite": bool(torch.isfinite(r.images).all()),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")
    summary = "; ".join(
        f"{r['dtype']}/{r['mode']} {r['seconds']} s"
        + (f" {r['peak_gib']} GiB" if r["peak_gib"] is not None else "")
        + (f" {r['achieved_tflop_s']} TFLOP/s" if r["achieved_tflop_s"] else "")
        for r in rows
    )
    print(f"SUMMARY {name} {size}px: {summary}; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
