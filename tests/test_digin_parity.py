"""DiG-IN held to the official code (M4xim4l/DiG-IN): masks, null-text schedule, blending,
cutouts, regularisers, step schedules. Each test pins one published convention on a
hand-built case or against the official recipe written out."""

import math

import pytest
import torch
import torch.nn.functional as F

from lit_vce.diffusion import PixelDiffusion
from lit_vce.diffusion.masks import (
    SamRefiner,
    attention_foreground,
    latent_mask_from_pixels,
    postprocess_mask,
)
from lit_vce.methods import DiGIN, VCEBatch
from lit_vce.methods.digin import cutout_views, fraction_steps
from lit_vce.objectives import BackgroundL2, L2Distance, ObjectiveContext
from lit_vce.rngs import sample_rngs


def _world(n=2):
    from lit_vce.data.world import ShapesWorld

    d = ShapesWorld("balanced", "test", n)
    items = [d[i] for i in range(n)]
    ids = [it["sample_id"] for it in items]
    y = torch.tensor([it["label"] for it in items])
    return VCEBatch(
        torch.stack([it["image"] for it in items]),
        y,
        (y + 1) % 4,
        ids,
        sample_rngs(0, ids),
        torch.stack([it["mask"] for it in items]),
    )


def test_schedule_fractions_are_the_official_threshold_schedules():
    # threshold_0.0_f: steps i with i / T < f (0.3 of 20 = steps 0-5, whatever the float rounding of 0.3 * 20)
    assert [fraction_steps(f, 20) for f in (0.0, 0.3, 0.4, 0.5, 1.0)] == [0, 6, 8, 10, 20]
    assert fraction_steps(0.3, 10) == 3 and fraction_steps(0.34, 6) == 3


def test_null_text_schedule_matches_the_official_loop():
    """lr 1e-2 * (1 - i / 100), at most 10 inner steps, stop once the pre-update loss is
    below 1e-5 + i * 2e-5, checked after the update; per sample as the official batch of one."""
    bb = PixelDiffusion("world", num_steps=5, guidance_scale=3.0)
    b = _world(2)
    z0 = bb.encode(b.images)
    cond = bb.condition(b.source)
    ours = bb.null_text_inversion(z0, cond, inner_steps=10)
    target = bb.invert(z0, cond)
    for k in range(2):  # the official loop, one image at a time
        u = bb.null_condition(1).detach()
        z, t_k = target[0][k : k + 1], [t[k : k + 1] for t in target]
        inner_used = []
        for i in range(bb.num_steps):
            u = u.clone().detach().requires_grad_(True)
            opt = torch.optim.Adam([u], lr=1e-2 * (1.0 - i / 100.0))
            with torch.no_grad():
                e_c = bb.eps(z, bb.timesteps[i], cond[k : k + 1])
            for j in range(10):
                e_u = bb.eps(z, bb.timesteps[i], u)
                pred, _ = bb.step(e_u + bb.guidance_scale * (e_c - e_u), bb.timesteps[i], z)
                loss = F.mse_loss(pred, t_k[i + 1])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if loss.item() < 1e-5 + i * 2e-5:
                    break
            inner_used.append(j + 1)
            torch.testing.assert_close(
                ours.uncond[i][k : k + 1], u.detach(), rtol=1e-3, atol=1e-4
            )  # batched vs single: float rounding
            with torch.no_grad():
                z, _ = bb.step(bb.eps(z, bb.timesteps[i], cond[k : k + 1], u.detach()), bb.timesteps[i], z)
        assert max(inner_used) > 1  # the schedule was exercised (not a trivial first-step stop)


def test_attention_masks_follow_the_official_recipe():
    maps = torch.full((2, 6, 4, 4), 0.01)
    maps[0, 3, 0:2, 0:2] = 1.0  # sample 0: the word (token 3) attends to the top-left
    maps[0, 3, 3, 3] = 0.65  # one pixel at 0.65 of the maximum
    maps[0, 4, 2:, 2:] = 5.0  # another token must not count
    maps[1, 2] = 0.5  # sample 1: tokens 2 and 4, their mean counts
    maps[1, 4, 1, 1] = 1.5
    m = attention_foreground(maps, [[3], [2, 4]], size=4, cutoff=0.3)  # same size: bicubic is the identity
    assert m.shape == (2, 1, 4, 4)
    assert torch.allclose(m[0, 0, :2, :2], torch.ones(2, 2)) and m[0, 0, 2, 0] == 0
    assert m[0, 0, 3, 3] == pytest.approx(math.sqrt((0.65 - 0.3) / 0.7), abs=1e-5)  # soft: sqrt_0.3 squash
    # sample 1: mean of tokens 2 and 4 -> 0.25 everywhere, 1.0 at (1, 1); normalised: 0.25 is below the cut-off
    assert m[1, 0, 1, 1] == pytest.approx(1.0) and m[1, 0, 0, 0] == 0
    assert attention_foreground(maps, [[], [2]], size=4)[0].eq(1).all()  # no tokens: everything foreground
    up = attention_foreground(maps, [[3], [2, 4]], size=16)
    assert up.shape == (2, 1, 16, 16) and 0 <= up.min() and up.max() <= 1


