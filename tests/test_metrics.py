import numpy as np
import pytest
import torch
from scipy import linalg

from lit_vce.metrics import FeatureFID, FlipRate, LpDistance, TargetConfidence


class _Flat(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :6]


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_matches_a_float64_scipy_reference():
    torch.manual_seed(0)
    real, fake = torch.rand(50, 3, 4, 4), torch.rand(40, 3, 4, 4) * 0.8 + 0.1
    m = FeatureFID(_Flat(), 6)
    m.update(real[:20], real=True)
    m.update(real[20:], real=True)
    m.update(fake, real=False)
    ref = _reference_fid(real.flatten(1)[:, :6].double().numpy(), fake.flatten(1)[:, :6].double().numpy())
    assert float(m.compute()) == pytest.approx(ref, rel=1e-4)


def test_fid_on_a_handful_of_images_warns_and_reports_n():
    m = FeatureFID(_Flat(), 6)
    m.update(torch.rand(4, 3, 4, 4), real=True)
    m.update(torch.rand(4, 3, 4, 4), real=False)
    with pytest.warns(UserWarning, match="rank-deficient"):
        v = m.compute()
    assert torch.isfinite(v) and m.n_used == 4


def test_lp_distances_are_hand_computable():
    x = torch.zeros(2, 3, 2, 2)
    y = x.clone()
    y[0, 0, 0, 0] = 0.5
    y[1] = 0.25  # 12 values of 0.25
    l1, l2 = LpDistance(1), LpDistance(2)
    l1.update(x, y)
    l2.update(x, y)
    assert float(l1.compute()) == pytest.approx((0.5 + 3.0) / 2)
    assert float(l2.compute()) == pytest.approx((0.5 + (12 * 0.0625) ** 0.5) / 2)


def test_split_states_merge_to_the_single_process_value():
    """What DDP does: per-rank sum states added together (uneven shards)."""
    torch.manual_seed(0)
    logits, target = torch.randn(11, 4), torch.randint(0, 4, (11,))
    for cls in (FlipRate, TargetConfidence):
        one = cls()
        one.update(logits, target)
        a, b = cls(), cls()
        a.update(logits[:7], target[:7])
        b.update(logits[7:], target[7:])
        a.merge_state(b)
        assert float(a.compute()) == pytest.approx(float(one.compute()), abs=1e-12)


class _MeanIsTarget(torch.nn.Module):
    """2 classes: p(class 1) = mean pixel value, p(class 0) = 1 - mean."""

    def forward(self, x):
        m = x.mean((1, 2, 3)).clamp(1e-6, 1 - 1e-6)
        return torch.stack([torch.log(1 - m), torch.log(m)], 1)


def test_cout_matches_the_hand_computed_insertion_curve():
    from lit_vce.metrics import COUT

    x = torch.zeros(1, 3, 10, 10)
    cf = x.clone()
    cf[0, :, 0, :] = 1.0  # 10 of 100 pixels changed
    cf[0, :, 1, 0] = 0.5  # one pixel changed less: pasted 11th
    src, tgt = torch.tensor([0]), torch.tensor([1])
    # by hand: after k of 50 increments, 2k pixels are pasted, most-changed first
    pasted = np.array([min(2 * k, 10) + 0.5 * (2 * k > 10) for k in range(51)]) / 100
    expected = np.trapezoid(pasted, dx=1 / 50) - np.trapezoid(1 - pasted, dx=1 / 50)
    m = COUT(_MeanIsTarget())
    m.update(x, cf, src, tgt)
    assert float(m.compute()) == pytest.approx(expected, abs=1e-6)
    assert -1 <= expected <= 1 and float(m.values[0][0]) == pytest.approx(expected, abs=1e-6)


def test_sfid_is_the_mean_of_the_two_cross_fids_and_ignores_batch_and_process_split():
    from lit_vce.metrics import SplitFID

    torch.manual_seed(0)
    real, fake = torch.rand(20, 3, 4, 4), torch.rand(20, 3, 4, 4) * 0.9
    keys = torch.arange(20) * 7919
    one = SplitFID(_Flat(), seed=3)
    one.update(real, fake, keys)
    value = float(one.compute())
    # reference: the same seeded split, FIDs from the scipy implementation
    salt = torch.randint(1, 2**62, (1,), generator=torch.Generator().manual_seed(3)).item()
    order = torch.argsort(keys ^ salt, stable=True).numpy()
    a, b = order[:10], order[10:]
    fr, ff = real.flatten(1)[:, :6].double().numpy(), fake.flatten(1)[:, :6].double().numpy()
    ref = 0.5 * (_reference_fid(fr[a], ff[b]) + _reference_fid(fr[b], ff[a]))
    assert value == pytest.approx(ref, rel=1e-4)
    # two "ranks" with uneven, shuffled shards give the same value
    perm = torch.randperm(20)
    r1, r2 = SplitFID(_Flat(), seed=3), SplitFID(_Flat(), seed=3)
    r1.update(real[perm[:13]], fake[perm[:13]], keys[perm[:13]])
    r2.update(real[perm[13:]], fake[perm[13:]], keys[perm[13:]])
    r1.merge_state(r2)
    assert float(r1.compute()) == pytest.approx(value, rel=1e-9)


def test_lpips_uses_local_backbone_weights_and_names_the_missing_file(tmp_path, monkeypatch):
    import torchvision

    from lit_vce.classifiers import MissingWeightsError
    from lit_vce.metrics.lpips import ALEXNET_FILE, build_lpips, lpips_available

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub folder
    assert not lpips_available()
    with pytest.raises(MissingWeightsError, match=ALEXNET_FILE):
        build_lpips()
    ckpt = tmp_path / "lpips" / "checkpoints" / ALEXNET_FILE
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), ckpt)
    assert lpips_available()
    m = build_lpips()
    x = torch.rand(2, 3, 64, 64)
    assert float(m(x, x)) == pytest.approx(0.0, abs=1e-6)
    m.reset()
    assert float(m(x, torch.rand(2, 3, 64, 64))) > 0


def test_lpips_weights_by_path_or_environment(tmp_path, monkeypatch):
    from lit_vce.classifiers import MissingWeightsError
    from lit_vce.metrics.lpips import build_lpips, lpips_available
    from lit_vce.testing import save_random_alexnet_weights

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(MissingWeightsError, match="do not exist"):
        build_lpips(tmp_path / "nope.pth")
    path = save_random_alexnet_weights(tmp_path / "any_name.pth")
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    by_arg = build_lpips(path).per_sample(x, y)
    monkeypatch.setenv("LIT_VCE_LPIPS_WEIGHTS", str(path))
    assert lpips_available()
    assert torch.equal(build_lpips().per_sample(x, y), by_arg) and (by_arg > 0).all()
