"""The standard baselines' defining properties: SVCE stays in its l_p ball and the box,
ACE changes nothing outside its mask, DiME's clean estimate is an unguided denoise."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_vce.methods import VCEBatch
from lit_vce.rngs import sample_rngs


def _bisection_lmo(x, w, eps, p):
    """An independent solver of max <w, d>, ||d||_p <= eps, 0 <= x + d <= 1: bisection on the
    ball's multiplier mu, |d_j| = min(gamma_j, (|w_j| / (p mu))^(1 / (p - 1)))."""
    xf, wf = x.flatten(1).double(), w.flatten(1).double()
    gamma = torch.where(wf > 0, 1 - xf, torch.where(wf < 0, xf, torch.zeros_like(xf)))
    out = []
    for g, a in zip(gamma, wf.abs()):

        def d_of(mu):
            return torch.minimum(g, (a / (p * mu)) ** (1 / (p - 1)))

        if (g**p).sum() <= eps**p:
            out.append(g)
            continue
        lo, hi = 1e-30, 1e30
        for _ in range(400):
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if (d_of(mid) ** p).sum() > eps**p else (lo, mid)
        out.append(d_of(hi))
    return (torch.stack(out) * torch.sign(wf)).view_as(w)


@pytest.mark.parametrize("p", [1.5, 2.0])
def test_svce_frank_wolfe_vertex_is_the_exact_linear_maximiser(p):
    from lit_vce.methods.svce import lp_box_lmo, lp_norm

    torch.manual_seed(0)
    x, w = torch.rand(4, 3, 6, 6), torch.randn(4, 3, 6, 6)
    x[0, 0, :2] = 0.0  # pixels at the box's bounds
    x[1, 1, :2] = 1.0
    for eps in (0.3, 2.0, 5.0, 100.0):
        d = lp_box_lmo(x, w, eps, p)
        assert ((x + d) >= -1e-6).all() and ((x + d) <= 1 + 1e-6).all()
        assert (lp_norm(d, p) <= eps * (1 + 1e-5)).all()
        torch.testing.assert_close(d.double(), _bisection_lmo(x, w, eps, p), rtol=1e-4, atol=1e-6)
    # away from the box's faces the l2 vertex is eps * w / |w|
    mid, small = torch.full((2, 3, 4, 4), 0.5), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(
        lp_box_lmo(mid, small, 0.1, 2.0),
        0.1 * small / small.flatten(1).norm(dim=1).view(-1, 1, 1, 1),
        rtol=1e-5,
        atol=1e-7,
    )


@pytest.mark.parametrize("attack,p", [("afw", 1.5), ("apgd", 2.0), ("apgd", 1.0)])
def test_svce_stays_in_its_ball_and_the_box_and_raises_the_target_confidence(attack, p):
    from lit_vce.classifiers import load_classifier
    from lit_vce.data.world import ShapesWorld
    from lit_vce.methods.svce import SVCE, lp_norm

    world = ShapesWorld("balanced", "test", 4)
    items = [world[i] for i in range(4)]
    ids = [it["sample_id"] for it in items]
    src = torch.tensor([it["label"] for it in items])
    batch = VCEBatch(torch.stack([it["image"] for it in items]), src, (src + 1) % 4, ids, sample_rngs(0, ids))
    robust = load_classifier("robust")
    eps = {1.5: 9.4, 2.0: 3.0, 1.0: 60.0}[p]
    out = SVCE(eps=eps, p=p, steps=20, attack=attack).generate(batch, robust)
    assert (lp_norm(out.images - batch.images, p) <= eps * (1 + 1e-4)).all()
    assert out.images.min() >= 0 and out.images.max() <= 1
    with torch.no_grad():
        before = robust(batch.images).softmax(1).gather(1, batch.target[:, None]).squeeze(1)
    assert (out.diagnostics["target_confidence"] > before).all()
    with pytest.raises(ValueError, match="p=1 or p=2"):
        SVCE(attack="apgd", p=1.5)
    with pytest.raises(ValueError, match="p > 1"):
        SVCE(attack="afw", p=1.0)


