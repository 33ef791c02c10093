"""MaskDiME against the official code (``core/sample_utils.py``), on tiny models."""

import pytest
import torch
from safetensors.torch import load_file

from lit_vce.methods.guided import Step
from lit_vce.methods.maskdime import MaskDiME, gradient_masks


def _step(x_t, x0, t=5, next_t=4, state=None, abar=0.5):
    return Step(0, t, next_t, x_t, x0, torch.tensor(abar), 10, {} if state is None else state)


@pytest.mark.parametrize("name,per_channel", [("mean", False), ("channel", True)])
def test_gradient_masks_equal_the_official_ones(name, per_channel):
    """scripts/make_maskdime_fixture.py ran the official compute_grad_masks_nested2."""
    f = load_file("tests/fixtures/maskdime_masks.safetensors")
    outer, inner = gradient_masks(f["grads"], 0.05, 0.5, 5, 3.0, per_channel)
    assert torch.equal(outer, f[f"{name}.outer"]) and torch.equal(inner, f[f"{name}.inner"])
    assert (inner <= outer).all() and inner.sum() < outer.sum()


def test_one_step_is_the_official_update(tiny_diffusion, tiny_classifier, tiny_batch):
    d = tiny_diffusion("adm", 10)
    m = MaskDiME(diffusion=d, scales=(8.0,), grad_scale=8.0, l1_weight=0.05, topk_ratio=0.1)
    b = tiny_batch
    torch.manual_seed(0)
    x_t, x0 = torch.randn(4, 3, 16, 16), torch.rand(4, 3, 16, 16)
    inner_prev = (torch.rand(4, 1, 16, 16) > 0.5).float()
    state = {"inner": inner_prev}
    g = m.guidance(None, b, tiny_classifier, None, None, _step(x_t, x0, state=state, abar=0.25))
    # official: x_t = m2 * pred_xstart + (1 - m2) * img (in [-1, 1]); grads_class = d(-8 logit_y)/dx / sqrt(abar)
    x_m = (inner_prev * (x0 * 2 - 1) + (1 - inner_prev) * (b.images * 2 - 1)).requires_grad_(True)
    (d_cls,) = torch.autograd.grad(-8.0 * tiny_classifier((x_m + 1) / 2).gather(1, b.target[:, None]).sum(), x_m)
    grads_class = d_cls / 0.5
    grads = 8.0 * (grads_class + 0.05 * torch.sign(x_t - (b.images * 2 - 1)))
    torch.testing.assert_close(g, -grads, rtol=1e-4, atol=1e-5)
    outer, inner = gradient_masks(grads_class, 0.1, 0.5, 5, 3.0, False)
    assert torch.equal(state["outer"], outer) and torch.equal(state["inner"], inner)
    # the step: inside the outer mask the guided mean (no noise), outside the image noised to this step's level
    new = torch.randn(4, 3, 16, 16)
    out = m.post_step(new, _step(x_t, x0, t=5, state=state), b, state)
    torch.testing.assert_close(out * outer, new * outer)
    resid = out - d.add_noise(b.images * 2 - 1, torch.zeros_like(new), 5)
    outside = resid[(1 - outer).expand_as(resid).bool()]
    noise_std = (1 - d.alpha_bar(5)).sqrt()
    assert outside.numel() > 100 and outside.std() == pytest.approx(float(noise_std), rel=0.2)  # noised at t = 5
    assert state["diagnostics"]["mask_fraction"].tolist() == pytest.approx(outer.mean((1, 2, 3)).tolist())
    # the first step reads the image itself
    g0 = m.guidance(None, b, tiny_classifier, None, None, _step(x_t, x0))
    assert not torch.allclose(g0, g)


def test_the_guided_mean_is_the_next_sample_without_noise(tiny_diffusion, tiny_classifier, tiny_batch):
    import dataclasses

    from lit_vce.rngs import sample_rngs

    def fresh():
        return dataclasses.replace(tiny_batch, rngs=sample_rngs(0, tiny_batch.sample_ids))

    m = MaskDiME(diffusion=tiny_diffusion("adm", 10), scales=(8.0,), topk_ratio=1.0, x_t_rate=1.0)
    assert m.ancestral_noise is False
    a = m.generate(fresh(), tiny_classifier)
    assert torch.equal(a.images, m.generate(fresh(), tiny_classifier).images)
    m.ancestral_noise = True  # the knob the code's update needs off: on, the samples change
    assert not torch.allclose(a.images, m.generate(fresh(), tiny_classifier).images)
    with pytest.raises(ValueError, match="sampler='adm'"):
        MaskDiME(diffusion=tiny_diffusion("ddim", 10))
    with pytest.raises(ValueError, match="topk_ratio"):
        MaskDiME(diffusion=tiny_diffusion("adm", 10), topk_ratio=0.0)


def test_maskdime_edits_less_than_fastdime_on_the_world():
    """Its defining property, with the world configs' settings: on 4 `robust` images both flip
    every image, and MaskDiME changes fewer pixels (more than 4/255 in some channel)."""
    import lit_vce
    from lit_vce.data.world import ShapesWorld

    data = ShapesWorld("balanced", "test", size=4, seed=0)
    x = torch.stack([data[i]["image"] for i in range(4)])
    src = [data.sample_label(i) for i in range(4)]
    tgt = [(s + 1) % 4 for s in src]
    common = dict(sources=src, metrics=False, scales=(100.0, 300.0, 1000.0), num_steps=100, skip=0.7)
    fast = lit_vce.explain(x, tgt, "robust", "fastdime", warmup=15, **common)
    mask = lit_vce.explain(x, tgt, "robust", "maskdime", blur_kernel=3, blur_sigma=1.0, **common)

    def area(ex):
        return ((ex.counterfactuals - ex.originals).abs().amax(1) > 4 / 255).float().mean().item()

    assert bool(fast.success.all()) and bool(mask.success.all())
    assert area(mask) < 0.8 * area(fast), (area(mask), area(fast))
