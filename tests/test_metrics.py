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
    value = float(one.compute()[0])
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
    assert float(r1.compute()[0]) == pytest.approx(value, rel=1e-9)


def test_sfid_under_aces_convention_uses_successful_counterfactuals_and_equal_halves():
    from lit_vce.metrics import SplitFID

    torch.manual_seed(1)
    n = 21  # odd: ACE's head/tail split leaves the middle instance out
    real, fake = torch.rand(n, 3, 4, 4), torch.rand(n, 3, 4, 4) * 0.9
    keys, success = torch.arange(n) * 104729, torch.rand(n) < 0.7
    m = SplitFID(_Flat(), seed=5)
    m.update(real, fake, keys, success=success)
    all_vs_all, ace, _ = (float(v) for v in m.compute())
    salt = torch.randint(1, 2**62, (1,), generator=torch.Generator().manual_seed(5)).item()
    order = torch.argsort(keys ^ salt, stable=True)
    fr, ff = real.flatten(1)[:, :6].double().numpy(), fake.flatten(1)[:, :6].double().numpy()
    a, b = order[:10], order[11:]  # 10 and 10, the 11th left out
    sa, sb = a[success[a]].numpy(), b[success[b]].numpy()
    ref = 0.5 * (_reference_fid(fr[a.numpy()], ff[sb]) + _reference_fid(fr[b.numpy()], ff[sa]))
    assert ace == pytest.approx(ref, rel=1e-4)
    assert ace != pytest.approx(all_vs_all, rel=1e-3)
    # LDCE's table2 sFID: each half against itself (the full halves, every instance)
    within = float(m.compute()[2])
    a_full, b_full = order[:10].numpy(), order[10:].numpy()
    ref_within = 0.5 * (_reference_fid(fr[a_full], ff[a_full]) + _reference_fid(fr[b_full], ff[b_full]))
    assert within == pytest.approx(ref_within, rel=1e-4) and within != pytest.approx(all_vs_all, rel=1e-3)
    # every counterfactual successful: the ACE value differs from all-vs-all only by the dropped instance
    m2 = SplitFID(_Flat(), seed=5)
    m2.update(real[:20], fake[:20], keys[:20])
    assert float(m2.compute()[1]) == pytest.approx(float(m2.compute()[0]), rel=1e-12)


class _ByChannel(torch.nn.Module):
    """3 classes; the logits are the per-channel means (a hand-controllable classifier)."""

    num_classes = 3

    def forward(self, x):
        return x.mean((2, 3)) * 10


class _Feat6(_Flat):
    num_features = 6


def _colour(c, n=1, size=4):
    x = torch.full((n, 3, size, size), 0.1)
    x[:, c] = 0.9
    return x


def test_suite_conventions_on_a_hand_built_case():
    from lit_vce.metrics.suite import VCEMetrics

    torch.manual_seed(0)
    # 6 originals of class 0, one of them misclassified as 2; targets 1
    orig = _colour(0, 6) + 0.05 * torch.rand(6, 3, 4, 4)
    orig[5] = _colour(2)[0]
    source, target = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    # counterfactuals: 3 flipped to the target, 2 unchanged, the misclassified one moved to class 0
    cf = orig.clone()
    cf[:3] = _colour(1, 3) + 0.05 * torch.rand(3, 3, 4, 4)
    cf[5] = _colour(0)[0]
    m = VCEMetrics(_ByChannel(), features=_Feat6())
    rows = m.update(orig, cf, source, target, [f"s{i}" for i in range(6)])
    metrics, _, n = m.compute()
    assert n == 6 and metrics["flip_rate"] == pytest.approx(3 / 6)
    # untargeted: against the label, the last one did not flip (0 -> 0); against the prediction it did (2 -> 0)
    assert metrics["untargeted_flip_rate"] == pytest.approx(3 / 6)
    assert metrics["untargeted_flip_rate_prediction"] == pytest.approx(4 / 6)
    # FID of successful ones: ALL originals against the 3 successful counterfactuals
    f = lambda t: t.flatten(1)[:, :6].double().numpy()  # noqa: E731
    assert metrics["fid_successful"] == pytest.approx(_reference_fid(f(orig), f(cf[:3])), rel=1e-6)
    assert (metrics["fid_successful_n"], metrics["fid_successful_n_originals"]) == (3, 6)
    assert metrics["fid"] == pytest.approx(_reference_fid(f(orig), f(cf)), rel=1e-6)
    assert [r["success"] for r in rows] == [True] * 3 + [False] * 3


class _NaNOn(torch.nn.Module):
    """Logits are NaN for images whose red mean exceeds 0.5; else a fixed 2-class output."""

    num_classes = 2

    def forward(self, x):
        out = torch.stack([x.mean((1, 2, 3)), 1 - x.mean((1, 2, 3))], 1)
        return torch.where((x[:, 0].mean((1, 2)) > 0.5)[:, None], torch.full_like(out, float("nan")), out)


def test_non_finite_logits_are_failures_excluded_from_every_metric():
    from lit_vce.metrics.suite import VCEMetrics

    torch.manual_seed(0)
    orig = torch.rand(8, 3, 4, 4) * 0.4
    cf = orig.clone() + 0.05
    cf[[1, 4]] = _colour(0, 2)  # the classifier gives NaN on these two counterfactuals
    src, tgt = torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long)
    m = VCEMetrics(_NaNOn(), features=_Feat6())
    rows = m.update(orig, cf, src, tgt, [f"s{i}" for i in range(8)])
    assert [r["sample_id"] for r in rows] == [f"s{i}" for i in range(8)]
    assert rows[1]["failure"] == rows[4]["failure"] == "non-finite logits from the classifier on the counterfactual"
    assert not rows[1]["success"] and not rows[4]["success"]
    assert all("failure" not in rows[i] for i in (0, 2, 3, 5, 6, 7))
    metrics, _, n = m.compute()
    assert n == 8 and metrics["fid_n"] == 6  # attempted: 8; measured: 6
    ref = VCEMetrics(_NaNOn(), features=_Feat6())
    keep = [0, 2, 3, 5, 6, 7]
    ref.update(orig[keep], cf[keep], src[keep], tgt[keep], [f"s{i}" for i in keep])
    expected, _, _ = ref.compute()
    for k in ("target_confidence", "l1", "l2", "fid", "cout"):  # measured figures: the 6 that did not fail
        assert metrics[k] == pytest.approx(expected[k], rel=1e-12, nan_ok=True), k
    for k in ("flip_rate", "untargeted_flip_rate"):  # flip rates: the 2 failures count as not flipped
        assert metrics[k] == pytest.approx(expected[k] * 6 / 8, rel=1e-12), k
    assert m.last_intervals["l2"] == pytest.approx(ref.last_intervals["l2"], abs=0.05)
    # an all-NaN classifier: nothing succeeds and no metric is computed from garbage
    m = VCEMetrics(_NaNOn(), features=_Feat6())
    rows = m.update(_colour(0, 4), _colour(0, 4), src[:4], tgt[:4], ["a", "b", "c", "d"])
    metrics, _, n = m.compute()
    assert n == 4 and not any(r["success"] for r in rows)
    assert metrics["flip_rate"] == 0 and np.isnan(metrics["fid"]) and np.isnan(metrics["l2"])


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