def test_the_l1_box_projection_is_the_euclidean_projection():
    """Its KKT conditions: one threshold lam for all coordinates, each clipped to its box room,
    the ball met exactly when the box-clipped point lies outside it; and it is idempotent."""
    from lit_vce.methods.svce import project_l1_box

    torch.manual_seed(0)
    x, delta = torch.rand(3, 3, 5, 5), torch.randn(3, 3, 5, 5)
    for eps in (0.5, 5.0, 1e3):
        d = project_l1_box(x, delta, eps)
        assert ((x + d) >= -1e-6).all() and ((x + d) <= 1 + 1e-6).all()
        assert (d.flatten(1).abs().sum(1) <= eps * (1 + 1e-6)).all()
        room = torch.where(delta > 0, 1 - x, x)
        clipped = torch.minimum(delta.abs(), room) * delta.sign()
        for i in range(3):
            if clipped[i].abs().sum() <= eps:  # the box alone
                torch.testing.assert_close(d[i], clipped[i])
                continue
            assert abs(float(d[i].abs().sum()) - eps) < 1e-4 * eps
            free = (d[i].abs() > 1e-7) & (d[i].abs() < room[i] - 1e-7)
            lam = (delta[i].abs() - d[i].abs())[free]
            assert float(lam.max() - lam.min()) < 1e-4  # one threshold
        torch.testing.assert_close(project_l1_box(x, d, eps), d, rtol=1e-5, atol=1e-6)


def test_ace_changes_nothing_outside_its_mask_and_its_mask_is_the_official_recipe(
    tiny_diffusion, tiny_classifier, tiny_batch
):
    from lit_vce.methods.ace import ACE, change_mask

    x = torch.zeros(1, 3, 9, 9)
    edited = x.clone()
    edited[0, :, 4, 4] = 0.5  # one changed pixel: normalised to 1, dilated over 3x3
    m = change_mask(x, edited, 3)
    assert m[0, 0, 3:6, 3:6].eq(1).all() and m.sum() == 9
    # 4 sign steps: each pixel moved by 0, 2 or 4 steps, so the normalised change is 0, 0.5 or 1
    ace = ACE(diffusion=tiny_diffusion("adm", 10), attack_steps=4, dilation=1, step_size=8 / 255, threshold=0.6)
    out = ace.generate(tiny_batch, tiny_classifier)
    pre = ace.attack(
        VCEBatch(
            tiny_batch.images,
            tiny_batch.source,
            tiny_batch.target,
            tiny_batch.sample_ids,
            sample_rngs(0, tiny_batch.sample_ids),
        ),
        tiny_classifier,
    )
    keep = (change_mask(tiny_batch.images, pre, 1) < 0.6).expand_as(pre)
    assert 0 < keep.float().mean() < 1  # the mask is neither empty nor everything
    assert torch.equal(out.images[keep], tiny_batch.images[keep])  # bit-exact outside the mask
    assert not torch.equal(out.images[~keep], tiny_batch.images[~keep])
    torch.testing.assert_close(out.diagnostics["mask_fraction"], (~keep[:, :1]).float().flatten(1).mean(1))
    with pytest.raises(ValueError, match="sampler='adm'"):
        ACE(diffusion=tiny_diffusion("ddim", 10))


