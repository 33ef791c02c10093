"""The one diffusion interface: diffusers' schedulers underneath, CFG written once, the
same calls for pixel (UNet2DModel, ADM) and latent (Stable Diffusion) models."""

from __future__ import annotations

import pytest
import torch

from lit_vce.diffusion import Diffusion, LatentDiffusion, PixelDiffusion
from lit_vce.rngs import sample_rngs


def test_ddim_step_is_diffusers_ddim_scheduler_exactly(tiny_sd):
    """The DDIM step every method takes equals a fresh DDIMScheduler built as the official
    DiG-IN code builds it (bit for bit), timesteps included."""
    from diffusers import DDIMScheduler

    d = LatentDiffusion(str(tiny_sd[0]), num_steps=20)
    ref = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    ref.set_timesteps(20)
    assert torch.equal(d.timesteps, ref.timesteps)
    torch.manual_seed(0)
    z, eps = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    for t in d.timesteps[[0, 7, -1]]:
        ours, x0 = d.step(eps, t, z)
        theirs = ref.step(eps, int(t), z, eta=0.0)
        assert float((ours - theirs.prev_sample).abs().max()) == 0.0
        assert float((x0 - theirs.pred_original_sample).abs().max()) == 0.0


def test_inversion_reverses_each_ddim_step_and_pixel_clipping_applies_to_x0():
    d = PixelDiffusion("world", num_steps=10)
    torch.manual_seed(0)
    z0 = torch.rand(2, 3, 32, 32) * 2 - 1
    cond = d.condition(torch.tensor([0, 1]))
    lat = d.invert(z0, cond)
    assert len(lat) == d.num_steps + 1 and torch.equal(lat[-1], z0)
    ts = d.timesteps
    # the last inversion step, by the DDIM formula: from level abar(t_1) (or abar_0 at the end) up to abar(t_0)
    a, a_prev = d.alpha_bar(ts[0]), d.alpha_bar(ts[1])
    eps = d.eps(lat[1], ts[0], cond)
    x0 = (lat[1] - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
    torch.testing.assert_close(lat[0], a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=0, atol=1e-5)
    big = torch.full((1, 3, 32, 32), 50.0)
    _, x0 = d.step(torch.zeros_like(big), ts[0], big)
    assert float(x0.max()) == 1.0  # clip_sample clamps the x0-prediction inside the step


def test_classifier_free_guidance_is_one_batched_call_conditional_half_first():
    d = PixelDiffusion("world", num_steps=10, guidance_scale=3.0)
    torch.manual_seed(0)
    z, t = torch.randn(2, 3, 32, 32), d.timesteps[3]
    cond, uncond = d.condition(torch.tensor([0, 2])), d.null_condition(2)
    calls = []
    d.unet.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    guided = d.eps(z, t, cond, uncond)
    assert calls == [4]
    e_c, e_u = d.eps(z, t, cond), d.eps(z, t, uncond)
    torch.testing.assert_close(guided, e_u + 3.0 * (e_c - e_u), rtol=0, atol=1e-5)
    assert torch.equal(d.eps(z, t, cond, uncond, scale=1.0), e_c)  # scale 1: one unguided call
    calls.clear()
    assert torch.equal(d.eps(z, t, cond, uncond, scale=0.0), e_u)  # scale 0: the unconditional call alone
    assert calls == [2]
    # integer labels and the class embedding vectors are the same conditioning
    assert torch.equal(d.unet(z, d.model_timestep(t, 2, "cpu"), class_labels=torch.tensor([0, 2])).sample, e_c)


def test_learned_variance_models_keep_the_conditional_variance_under_cfg(tiny_adm_preset):
    from lit_vce.diffusion.adm import ADMConfig, ADMUNet

    torch.manual_seed(0)
    net = ADMUNet(ADMConfig.preset("tiny", class_cond=True, num_classes=4, learn_sigma=True)).eval()
    d = PixelDiffusion(
        unet=net, scheduler_config={"num_train_timesteps": 1000, "beta_schedule": "linear"}, sampler="adm", num_steps=10
    )
    assert d.class_conditional_only and d.learned_variance
    z = torch.randn(2, 3, d.image_size, d.image_size)
    out = d.model_output(z, 5, d.condition(torch.tensor([1, 3])))
    assert out.shape[1] == 6
    with pytest.raises(ValueError, match="no unconditional input"):
        d.null_condition(2)
    with pytest.raises(ValueError, match="condition on the target"):
        d.model_output(z, 5, None)
    with pytest.raises(ValueError, match="p_mean_variance"):
        d.step(out[:, :3], 5, z)


@pytest.mark.parametrize("kind", ["pixel", "adm", "latent"])
def test_every_model_family_answers_the_same_calls(kind, tiny_sd, tiny_adm_preset):
    if kind == "pixel":
        d, cond = PixelDiffusion("world", num_steps=5), None
        cond = d.condition(torch.tensor([0, 1]))
    elif kind == "adm":
        d, cond = PixelDiffusion("adm:tiny", sampler="adm", num_steps=5), None
    else:
        d = LatentDiffusion(str(tiny_sd[0]), num_steps=5)
        cond = d.condition(["a photograph of a circle"] * 2)
    assert isinstance(d, Diffusion) and len(d.timesteps) == 5
    images = torch.rand(2, 3, d.image_size, d.image_size)
    z0 = d.encode(images)
    assert z0.shape[1:] == d.latent_shape and d.decode(z0).shape == images.shape
    noise = torch.randn_like(z0)
    t = d.timesteps[1]
    z_t = d.add_noise(z0, noise, t)
    torch.testing.assert_close(d.x0(z_t, noise, t), z0, rtol=0, atol=1e-4)  # the true noise gives back x0
    eps = d.eps(z_t, t, cond)
    assert eps.shape == z0.shape and torch.isfinite(eps).all()
    samples = d.sample(cond, sample_rngs(0, ["a", "b"]))
    assert samples.shape == images.shape
    assert torch.equal(samples, d.sample(cond, sample_rngs(0, ["a", "b"])))  # seeded per sample


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="sampler must be one of"):
        PixelDiffusion("world", sampler="euler")
    with pytest.raises(ValueError, match="eps-prediction"):
        PixelDiffusion(unet=PixelDiffusion("world").unet, scheduler_config={"prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="deterministic sampler"):
        PixelDiffusion("world", sampler="ddpm", num_steps=5).invert(torch.zeros(1, 3, 32, 32), None)
