#!/usr/bin/env python
"""Write ``tests/fixtures/dvce_official_step.safetensors``: DVCE's guided step by the official code.

    git clone https://github.com/valentyn1boreiko/DVCEs /tmp/dvces
    python scripts/make_dvce_fixture.py /tmp/dvces

Runs the official ``DiffusionAttack.edit_image_by_prompt`` (``dff_attack.py``) with
the settings of the paper's DVCE runs (``classifier_lambda`` 0.1, ``lp_custom`` 1,
``lp_custom_value`` 0.15, ``enforce_same_norms``, ``projecting_cone`` at 30 degrees,
one view, ``p_sample``) on the tiny random ADM of ``adm_tiny_uncond.safetensors``
(respaced to 200 steps) and two tiny random classifiers (``SmallCNN(width=8)``, four
classes; the first is the robust one, the second the explained one, as the official
``--classifier_type`` / ``--second_classifier_type`` pair). The sampling loop is
replaced by one that, at three respaced steps, calls the official ``p_sample`` with
``cond_fn_clean`` exactly as ``p_sample_loop_progressive`` does and records what
``cond_fn_clean`` returned and the guided mean; nothing the step computes is replaced.
Packages the module imports for other paths (pytorch_msssim, lpips, kornia, the
classifier zoo's config loader) are stubbed.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from _official import stub  # scripts/_official.py
from safetensors.torch import load_file, save_file

STEPS = (150, 120, 60)  # respaced indices of 200 (DVCE's sampling runs 99 .. 0)
TARGETS = (1, 2, 3)
SEED = 0


def import_official(path: str):
    root = Path(path).resolve()
    sys.path[:0] = [str(root), str(root / "blended_diffusion" / "guided_diffusion")]
    for name in ("pytorch_msssim", "lpips", "utils_svces.get_config"):
        stub(name)
    # the augmentation stack is built but never applied with one view (ImageAugmentations(size, 1) is the identity)
    identity = lambda *a, **k: torch.nn.Identity()  # noqa: E731
    augmentation = stub("kornia.augmentation", RandomAffine=identity, RandomPerspective=identity)
    stub("kornia", augmentation=augmentation)
    stub("utils_svces.Evaluator", Evaluator=object)
    stub("blended_diffusion.utils_blended.video")
    from blended_diffusion.guided_diffusion.guided_diffusion.script_util import create_model_and_diffusion
    from blended_diffusion.optimization import dff_attack

    return dff_attack, create_model_and_diffusion


def main(path: str) -> None:
    from lit_vce.world.models import SmallCNN

    dff_attack, create_model_and_diffusion = import_official(path)
    fixtures = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
    adm_file = fixtures / "adm_tiny_uncond.safetensors"
    config = json.loads(safe_open(str(adm_file), "pt").metadata()["config"])
    data = load_file(str(adm_file))
    model, diffusion = create_model_and_diffusion(**config)
    model.load_state_dict({k[11:]: v for k, v in data.items() if k.startswith("state_dict.")})
    model.eval().requires_grad_(False)
    # as DiffusionAttack.__init__ does (the attention blocks' checkpointed backward needs it)
    for name, param in model.named_parameters():
        if "qkv" in name or "norm" in name or "proj" in name:
            param.requires_grad_()

    torch.manual_seed(SEED)
    robust, explained = SmallCNN(width=8).eval(), SmallCNN(width=8).eval()
    image = (data["x"].clamp(-1, 1) + 1) / 2  # [0, 1], as the official code is given it
    y = torch.tensor(TARGETS)
    g = torch.Generator().manual_seed(SEED)
    noise = {i: torch.randn(image.shape, generator=g) for i in STEPS}
    x_ts = {i: diffusion.q_sample(image * 2 - 1, torch.full((3,), i), noise[i]) for i in STEPS}

    args = types.SimpleNamespace(
        verbose=False,
        clip_guidance_lambda=0,
        second_classifier_type=1,
        third_classifier_type=-1,
        projecting_cone=True,
        deg_cone_projection=30.0,
        aug_num=1,
        classifier_lambda=0.1,
        enforce_same_norms=True,
        lp_custom=1.0,
        lp_custom_value=0.15,
        layer_reg=0,
        quantile_cut=0,
        denoise_dist_input=False,
        gen_type="p_sample",
        use_blended=False,
        device_ids=[0],
        skip_timesteps=100,
        not_use_init_image=False,
        local_clip_guided_diffusion=False,
        range_t=0,
        eps_project=30,
        ilvr_multi=0,
        seed=SEED,
    )
    attack = object.__new__(dff_attack.DiffusionAttack)
    attack.args, attack.verbose, attack.device = args, False, "cpu"
    attack.tensorboard_counter, attack.small_const = 0, 1e-12
    attack.model, attack.diffusion, attack.model_config = model, diffusion, {"image_size": config["image_size"]}
    attack.classifier, attack.second_classifier = robust, explained
    attack.imagenet_labels = ["a", "b", "c", "d"]
    attack.image_augmentations = dff_attack.ImageAugmentations(32, 1)  # one view: the identity
    attack.resizers = None

    out: dict[str, torch.Tensor] = {}
    official_condition_mean = diffusion.condition_mean

    def one_step_per_recorded_index(model_, shape, clip_denoised, model_kwargs, cond_fn, **kwargs):
        for i in STEPS:
            recorded = {}

            def recording(x, t, **kw):
                recorded["gradient"] = cond_fn(x, t, **kw)
                return recorded["gradient"]

            def recording_mean(*a, **k):
                recorded["conditioned_mean"], variance = official_condition_mean(*a, **k)
                return recorded["conditioned_mean"], variance

            t = torch.tensor([i] * shape[0])
            diffusion.condition_mean = recording_mean
            with torch.no_grad():
                step = diffusion.p_sample(
                    model_, x_ts[i], t, clip_denoised=clip_denoised, cond_fn=recording, model_kwargs=model_kwargs
                )
            out[f"step{i}.x_t"] = x_ts[i]
            out[f"step{i}.gradient"] = recorded["gradient"]
            out[f"step{i}.conditioned_mean"] = recorded["conditioned_mean"]
            out[f"step{i}.pred_xstart"] = step["pred_xstart"]
        return iter(())

    diffusion.p_sample_loop_progressive = one_step_per_recorded_index
    attack.edit_image_by_prompt(image, y, "unused")

    for name, net in (("robust", robust), ("explained", explained)):
        out.update({f"{name}.{k}": v for k, v in net.state_dict().items()})
    out.update(image=image, target=y)
    dest = fixtures / "dvce_official_step.safetensors"
    meta = {
        "source": "valentyn1boreiko/DVCEs blended_diffusion/optimization/dff_attack.py cond_fn_clean via p_sample",
        "settings": json.dumps({k: v for k, v in vars(args).items() if not isinstance(v, list)}),
        "steps": json.dumps(STEPS),
        "classifiers": "lit_vce.world.models.SmallCNN(width=8); robust = classifier_type, explained = second",
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    save_file({k: v.contiguous() for k, v in out.items()}, str(dest), metadata=meta)
    print(f"wrote {dest} ({len(out)} tensors)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