def test_dime_clean_estimate_is_an_unguided_denoise_and_its_cost_is_quadratic(
    tiny_diffusion, tiny_classifier, tiny_batch
):
    from lit_vce.methods.dime import DiME

    d = tiny_diffusion("adm", 10)
    m = DiME(diffusion=d)
    z = torch.randn(4, 3, 16, 16)
    rngs = [copy.deepcopy(g) for g in tiny_batch.rngs]
    ours = m.clean_estimate(z, 5, tiny_batch)
    # the same, written out: the unguided ancestral sampler from respaced step 5 to 0
    x = z
    for t in range(5, -1, -1):
        with torch.no_grad():
            out = d.p_mean_variance(d.model_output(x, t, d.null_condition(4)), x, t)
        x = (
            out["mean"]
            if t == 0
            else out["mean"]
            + torch.exp(0.5 * out["log_variance"]) * torch.stack([torch.randn(3, 16, 16, generator=g) for g in rngs])
        )
    torch.testing.assert_close(ours, d.decode(x), rtol=0, atol=1e-6)
    res = DiME(diffusion=d, skip=0.5, scales=(8.0,)).generate(tiny_batch, tiny_classifier)
    # tau = 5 guided steps; after step k the nested denoise runs from respaced step 4 - k: 4 + 3 + 2 + 1 calls
    assert res.diagnostics["nested_unet_calls"].tolist() == [10.0] * 4
    capped = DiME(diffusion=d, skip=0.5, scales=(8.0,), max_inner_steps=2).generate(tiny_batch, tiny_classifier)
    assert capped.diagnostics["nested_unet_calls"].tolist() == [2 + 2 + 2 + 1.0] * 4


def test_ldce_zeroes_the_classifier_score_where_it_disagrees_with_the_implicit_classifier():
    from lit_vce.methods.ldce import consensus_filter

    implicit = torch.zeros(1, 2, 1, 3)
    implicit[0, 0] = 1.0  # the implicit classifier points along channel 0 everywhere
    score = torch.zeros(1, 2, 1, 3)
    score[0, :, 0, 0] = torch.tensor([1.0, 0.5])  # 26.6 deg away: kept
    score[0, :, 0, 1] = torch.tensor([1.0, 2.0])  # 63.4 deg: zeroed
    score[0, :, 0, 2] = torch.tensor([-1.0, 0.0])  # 180 deg: zeroed
    out, kept = consensus_filter(implicit, score, 45.0)
    assert kept.flatten().tolist() == [1.0, 0.0, 0.0]
    assert torch.equal(out[..., 0], score[..., 0]) and out[..., 1:].eq(0).all()
    assert consensus_filter(implicit, score, 70.0)[1].flatten().tolist() == [1.0, 1.0, 0.0]


def test_ldce_runs_on_a_text_model_with_the_target_in_the_prompt(tiny_sd):
    from lit_vce.diffusion import LatentDiffusion
    from lit_vce.methods.ldce import LDCE

    folder, clf = tiny_sd
    d = LatentDiffusion(str(folder), num_steps=6)
    m = LDCE(diffusion=d, strength=0.5, prompt="a photograph of the {}")
    ids = ["a", "b"]
    batch = VCEBatch(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), torch.tensor([1, 2]), ids, sample_rngs(0, ids))
    seen = []
    orig = d.condition
    d.condition = lambda prompts: (seen.extend(prompts), orig(prompts))[1]
    out = m.generate(batch, clf)
    assert "a photograph of the square" in seen and "a photograph of the triangle" in seen
    assert out.images.shape == batch.images.shape and torch.isfinite(out.images).all()
    assert (out.diagnostics["consensus_fraction"] >= 0).all() and (out.diagnostics["consensus_fraction"] <= 1).all()


def _perceptual_guidance(method_cls, state_key, tmp_path, tiny_diffusion, tiny_classifier, tiny_batch):
    """Random VGG-19 weights of the layers used, saved where the loader looks; the guidance of
    ``method_cls`` with the perceptual term (30 at layer 4) minus without it, at a step whose clean
    image (``state_key``) is the flipped batch, and the perceptual term's own gradient there."""
    import torchvision

    from lit_vce.methods.guided import Step
    from lit_vce.objectives import ObjectiveContext

    torch.manual_seed(0)
    feats = torchvision.models.vgg19().features[:4]
    (tmp_path / "vgg").mkdir()
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, tmp_path / "vgg" / "vgg19-dcbbe73f.pth")
    d = tiny_diffusion("adm", 10)
    with_perc = method_cls(diffusion=d, perceptual_weight=30.0, perceptual_layer=4)
    plain = method_cls(diffusion=d)
    assert plain.perceptual is None and torch.equal(with_perc.perceptual.features[0].weight, feats[0].weight)
    step = Step(0, 5, 4, torch.randn(4, 3, 16, 16), None, d.alpha_bar(5), 5, {state_key: tiny_batch.images.flip(-1)})
    g_p = with_perc.guidance(None, tiny_batch, tiny_classifier, None, None, step)
    g_0 = plain.guidance(None, tiny_batch, tiny_classifier, None, None, step)
    x = tiny_batch.images.flip(-1).requires_grad_(True)
    ctx = ObjectiveContext(tiny_batch.images, tiny_batch.source, tiny_batch.target, tiny_classifier)
    (g,) = torch.autograd.grad(with_perc.perceptual(x, ctx).sum(), x)
    return g_p - g_0, g, d.alpha_bar(5)


