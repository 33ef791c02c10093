"""DVCE held to the official code (valentyn1boreiko/DVCEs).

- The cone projection against the official function's outputs
  (``tests/fixtures/cone_projection.safetensors``): the explained classifier's
  gradient is the axis, the robust one is projected.
- Guided steps of :class:`~lit_vce.methods.DVCE` on the official-parity ADM
  against the official ``cond_fn_clean`` + ``condition_mean`` run by the
  official code (``tests/fixtures/dvce_official_step.safetensors``).
"""

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lit_vce.methods.parts import angle, cone_projection

FIXTURES = Path(__file__).parent / "fixtures"


def test_cone_projection_matches_the_official_direction_outside_the_cone():
    d = load_file(str(FIXTURES / "cone_projection.safetensors"))
    explained, robust, official = d["explained_grad"], d["robust_grad"], d["official_output"]
    assert explained.dtype == torch.float64
    outside = angle(explained, robust) > math.radians(30)
    assert 0 < int(outside.sum()) < len(outside)  # the fixture has pairs on both sides
    unit = lambda t: t / t.norm(dim=1, keepdim=True)  # noqa: E731
    # The official code computes tan(30 deg) in float32 (torch.tensor([deg]).deg2rad()),
    # i.e. it projects at 30.0000024 deg; at that angle the directions agree to float64 rounding
    # where this CPU's float32 tan rounds as the fixture's did (an AMD EPYC: below 1e-9; an Intel
    # Xeon's vectorised tan is one ulp off: 3.4e-9)
    official_deg = math.degrees(math.atan(float(torch.tan(torch.tensor([30.0]).deg2rad()))))
    ours = cone_projection(explained, robust, official_deg)
    assert (unit(ours[outside]) - unit(official[outside])).abs().max() < 5e-9
    # at exactly 30 deg the difference is that float32 rounding only (measured 2.8e-9)
    ours = cone_projection(explained, robust, 30.0)
    assert (unit(ours[outside]) - unit(official[outside])).abs().max() < 1e-8
    # always within 30 degrees of the explained gradient (inside: the robust direction itself)
    assert (angle(ours, explained) <= math.radians(30) + 1e-9).all()
    assert torch.equal(ours[~outside], robust[~outside])
    # the official code returns the unit axis inside the cone (a quirk not copied; docs/parity.md)
    assert (unit(official[~outside]) - unit(explained[~outside])).abs().max() < 1e-9


def test_dvce_steps_match_the_official_cond_fn_clean():
    """Three guided steps against ``cond_fn_clean`` + ``condition_mean`` run by the official code.

    ``tests/fixtures/dvce_official_step.safetensors`` (``scripts/make_dvce_fixture.py``): the
    official ``DiffusionAttack`` with the paper's settings on the tiny ADM and two random
    classifiers; per step ``x_t``, the gradient ``cond_fn_clean`` returned and the guided mean.
    """
    from lit_vce.classifiers import ImageClassifier
    from lit_vce.diffusion import PixelDiffusion
    from lit_vce.diffusion.adm import ADMConfig, ADMUNet
    from lit_vce.methods import DVCE, VCEBatch
    from lit_vce.methods.guided import Step
    from lit_vce.rngs import sample_rngs
    from lit_vce.world.models import SmallCNN

    path = FIXTURES / "adm_tiny_uncond.safetensors"
    cfg = json.loads(safe_open(str(path), "pt").metadata()["config"])
    adm = ADMUNet(ADMConfig.from_dict(cfg)).eval().requires_grad_(False)
    adm.load_state_dict({k[11:]: v for k, v in load_file(str(path)).items() if k.startswith("state_dict.")})
    gen = PixelDiffusion(
        unet=adm,
        scheduler_config={"num_train_timesteps": 1000, "beta_schedule": "linear"},
        sampler="adm",
        num_steps=200,
        clip_sample=False,
    )
    ref_path = FIXTURES / "dvce_official_step.safetensors"
    ref = load_file(str(ref_path))
    steps = json.loads(safe_open(str(ref_path), "pt").metadata()["steps"])
    nets = {}
    for name in ("robust", "explained"):
        net = SmallCNN(width=8)
        net.load_state_dict({k[len(name) + 1 :]: v for k, v in ref.items() if k.startswith(name + ".")})
        nets[name] = ImageClassifier(net, 32, ["a", "b", "c", "d"], name=name)
    method = DVCE(diffusion=gen, robust_classifier=nets["robust"])
    ids = ["a", "b", "c"]
    target = ref["target"]
    batch = VCEBatch(ref["image"], torch.zeros(3, dtype=torch.long), target, ids, sample_rngs(0, ids))
    assert len(steps) == 3
    for i in steps:
        x_t, official = ref[f"step{i}.x_t"], ref[f"step{i}.gradient"]
        step = Step(0, i, None, x_t, None, gen.alpha_bar(i), 1, {})
        out, grad = method._guided_step(step, batch, nets["explained"], (None, None))
        scale = float(official.abs().max())
        assert scale > 0
        # float32 through the same UNet and classifiers: measured 4.1e-7 to 4.5e-7 of the largest entry
        assert (grad - official).abs().max() <= 5e-6 * scale, i
        guided = gen.respaced.condition_mean(out, grad)
        assert torch.allclose(guided, ref[f"step{i}.conditioned_mean"], rtol=1e-5, atol=1e-6), i
        x0 = ref[f"step{i}.pred_xstart"]
        assert (out["pred_xstart"] - x0).abs().max() <= 1e-6 * x0.abs().max(), i  # measured 9.4e-8
        # the fixture's steps are all outside the cone, where ours and the official agree (inside the
        # official code returns the explained gradient's direction: docs/parity.md)
        xt = x_t.clone().requires_grad_(True)
        o = gen.respaced.p_mean_variance(adm(xt, torch.full((3,), gen.respaced.model_timestep(i))), xt, i)
        img = (o["pred_xstart"] + 1) / 2
        g = [
            torch.autograd.grad(nets[n](img).log_softmax(1)[range(3), target].mean(), xt, retain_graph=True)[0]
            for n in ("robust", "explained")
        ]
        assert (angle(g[0].flatten(1), g[1].flatten(1)) > math.radians(30)).all()
