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
