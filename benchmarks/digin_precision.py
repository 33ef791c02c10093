#!/usr/bin/env python
"""What bfloat16 costs DiG-IN's null-text inversion: reconstruction error and time, fp32 vs bf16.

    python benchmarks/digin_precision.py --model world [--steps 20] [--null-text-steps 10] [--n 16]
    python benchmarks/digin_precision.py --model sd15 [--size 128] [--steps 10] [--null-text-steps 10] [--n 2]

Runs DDIM + null-text inversion (the official schedule) of ``--n`` world images
once in float32 and once in bfloat16, and prints, per dtype, the latent MSE
between the null-text reconstruction and the encoded image (the diagnostic
``reconstruction_mse`` of DiG-IN) and the seconds, then the ratios.

- ``world``: the world's trained pixel diffusion model; bfloat16 = autocast
  (weights in float32, matmuls and convolutions in bfloat16). A trained model,
  so the error is what a real inversion loses to rounding.
- ``sd15``: the Stable Diffusion 1.5 architecture with random weights (no
  download) at ``--size`` pixels; bfloat16 = bfloat16 components under
  autocast, as ``dtype: bfloat16`` + ``autocast: bfloat16`` run DiG-IN. Random
  weights cannot invert well, so this shows the cost and the precision effect
  on the real arithmetic, not a reconstruction quality. On CPUs run it at a
  reduced size; on a GPU at 512 px with 20 steps (the published setting).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def main() -> None:
    from transformers import CLIPTokenizer

    from lit_vce.data.world import ShapesWorld
    from lit_vce.diffusion import LatentDiffusion, PixelDiffusion
    from lit_vce.testing import save_tiny_latent_diffusion, stable_diffusion_components

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("world", "sd15"), default="world")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--null-text-steps", type=int, default=10)
    p.add_argument("--n", type=int, default=2)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d = ShapesWorld("balanced", "test", a.n)
    images = F.interpolate(
        torch.stack([d[i]["image"] for i in range(a.n)]), size=(a.size, a.size), mode="bilinear", align_corners=False
    ).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(save_tiny_latent_diffusion(Path(tmp) / "sd") / "tokenizer"))
    sched = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    rows = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)  # the same random weights for both
        if a.model == "world":
            bb = PixelDiffusion("world", num_steps=a.steps, guidance_scale=3.0).to(device)
            images = torch.stack([d[i]["image"] for i in range(a.n)]).to(device)
            cond_of = lambda: bb.condition(torch.tensor([d[i]["label"] for i in range(a.n)], device=device))  # noqa: E731
        else:
            parts = stable_diffusion_components("sd15", a.size)  # the SD 1.5 architecture, random weights
            unet, vae, text = parts["unet"], parts["vae"], parts["text_encoder"]
            bb = LatentDiffusion(
                num_steps=a.steps,
                dtype=dtype,
                unet=unet,
                vae=vae,
                text_encoder=text,
                tokenizer=tokenizer,
                scheduler_config=sched,
            ).to(device)
            cond_of = lambda: bb.condition(["a photograph of a circle"] * a.n)  # noqa: E731
        ctx = contextlib.nullcontext() if dtype == "float32" else torch.autocast(device, dtype=torch.bfloat16)
        t0 = time.perf_counter()
        with ctx:
            z0 = bb.encode(images)
            inv = bb.null_text_inversion(z0, cond_of(), a.null_text_steps)
        rows[dtype] = (inv.reconstruction_error, time.perf_counter() - t0)
        print(
            f"{dtype:9s} null-text reconstruction MSE {inv.reconstruction_error:.3e}  {rows[dtype][1]:.1f} s",
            flush=True,
        )
    (e32, s32), (e16, s16) = rows["float32"], rows["bfloat16"]
    size = "32 px (world)" if a.model == "world" else f"{a.size} px (SD 1.5 architecture, random weights)"
    print(
        f"bf16 / fp32: reconstruction MSE x{e16 / max(e32, 1e-30):.2f}, time x{s16 / s32:.2f} "
        f"({size}, {a.steps} steps, {a.null_text_steps} null-text steps, {a.n} images, {device})"
    )


if __name__ == "__main__":
    main()