def test_mask_postprocessing_sizes_scale_with_resolution():
    mask = torch.zeros(1, 1, 512, 512)
    mask[..., 200:300, 200:300] = 1
    mask[..., 10, 10] = 1  # a speck: erosion (3) removes it
    out = postprocess_mask(mask)
    assert out[0, 0, 10, 10] < 1e-3
    # dilation 20 grows the square by 10 / 9 pixels per side, the 45 px blur softens the edge
    assert (
        out[0, 0, 250, 250] == pytest.approx(1.0, abs=1e-3)
        and out[0, 0, 250, 185] > 0.01
        and out[0, 0, 250, 150] < 1e-3
    )
    edge = out[0, 0, 250, 170:200]
    assert ((edge > 0.05) & (edge < 0.95)).sum() > 10  # soft
    small = postprocess_mask(F.interpolate(mask, size=(64, 64), mode="area"))  # sizes / 8: 0, 2, 5 (odd), sigma 3.75
    assert small.shape == (1, 1, 64, 64) and small[0, 0, 31, 31] > 0.99 and small[0, 0, 31, 20] < 0.1
    lat = latent_mask_from_pixels(out, 64)
    assert lat.shape == (1, 1, 64, 64) and lat[0, 0, 31, 31] > 0.99


def test_sam_refinement_with_a_tiny_local_model(tiny_sam, tmp_path):
    from lit_vce.classifiers import MissingWeightsError

    sam = SamRefiner(str(tiny_sam))
    soft = torch.zeros(2, 1, 48, 48)
    soft[0, 0, 10:20, 30:40] = torch.linspace(0.4, 1.0, 10)[None]
    gens = sample_rngs(0, ["a", "b"])
    pts = sam.points(soft[0], gens[0])
    assert pts.shape == (5, 2) and (pts[:, 0] >= 30).all() and (pts[:, 0] < 40).all() and (pts[:, 1] >= 10).all()
    refined = sam(torch.rand(2, 3, 48, 48), soft, sample_rngs(0, ["a", "b"]))
    assert refined.shape == soft.shape and set(refined[0].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(refined[1], soft[1])  # nothing above the threshold: the attention mask stays
    with pytest.raises(MissingWeightsError, match="sam_model=None"):
        SamRefiner(str(tmp_path / "absent"))


def test_digin_on_stable_diffusion_with_attention_masks_and_sam(tiny_sd, tiny_sam):
    from lit_vce.diffusion import LatentDiffusion

    folder, clf = tiny_sd
    bb = LatentDiffusion(str(folder), num_steps=4)
    b = _world(2)
    b.mask = None
    kw = dict(
        num_steps=4, outer_steps=0, null_text_steps=1, num_cutouts=2, injection_fractions=(0.5,), blend_fractions=(0.5,)
    )
    plain = DiGIN(bb, **kw).generate(b, clf)
    frac = plain.diagnostics["mask_fraction"]
    assert ((frac > 0) & (frac < 1)).all(), frac
    refined = DiGIN(bb, sam_model=str(tiny_sam), **kw).generate(b, clf)
    assert torch.isfinite(refined.images).all() and "mask_fraction" in refined.diagnostics
    assert not torch.equal(refined.diagnostics["mask_fraction"], frac)  # SAM changed the masks


def test_blending_replaces_the_inputs_of_the_first_steps_by_the_reconstruction():
    """With an all-background mask and k blended steps, the input of step k-1 is the
    reconstruction's: from there on the trajectory is the reconstruction, whatever z_T."""
    m = DiGIN("world", num_steps=4, outer_steps=0, null_text_steps=2, num_cutouts=1)
    b = _world(2)
    cond = m.conditions(b.source, None)
    _, inv = m.invert(b.images, cond)
    templates, _ = m.reconstruct(inv, cond)
    assert torch.equal(templates[0], inv.latents[0]) and len(templates) == 4
    with torch.no_grad():
        rec = m.run_trajectory(inv.latents[0], cond, cond, inv.uncond)[-1]
        z_other = torch.randn_like(inv.latents[0])
        zero = torch.zeros(2, 1, 32, 32)
        for k in (1, 3):
            out = m.run_trajectory(
                z_other, cond, cond, inv.uncond, blend_steps=torch.full((2,), k), templates=templates, latent_mask=zero
            )[-1]
            torch.testing.assert_close(out, rec, rtol=0, atol=1e-5)
        free = m.run_trajectory(
            z_other,
            cond,
            cond,
            inv.uncond,
            blend_steps=torch.zeros(2, dtype=torch.long),
            templates=templates,
            latent_mask=zero,
        )[-1]
    assert (free - rec).abs().max() > 0.1


def test_published_cutouts():
    torch.manual_seed(0)
    h = w = 64
    ramp = torch.linspace(0, 1, w)
    img = torch.stack([ramp[None].expand(h, w), ramp[:, None].expand(h, w), torch.zeros(h, w)])[None].repeat(2, 1, 1, 1)
    gens = sample_rngs(0, ["a", "b"])
    views = cutout_views(img, gens, 200, noise_sd=0.0, cut_size=16, power=0.3)
    assert views.shape == (400, 3, 16, 16)
    again = cutout_views(img[1:], sample_rngs(0, ["b"]), 200, noise_sd=0.0, cut_size=16, power=0.3)
    torch.testing.assert_close(views[200:], again)  # a sample's views depend on its own generator only
    # every view is the published crop of its draws: side int(U^0.3 * (64 - 16) + 16) at a uniform
    # position, average-pooled to 16 (the official MakeCutouts with cut_pow 0.3)
    from lit_vce.rngs import per_sample_rand

    u = per_sample_rand((200, 3), sample_rngs(0, ["a", "b"]))
    sides = []
    for i in range(2):
        for k in range(200):
            side = int(float(u[i, k, 0]) ** 0.3 * (64 - 16) + 16)
            top, left = int(float(u[i, k, 1]) * (h - side + 1)), int(float(u[i, k, 2]) * (w - side + 1))
            crop = F.adaptive_avg_pool2d(img[i : i + 1, :, top : top + side, left : left + side], 16)[0]
            assert torch.equal(views[i * 200 + k], crop), (i, k)
            sides.append(side)
    assert min(sides) >= 16 and max(sides) <= 64 and len(set(sides)) > 20
    other = cutout_views(img, sample_rngs(0, ["a", "b"]), 200, noise_sd=0.0, cut_size=16, power=0.35)
    assert not torch.equal(other, views)  # the power is the one used
    assert not torch.allclose(views[0], F.adaptive_avg_pool2d(img[:1], 16)[0])  # no forced full view
    noisy = cutout_views(torch.full((1, 3, 32, 32), 0.5), gens[:1], 64, noise_sd=0.005, cut_size=32)
    assert noisy.std().item() == pytest.approx(0.005, rel=0.05)  # noise after pooling, at the classifier's size


def test_l2_regularisers_are_mean_squared_errors_with_soft_masks():
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    mask = torch.rand(2, 1, 8, 8)  # soft
    ctx = ObjectiveContext(
        y,
        torch.zeros(2, dtype=torch.long),
        torch.ones(2, dtype=torch.long),
        mask=mask,
        latents=x[:, :2],
        original_latents=y[:, :2],
        latent_mask=mask,
    )
    torch.testing.assert_close(L2Distance().loss(x, ctx), F.mse_loss(x, y, reduction="none").flatten(1).mean(1))
    torch.testing.assert_close(
        L2Distance("latent").loss(x, ctx), F.mse_loss(x[:, :2], y[:, :2], reduction="none").flatten(1).mean(1)
    )
    # the official px_background_l2: mean((1 - m) * (x - y)^2), the mask applied once
    torch.testing.assert_close(BackgroundL2("pixel").loss(x, ctx), ((1 - mask) * (x - y) ** 2).flatten(1).mean(1))


def _tiny_sam_hq(seed: int = 0):
    """A random SAM-HQ of the official code's classes (ViT encoder 32 wide, 2 blocks, the second global)."""
    from lit_vce.diffusion.masks import _import_sam_hq

    _import_sam_hq()
    from segment_anything_hq.build_sam import _build_sam

    torch.manual_seed(seed)
    model = _build_sam(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
    for p in model.parameters():  # random init leaves the HQ token's output layers at zero in places
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _blob_batch():
    torch.manual_seed(1)
    images = torch.rand(1, 3, 40, 48)
    soft = torch.zeros(1, 1, 40, 48)
    soft[0, 0, 8:30, 10:36] = torch.linspace(0.36, 1.0, 26)[None]
    return images, soft


def test_a_sam_hq_checkpoint_runs_as_dig_ins_predictor_call(tmp_path):
    """A ``.pth`` checkpoint is refined with SAM-HQ's own predictor exactly as DiG-IN's
    ``sam_segmentation`` calls it (8-bit truncated RGB, the drawn points, one mask, HQ token only);
    the architecture is read from the weights; importing SAM-HQ leaves timm's registry alone."""
    import numpy as np
    import timm

    from lit_vce.classifiers import MissingWeightsError

    entry = timm.models._registry._model_entrypoints["tiny_vit_5m_224"]
    ref = _tiny_sam_hq()
    from segment_anything_hq import SamPredictor

    torch.save(ref.state_dict(), tmp_path / "sam_hq_tiny.pth")
    sam = SamRefiner(str(tmp_path / "sam_hq_tiny.pth"))
    assert sam.backend == "sam_hq" and timm.models._registry._model_entrypoints["tiny_vit_5m_224"] is entry
    images, soft = _blob_batch()
    out = sam(images, soft, sample_rngs(0, ["a"]))
    pts = sam.points(soft[0], sample_rngs(0, ["a"])[0])
    predictor = SamPredictor(ref)
    predictor.set_image(((255 * images[0]).permute(1, 2, 0).numpy()).astype(np.uint8))
    masks = {
        hq: predictor.predict(
            point_coords=pts.numpy(), point_labels=np.ones(len(pts)), box=None, multimask_output=False, hq_token_only=hq
        )[0]
        for hq in (True, False)
    }
    assert not np.array_equal(masks[True], masks[False])  # the flag matters for this model
    assert out.shape == (1, 1, 40, 48) and np.array_equal(out[0].numpy(), masks[True].astype(np.float32))
    assert 0 < out.mean() < 1
    torch.save({"some": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(MissingWeightsError, match="not a SAM-HQ checkpoint"):
        SamRefiner(str(tmp_path / "other.pth"))
    with pytest.raises(MissingWeightsError, match="sam_hq_vit_h.pth"):
        SamRefiner(str(tmp_path / "absent.pth"))


def test_a_transformers_sam_hq_folder_predicts_with_the_hq_token_only(tmp_path):
    from transformers import SamHQConfig, SamHQModel
    from transformers.models.sam_hq.configuration_sam_hq import (
        SamHQMaskDecoderConfig,
        SamHQPromptEncoderConfig,
        SamHQVisionConfig,
    )

    torch.manual_seed(0)
    cfg = SamHQConfig(
        vision_config=SamHQVisionConfig(
            hidden_size=16,
            output_channels=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=8,
            mlp_dim=32,
        ),
        prompt_encoder_config=SamHQPromptEncoderConfig(
            hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4
        ),
        mask_decoder_config=SamHQMaskDecoderConfig(
            hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=16, vit_dim=16
        ),
    )
    model = SamHQModel(cfg).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "samhq")
    sam = SamRefiner(str(tmp_path / "samhq"))
    assert type(sam.model).__name__ == "SamHQModel" and sam.backend == "transformers"
    images, soft = _blob_batch()
    out = sam(images, soft, sample_rngs(0, ["a"]))
    pts = sam.points(soft[0], sample_rngs(0, ["a"])[0])
    x = F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    x = (x - sam.mean) / sam.std
    p = (pts * torch.tensor([64 / 48, 64 / 40]))[None, None]
    lab = torch.ones(1, 1, len(pts), dtype=torch.long)
    by_flag = {}
    with torch.no_grad():
        for hq in (True, False):
            logits = sam.model(
                pixel_values=x, input_points=p, input_labels=lab, multimask_output=False, hq_token_only=hq
            ).pred_masks[:, 0, :1]
            by_flag[hq] = (F.interpolate(logits, size=(40, 48), mode="bilinear", align_corners=False)[0] > 0).float()
    assert not torch.equal(by_flag[True], by_flag[False])
    assert torch.equal(out[0], by_flag[True])
