#!/usr/bin/env python
"""Write ``tests/fixtures/digin_official/digin_loss_official.safetensors``: DiG-IN's first step by the official code.

    git clone https://github.com/M4xim4l/DiG-IN /tmp/digin
    python scripts/make_digin_loss_fixture.py /tmp/digin

The first optimisation step of the official UVCE pipeline (``src/utils/sd_backprop_pipe.py``)
on the tiny Stable Diffusion of ``tiny_sd64/``, without blending or prompt-to-prompt:
- the trajectory: the official ``DenoisingLoop`` (DDIM from the folder's scheduler config, 20
  steps, guidance 3.0, per-step null embeddings and per-step deltas of the conditioning and of
  the null embeddings) from the null-text fixture's ``x_T`` and embeddings, with random deltas
  (sd 0.05, as after some optimisation steps);
- the loss: the official ``calculate_loss``, augmented (``loss_steps`` 3, ``linear``) and not
  (the last x0-prediction, weight 1), with the official loss ``get_loss_function('CE')`` on the
  official ``NormalizationAndCutoutWrapper`` (16 cutouts, ``cut_power`` 0.3, ImageNet
  mean/std, no noise) around a tiny random classifier (``SmallCNN(width=8)``, 32 px, four
  classes), the official regularisers ``latent_background_l2`` 25 and ``px_background_l2`` 250
  (``setup_regularizers``) with the official masks of ``digin_mask_official.safetensors``,
  decoded by the official ``decode_latent_to_img``;
- its gradients with respect to ``x_T``, both deltas and each x0-prediction.
The cutouts the official ``MakeCutouts`` draws from the global generator are recorded (side,
x offset, y offset), so a test can give its own code the same views. Kornia and lpips,
imported for other paths, are stubbed.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
from _official import stub  # scripts/_official.py
from safetensors.torch import load_file, save_file

SEED, NUM_STEPS, LOSS_STEPS, TARGET, GUIDANCE, DELTA = 0, 20, 3, 2, 3.0, 0.05
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WEIGHTS = {"latent_background_l2": 25.0, "px_background_l2": 250.0}


def import_official(path: str):
    sys.path.insert(0, str(Path(path).resolve() / "src"))
    filters, morphology = stub("kornia.filters"), stub("kornia.morphology")
    stub("kornia", filters=filters, morphology=morphology)
    stub("lpips", LPIPS=torch.nn.Module)
    from utils import loss_functions, sd_backprop_pipe
    from utils.models import model_wrappers

    return sd_backprop_pipe, loss_functions, model_wrappers


class _RecordingTorch:
    """``torch`` for the official cutout module, recording each ``randint``: its value and its
    bound (the bound is ``side - size + 1``, so it gives the cutout's size)."""

    def __init__(self):
        self.draws: list[tuple[int, int]] = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def randint(self, low, high, size, **k):
        r = torch.randint(low, high, size, **k)
        self.draws.append((int(r), int(high)))
        return r


def main(path: str) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from lit_vce.world.models import SmallCNN

    pipe_mod, loss_functions, model_wrappers = import_official(path)
    folder = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "digin_official"
    inputs = load_file(str(folder / "digin_null_text_official.safetensors"))
    masks = load_file(str(folder / "digin_mask_official.safetensors"))
    vae = AutoencoderKL.from_pretrained(str(folder / "tiny_sd64" / "vae")).eval().requires_grad_(False)
    pipe = types.SimpleNamespace(vae=vae)  # what decode/encode use of the pipeline
    decode = pipe_mod.StableDiffusionPipelineWithGrad.decode_latent_to_img.__get__(pipe)
    encode = pipe_mod.StableDiffusionPipelineWithGrad.encode_image_to_latent.__get__(pipe)
    pipe.decode_latent_to_img = decode

    image = inputs["image_uint8"].permute(2, 0, 1).float() / 255  # (3, 64, 64), as the pipeline's starting_img
    with torch.no_grad():
        start_latent = encode(image)
    torch.manual_seed(SEED)
    net = SmallCNN(width=8).eval()
    # the first optimisation step's trajectory: the official DenoisingLoop from the null-text
    # fixture's x_T and per-step null embeddings, with random per-step deltas (as after some steps)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "tiny_sd64" / "unet")).eval().requires_grad_(False)
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(str(folder / "tiny_sd64" / "scheduler")))
    scheduler.set_timesteps(NUM_STEPS)
    loop = pipe_mod.DenoisingLoop(
        unet,
        scheduler,
        None,
        NUM_STEPS,
        scheduler.timesteps,
        True,
        GUIDANCE,
        pipe_mod.OptimParams(loss_steps=LOSS_STEPS),
        per_timestep_null_text=True,
    )
    g = torch.Generator().manual_seed(SEED)
    x_T = inputs["x_T"].clone().requires_grad_(True)
    cond, nulls = inputs["cond_embedding"], inputs["null_text_embeddings"]
    delta_c = (DELTA * torch.randn((NUM_STEPS, *cond.shape), generator=g)).requires_grad_(True)
    delta_u = (DELTA * torch.randn((NUM_STEPS, *cond.shape), generator=g)).requires_grad_(True)
    preds = loop(nulls, cond, delta_u, delta_c, x_T, {"eta": 0.0, "generator": None})
    for i in range(NUM_STEPS - LOSS_STEPS, NUM_STEPS):
        preds[i].retain_grad()

    classifier = model_wrappers.NormalizationAndCutoutWrapper(
        net, 32, mean=torch.tensor(MEAN), std=torch.tensor(STD), noise_sd=0, cut_power=0.3, num_cutouts=16
    )
    losses = [loss_functions.make_loss_dict(loss_functions.get_loss_function("CE", classifier), "CE", 1.0)]
    regs, needs_mask = pipe_mod.setup_regularizers(WEIGHTS, "cpu")
    assert needs_mask
    recorder = _RecordingTorch()
    model_wrappers.torch = recorder  # MakeCutouts draws through the module's torch

    def calculate(steps, schedule, augment):
        return pipe_mod.StableDiffusionPipelineWithGrad.calculate_loss(
            pipe,
            preds,
            None,
            None,
            losses,
            {"CE": TARGET},
            masks["latent_mask"],
            masks["px_mask"],
            regs,
            steps,
            schedule,
            image,
            start_latent,
            augment=augment,
        )

    with torch.no_grad():
        clean, clean_image = calculate(1, "uniform", False)
    assert not recorder.draws
    torch.manual_seed(SEED)
    loss, _ = calculate(LOSS_STEPS, "linear", True)
    loss.backward()
    draws = torch.tensor(recorder.draws).view(LOSS_STEPS * 16, 2, 2)  # per cutout: (x, bound), (y, bound)
    assert torch.equal(draws[:, 0, 1], draws[:, 1, 1])  # square cutouts
    sides = 64 + 1 - draws[:, 0, 1]
    out = {
        "image": image,
        "start_latent": start_latent,
        "latent_mask": masks["latent_mask"],
        "px_mask": masks["px_mask"],
        "target": torch.tensor([TARGET]),
        "loss": loss.detach()[None],
        "clean_loss": clean[None],
        "clean_image": clean_image,
        "cutouts": torch.stack([sides, draws[:, 0, 0], draws[:, 1, 0]], 1),
    }
    for k, i in enumerate(range(NUM_STEPS - LOSS_STEPS, NUM_STEPS)):
        out[f"x0_{k}"] = preds[i].detach()
        out[f"x0_grad_{k}"] = preds[i].grad
    out.update(x_T=x_T.detach(), delta_c=delta_c.detach(), delta_u=delta_u.detach())
    out.update(x_T_grad=x_T.grad, delta_c_grad=delta_c.grad, delta_u_grad=delta_u.grad)
    out.update({f"classifier.{k}": v for k, v in net.state_dict().items()})
    meta = {
        "source": "M4xim4l/DiG-IN src/utils/sd_backprop_pipe.py calculate_loss, setup_regularizers; "
        "src/utils/loss_functions.py get_loss_function('CE'); model_wrappers NormalizationAndCutoutWrapper",
        "settings": json.dumps(
            {
                "loss_steps": LOSS_STEPS,
                "schedule": "linear",
                "num_cutouts": 16,
                "cut_power": 0.3,
                "noise_sd": 0,
                "classifier_size": 32,
                "mean": MEAN,
                "std": STD,
                "regularizers": WEIGHTS,
                "target": TARGET,
                "x0_steps": list(range(NUM_STEPS - LOSS_STEPS, NUM_STEPS)),
                "guidance_scale": GUIDANCE,
                "delta_sd": DELTA,
            }
        ),
        "classifier": "lit_vce.world.models.SmallCNN(width=8)",
        "cutouts": "per cutout in draw order (16 per x0-prediction, step 17 first): side, x offset, y offset",
        "torch": torch.__version__,
    }
    dest = folder / "digin_loss_official.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, str(dest), metadata=meta)
    print(f"wrote {dest}: loss {float(loss):.6f}, clean {float(clean):.6f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
