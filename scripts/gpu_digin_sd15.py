#!/usr/bin/env python
"""Time one DiG-IN VCE on a Stable Diffusion 1.5-sized architecture with random
weights (512 px, 20 DDIM steps, 20 outer iterations), in fp32 and bf16, with
gradient checkpointing, on one GPU. Random weights cost the same as real ones.

    .venv/bin/python scripts/gpu_digin_sd15.py [--dtypes float32 bfloat16] [--outer 20] [--steps 20]
    .venv/bin/python scripts/gpu_digin_sd15.py --tiny      # a CPU smoke run of the same code path
    .venv/bin/python scripts/gpu_digin_sd15.py --dtypes float32 --size 256 --steps 2 --outer 1 --null-text-steps 1
                                                           # the full architecture, cut down to run on CPUs

Prints, per dtype: seconds for null-text inversion + settings search +
optimisation of one image, the peak GPU memory and the null-text
reconstruction error (latent MSE; how much bf16 costs the inversion). The classifier is a
random-init timm ResNet-50 at 224 px.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def sd15_components(tiny: bool, size: int = 512):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if tiny:
        unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, cross_attention_dim=8,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=2)
        vae = AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4, sample_size=32)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                                           vocab_size=1000, max_position_embeddings=77))
        return unet, vae, text
    # the Stable Diffusion 1.5 architecture (860M UNet, 84M VAE, 123M CLIP ViT-L/14 text encoder)
    unet = UNet2DConditionModel(sample_size=size // 8, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2, sample_size=size)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                       vocab_size=49408, max_position_embeddings=77))
    return unet, vae, text


def run(dtype: str, steps: int, outer: int, tiny: bool, device: str, size: int = 512, null_text_steps: int = 10) -> dict:
    import timm
    from transformers import CLIPTokenizer

    from lit_vce.classifiers import ImageClassifier
    from lit_vce.rngs import sample_rngs
    from lit_vce.diffusion import LatentDiffusion
    from lit_vce.methods import DiGIN, VCEBatch
    from lit_vce.testing import save_tiny_latent_diffusion

    torch.manual_seed(0)
    unet, vae, text = sd15_components(tiny, size)
    with tempfile.TemporaryDirectory() as tmp:  # the toy tokenizer (token ids only matter for cost, not content)
        tokenizer = CLIPTokenizer.from_pretrained(str(save_tiny_latent_diffusion(Path(tmp) / "sd") / "tokenizer"))
    sched = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    bb = LatentDiffusion(num_steps=steps, dtype=dtype, unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                         scheduler_config=sched).to(device)
    arch = "resnet18" if tiny else "resnet50"
    clf = ImageClassifier(timm.create_model(arch, pretrained=False, num_classes=4), 32 if tiny else 224,
                          ["zebra", "sorrel", "cat", "dog"], name=arch).to(device)
    size = bb.image_size
    ids = ["img0"]
    batch = VCEBatch(torch.rand(1, 3, size, size, device=device), torch.tensor([0], device=device),
                     torch.tensor([1], device=device), ids, sample_rngs(0, ids, device=device))
    method = DiGIN(bb, num_steps=steps, outer_steps=outer, gradient_checkpointing=True, background_latent_weight=0.0,
                   background_pixel_weight=0.0, null_text_steps=null_text_steps, injection_fractions=(0.3, 0.4, 0.5),
                   autocast=None if dtype == "float32" else dtype)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = method.generate(batch, clf)
    if device == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"dtype": dtype, "image_size": size, "steps": steps, "outer": outer, "seconds": round(sec, 2),
            "peak_gib": round(peak, 2), "injection": method.injection, "finite": bool(torch.isfinite(result.images).all()),
            "null_text_reconstruction_mse": float(result.diagnostics["reconstruction_mse"][0])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--outer", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="tiny components on the CPU (smoke run)")
    p.add_argument("--size", type=int, default=512, help="image size (the SD 1.5 architecture at this resolution)")
    p.add_argument("--null-text-steps", type=int, default=10)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = p.parse_args()
    device = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name(0)}")
    rows = []
    for dt in a.dtypes:
        rows.append(run(dt, a.steps, a.outer, a.tiny, device, a.size, a.null_text_steps))
        print(json.dumps(rows[-1]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
