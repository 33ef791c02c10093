"""RCSB and its I2SB bridge: the official sampler's output, the bridge's equations, the region."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lit_vce.diffusion.bridge import (
    BridgeSchedule,
    I2SBBridge,
    bridge_betas,
    load_i2sb_checkpoint,
    space_indices,
    world_bridge_network,
)
from lit_vce.methods.rcsb import RCSB, AdamStabilizer, _tiny_unet, minmax01
from lit_vce.testing import tiny_classifier

FIXTURE = "tests/fixtures/rcsb_official.safetensors"


def _official():
    f = load_file(FIXTURE)
    unet = _tiny_unet()
    unet.load_state_dict({k[4:]: v for k, v in f.items() if k.startswith("net.")})
    clf = tiny_classifier(3)
    clf.load_state_dict({k[11:]: v for k, v in f.items() if k.startswith("classifier.")})
    return f, unet, clf.eval()


@pytest.mark.parametrize("official_kernels", [True, False])
def test_rcsb_reproduces_the_official_sampler(official_kernels):
    """scripts/make_rcsb_fixture.py ran RCSB's own CDDB.inpaint (deep, OT-ODE, Adam, adaptive
    normalisation) on these tiny models. With the code's autograd setting (trainable bridge
    weights) the images are the same here to the last bit; frozen weights change float rounding,
    which the first Adam step (about g / |g|) magnifies where the gradient is near zero."""
    f, unet, clf = _official()
    m = RCSB(I2SBBridge(world_bridge_network(unet), image_size=16), start_step=100, nfe=8)
    if official_kernels:
        m.bridge.net.requires_grad_(True)
    out, failure = m.inpaint(f["images"], f["region"], f["target"], clf, f["noise"])
    assert failure == [None, None, None]
    err = (out - f["official_output"]).abs().max().item()
    assert err <= 1e-4, err
    moved = (f["official_output"] - f["images"]).abs().amax((1, 2, 3))
    assert (moved > 0.05).all()  # the fixture is not a trivial copy of its input
    # without the gradient's graph (create_graph=False) the values move by rounding only
    m.create_graph = False
    out2, _ = m.inpaint(f["images"], f["region"], f["target"], clf, f["noise"])
    assert (out2 - f["official_output"]).abs().max().item() <= 1e-4


def test_the_bridge_follows_i2sb_equations():
    s = BridgeSchedule()
    betas = bridge_betas()
    assert len(betas) == 1000 and np.allclose(betas[:500], betas[::-1][:500])  # mirrored
    lo, hi = 1e-4**0.5, (1.0 / 1000) ** 0.5  # sqrt-linear from 1e-4 to beta_max / interval, first half kept
    assert betas[0] == pytest.approx(1e-4) and betas[499] == pytest.approx((lo + 499 / 999 * (hi - lo)) ** 2)
    torch.testing.assert_close(s.mu_x0 + s.mu_x1, torch.ones_like(s.mu_x0), rtol=0, atol=1e-12)
    torch.testing.assert_close(s.std_fwd**2, torch.from_numpy(np.cumsum(betas)))
    # Eq. 11: std_sb^2 = std_fwd^2 std_bwd^2 / (std_fwd^2 + std_bwd^2); endpoints pin x0 and x1
    torch.testing.assert_close(s.std_sb**2, s.std_fwd**2 * s.std_bwd**2 / (s.std_fwd**2 + s.std_bwd**2))
    assert s.mu_x0[0] > 0.999 and s.mu_x1[-1] > 0.999
    # Eq. 4: the posterior of x_{n'} between x0 and x_n, by hand at n = 300, n' = 200
    c0, cn, var = s.posterior(200, 300)
    a2, d2 = s.std_fwd[200] ** 2, s.std_fwd[300] ** 2 - s.std_fwd[200] ** 2
    assert float(c0) == pytest.approx(float(d2 / (a2 + d2))) and float(cn) == pytest.approx(float(a2 / (a2 + d2)))
    assert float(var) == pytest.approx(float(a2 * d2 / (a2 + d2)))
    with pytest.raises(ValueError, match="earlier step must be smaller"):
        s.posterior(300, 200)
    assert space_indices(600, 101)[:3] == [0, 6, 12] and space_indices(600, 101)[-1] == 599
    assert space_indices(100, 9) == [0, 12, 25, 37, 50, 62, 74, 87, 99]
    assert s.noise_levels[0] == pytest.approx(0.1) and s.noise_levels[-1] == pytest.approx(1000.0)


def test_rcsb_helpers_follow_the_code():
    x = torch.tensor([[[[-0.5, 0.5]]], [[[0.2, 0.6]]]])
    out = minmax01(x)
    torch.testing.assert_close(out[0], torch.tensor([[[0.0, 1.0]]]))  # negative values: min-max scaled
    torch.testing.assert_close(out[1], x[1])  # none: left as it is
    adam, g = AdamStabilizer(), torch.tensor([3.0, -2.0, 1e-9])
    torch.testing.assert_close(adam(g), g / (g.abs() + 1e-8))  # the first step: bias-corrected g / |g|
    g2 = torch.tensor([1.0, 1.0, 1.0])
    m, v = 0.9 * 0.1 * g + 0.1 * g2, 0.999 * 0.001 * g**2 + 0.001 * g2**2
    torch.testing.assert_close(adam(g2), (m / (1 - 0.81)) / ((v / (1 - 0.999**2)).sqrt() + 1e-8))


def test_nothing_outside_the_region_changes_and_guidance_raises_the_target(tiny_classifier, tiny_batch):
    import dataclasses

    m = RCSB(**{**RCSB.test_kwargs(), "nfe": 6})
    region = torch.zeros(len(tiny_batch), 1, 16, 16)
    region[..., 4:12, 2:14] = 1
    batch = dataclasses.replace(tiny_batch, region=region)
    out = m.generate(batch, tiny_classifier)
    assert torch.equal(out.images * (1 - region), tiny_batch.images * (1 - region))
    assert (out.images - tiny_batch.images).abs().amax((1, 2, 3)).min() > 0.05
    assert torch.equal(out.diagnostics["region_change_outside"], torch.zeros(len(tiny_batch)))
    assert out.diagnostics["region_area"].tolist() == pytest.approx([0.375] * len(tiny_batch))
    none = RCSB(**{**RCSB.test_kwargs(), "nfe": 6, "scale": 0.0}).generate(batch, tiny_classifier)
    gain = out.diagnostics["target_confidence"] - none.diagnostics["target_confidence"]
    assert (gain > 0).all(), gain


def test_rcsb_rules_for_its_own_region(tiny_classifier, tiny_batch):
    m = RCSB(**{**RCSB.test_kwargs(), "nfe": 2, "area": 0.25})
    cells = m.regions(tiny_batch, tiny_classifier)
    assert cells.shape == (4, 1, 16, 16) and set(cells.unique().tolist()) <= {0.0, 1.0}
    assert (cells.flatten(1).mean(1) <= 0.25).all() and (cells.flatten(1).mean(1) > 0).all()
    with pytest.raises(ValueError, match="foreground masks"):
        RCSB(**{**RCSB.test_kwargs(), "region": "objects"}).regions(tiny_batch, tiny_classifier)
    with pytest.raises(ValueError, match="nfe must be"):
        RCSB(**{**RCSB.test_kwargs(), "nfe": 100})


def test_i2sb_checkpoints_load_through_the_adm_module(tmp_path):
    from lit_vce.diffusion.adm import ADMConfig, ADMUNet

    cfg = dict(image_size=32, num_channels=32, num_res_blocks=1, num_head_channels=16, channel_mult="1,2")
    cfg["attention_resolutions"] = "16"
    torch.manual_seed(0)
    adm = ADMUNet(ADMConfig.preset("imagenet256_uncond", learn_sigma=False, **cfg))
    state = {f"diffusion_model.{k}": v for k, v in adm.state_dict().items()}
    state["noise_levels"] = torch.linspace(1e-4, 1, 1000) * 1000
    torch.save({"net": state, "ema": {}}, tmp_path / "latest.pt")
    net = load_i2sb_checkpoint(tmp_path / "latest.pt", "imagenet256_uncond", **cfg)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500.0])
    torch.testing.assert_close(net(x, t), adm(x, t))
    assert net(x, t).shape == (1, 3, 32, 32)  # no learned sigma: 3 channels, as I2SB's Image256Net
    with pytest.raises(Exception, match="does not exist"):
        load_i2sb_checkpoint(tmp_path / "missing.pt")
    torch.save({"net": {"x": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an I2SB"):
        load_i2sb_checkpoint(tmp_path / "other.pt")


def test_the_world_bridge_trains_as_i2sb_on_the_regions_rcsb_uses():
    from lit_vce.data.world import ShapesWorld
    from lit_vce.diffusion.bridge_training import WorldBridgeModule, bridge_training_masks

    data = ShapesWorld("balanced", "train", size=6, seed=0)
    objects = torch.stack([data[i]["mask"] for i in range(6)])
    masks = bridge_training_masks(objects, torch.Generator().manual_seed(0))
    assert (masks[0] >= objects[0]).all() and masks[0].sum() > objects[0].sum()  # the dilated object
    assert 0.1 <= float(masks[1].mean()) <= 0.5 and 0.1 <= float(masks[4].mean()) <= 0.5  # 4 px cells
    assert masks[2].sum() >= 36 and masks[2].sum() <= 400  # a box
    module = WorldBridgeModule(max_steps=10)
    batch = {"image": torch.stack([data[i]["image"] for i in range(6)]), "mask": objects}
    module.log = lambda *a, **k: None
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.parameters())