def test_dime_perceptual_term_loads_vgg_offline_and_enters_the_guidance(
    tmp_path, monkeypatch, tiny_diffusion, tiny_classifier, tiny_batch
):
    from lit_vce.errors import MissingWeightsError
    from lit_vce.methods.dime import DiME

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=r"vgg/vgg19-dcbbe73f\.pth"):
        DiME(diffusion=tiny_diffusion("adm", 10), perceptual_weight=30.0)
    diff, g, abar = _perceptual_guidance(DiME, "clean", tmp_path, tiny_diffusion, tiny_classifier, tiny_batch)
    torch.testing.assert_close(diff, -0.5 * 30.0 * g / abar.sqrt(), rtol=1e-4, atol=1e-6)


def test_ldce_starts_from_a_posterior_sample_noised_one_ddim_step_above_as_its_code(tiny_sd):
    """LDCE's scripts: get_first_stage_encoding(encode_first_stage(x)) samples the VAE posterior;
    stochastic_encode to DDIM index t_enc, decode from t_enc - 1."""
    from lit_vce.diffusion import LatentDiffusion
    from lit_vce.methods.ldce import LDCE

    folder, clf = tiny_sd
    d = LatentDiffusion(str(folder), num_steps=6)
    ids = ["a", "b"]
    batch = VCEBatch(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]), torch.tensor([1, 2]), ids, sample_rngs(0, ids))
    m = LDCE(diffusion=d, strength=0.5)
    z_mean = d.encode(batch.images)
    z = m.encode_start(VCEBatch(batch.images, batch.source, batch.target, ids, sample_rngs(0, ids)))
    dist = d.vae.encode(batch.images * 2 - 1).latent_dist
    g = sample_rngs(0, ids)
    from lit_vce.rngs import per_sample_randn

    expected = (dist.mean + dist.std * per_sample_randn(dist.mean.shape[1:], g)) * d.scaling
    assert torch.allclose(z, expected, atol=1e-6) and not torch.allclose(z, z_mean, atol=1e-4)
    again = m.encode_start(VCEBatch(batch.images, batch.source, batch.target, ids, sample_rngs(0, ids)))
    assert torch.equal(z, again)  # from the samples' generators
    assert torch.equal(LDCE(diffusion=d, strength=0.5, posterior="mean").encode_start(batch), z_mean)
    seen = {}
    real = d.add_noise
    d.add_noise = lambda z0, n, t: (seen.setdefault("t", int(t)), real(z0, n, t))[1]
    m.generate(batch, clf)
    assert seen["t"] == int(d.timesteps[m.start_index() - 1]) and m.noise_offset == 1
    with pytest.raises(ValueError, match="posterior must be"):
        LDCE(diffusion=d, posterior="mode")


def test_fastdime_perceptual_term_enters_the_guidance_unscaled_as_its_code(
    tmp_path, monkeypatch, tiny_diffusion, tiny_classifier, tiny_batch
):
    """run_fastdime.sh's l_perc: dist_cond_fn adds grad(l_perc)(x_t) with scale_grads off (no 1 / sqrt(abar_t))."""
    from lit_vce.methods.fastdime import FastDiME

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path))
    diff, g, _ = _perceptual_guidance(FastDiME, "x0", tmp_path, tiny_diffusion, tiny_classifier, tiny_batch)
    torch.testing.assert_close(diff, -0.5 * 30.0 * g, rtol=1e-4, atol=1e-6)
