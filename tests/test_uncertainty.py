"""95 % intervals (bootstrap over samples) and the paired comparison of two runs."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from lit_vce.metrics.uncertainty import mean_interval, paired_bootstrap
from lit_vce.metrics.vce import fid_from_features, frechet_distance


@pytest.mark.parametrize("n1,n2,d", [(12, 20, 64), (30, 9, 64), (80, 100, 16)])
def test_fid_from_features_equals_the_covariance_formula_in_sample_or_feature_space(n1, n2, d):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(n1, d, generator=g, dtype=torch.float64)
    fake = (
        0.5
        + 1.3
        * torch.randn(n2, d, generator=g, dtype=torch.float64)
        @ torch.randn(d, d, generator=g, dtype=torch.float64)
        / d**0.5
    )
    ref = frechet_distance(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))
    # with n < d the d x d route sums square roots of ~1e-15 rounding eigenvalues (about 1e-8
    # relative here); the sample-space route has none of them
    assert float(fid_from_features(real, fake)) == pytest.approx(float(ref), rel=1e-7 if min(n1, n2) < d else 1e-10)


def test_mean_interval_has_the_width_of_a_mean_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(64, generator=g) < 0.73).double()
    p = float(x.mean())
    lo, hi = mean_interval(x, resamples=4000, seed=0)
    half = 1.96 * math.sqrt(p * (1 - p) / 64)  # the normal approximation: about +-0.11 at 0.73
    assert lo < p < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)
    assert mean_interval(x, resamples=4000, seed=0) == [lo, hi]
    y = torch.randn(64, generator=g, dtype=torch.float64)  # continuous: another seed, other quantiles
    assert mean_interval(y, resamples=500, seed=1) != mean_interval(y, resamples=500, seed=0)
    # a ratio: the mean over the weighted samples only
    w = torch.zeros(64, dtype=torch.float64)
    w[:32] = 1
    lo_w, hi_w = mean_interval(x, resamples=2000, seed=0, weights=w)
    assert lo_w <= float(x[:32].mean()) <= hi_w and hi_w - lo_w > hi - lo  # fewer samples: wider
    assert mean_interval(torch.ones(1), resamples=10) == [pytest.approx(math.nan, nan_ok=True)] * 2


def _suite_inputs(n=40):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, 32, 32, generator=g)
    cf = (x + 0.2 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 1)
    src = torch.randint(0, 4, (n,), generator=g)
    return x, cf, src, (src + 1) % 4, [f"img{i}" for i in range(n)]


def test_suite_intervals_contain_the_figures_and_do_not_depend_on_batch_order():
    from lit_vce.classifiers import load_classifier
    from lit_vce.metrics.suite import VCEMetrics

    clf = load_classifier("biased")
    x, cf, src, tgt, ids = _suite_inputs()
    results = []
    for order in (list(range(40)), list(range(39, -1, -1))):
        suite = VCEMetrics(clf, features="world", resamples=500, fid_resamples=40)
        for lo in range(0, 40, 16):  # batches of 16, in two orders
            idx = order[lo : lo + 16]
            suite.update(x[idx], cf[idx], src[idx], tgt[idx], [ids[i] for i in idx])
        with pytest.warns(UserWarning):
            m, _, _ = suite.compute()
        results.append((m, suite.last_intervals))
    (m, ci), (_, ci_rev) = results
    assert ci == ci_rev
    for key in ("flip_rate", "target_confidence", "l1", "l2", "cout", "fid", "sfid", "untargeted_flip_rate"):
        lo, hi = ci[key]
        assert lo <= m[key] <= hi, (key, m[key], ci[key])
        assert hi > lo, key  # these figures vary between images
    assert set(ci) <= set(m)


def test_paired_bootstrap_detects_a_shift_that_separate_intervals_hide():
    g = torch.Generator().manual_seed(4)
    image_effect = 10 * torch.randn(64, generator=g, dtype=torch.float64)  # shared by both runs
    a = image_effect + 0.5 + 0.1 * torch.randn(64, generator=g, dtype=torch.float64)
    b = image_effect + 0.1 * torch.randn(64, generator=g, dtype=torch.float64)
    lo_a, hi_a = mean_interval(a, seed=0)
    lo_b, hi_b = mean_interval(b, seed=0)
    assert lo_a < hi_b and lo_b < hi_a  # the two intervals overlap: unpaired, no difference seen
    r = paired_bootstrap(a, b, resamples=4000)
    assert r["significant"] and r["p_value"] < 0.01
    assert r["interval"][0] < 0.5 < r["interval"][1]
    same = paired_bootstrap(b, b.clone())
    assert same["difference"] == 0 and not same["significant"] and same["p_value"] == 1.0
    noise = paired_bootstrap(b, b + 0.1 * torch.randn(64, generator=g, dtype=torch.float64), resamples=4000)
    assert not noise["significant"] and noise["p_value"] > 0.05
    with pytest.raises(ValueError, match="same samples"):
        paired_bootstrap(a, b[:10])


def _table(path, rows):
    path.mkdir(parents=True)
    with (path / "samples.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_compare_runs_pairs_by_sample_id_and_the_cli_reports_it(tmp_path, capsys):
    from lit_vce.cli import main
    from lit_vce.report.compare import compare_runs

    g = torch.Generator().manual_seed(5)
    base = torch.rand(51, generator=g)
    rows_a = [
        {"sample_id": f"s{i}", "success": str(i % 5 != 0), "l2": f"{float(base[i]) + 0.3:.6f}", "failure": ""}
        for i in range(50)
    ]
    # B: another order, one sample more, a failed sample (empty l2) and closer counterfactuals
    rows_b = [
        {
            "sample_id": f"s{i}",
            "success": str(i % 2 == 0 and i != 4),
            "l2": "" if i == 4 else f"{float(base[i]):.6f}",
            "failure": "boom" if i == 4 else "",
        }
        for i in range(50, -1, -1)
    ]
    _table(tmp_path / "a", rows_a)
    _table(tmp_path / "b", rows_b)
    r = compare_runs(tmp_path / "a", tmp_path / "b", resamples=2000)
    assert r["n_a"] == 50 and r["n_b"] == 51 and r["n_paired"] == 50
    assert r["metrics"]["l2"]["n"] == 49  # the failed sample has no L2
    assert r["metrics"]["l2"]["difference"] == pytest.approx(0.3, abs=1e-5) and r["metrics"]["l2"]["significant"]
    assert r["metrics"]["flip_rate"]["n"] == 50  # a failure counts as not flipped
    assert r["metrics"]["flip_rate"]["difference"] == pytest.approx(0.8 - 24 / 50)
    main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--resamples", "500"])
    out = capsys.readouterr().out
    assert "50 samples in both" in out and "1 of them failed" in out and "l2" in out and "yes" in out
    l2_line = next(line for line in out.splitlines() if line.startswith("l2 "))
    assert l2_line.split()[1] == "49"  # the N of pairs L2 used
    _table(tmp_path / "c", [{"sample_id": "other", "success": "True", "l2": "1.0", "failure": ""}])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path / "a"), str(tmp_path / "c")])
    assert e.value.code == 2 and "share no sample_id" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown metric"):
        compare_runs(tmp_path / "a", tmp_path / "b", ["fid"])


def test_the_audit_reads_watermark_only_edits_with_intervals():
    """Half the counterfactuals only swap the corner patch to the target's pattern, half
    redraw the image with the target shape: watermark_only 0.5, shape_changed 0.5."""
    import numpy as np

    from lit_vce.classifiers import load_classifier
    from lit_vce.data.world import ShapesWorld, add_watermark, render, sample_item
    from lit_vce.metrics.suite import VCEMetrics

    n = 24
    d = ShapesWorld("watermark_balanced", "test", n)
    x = torch.stack([d[i]["image"] for i in range(n)])
    src = torch.tensor([d[i]["label"] for i in range(n)])
    mark = [d[i]["watermark"] for i in range(n)]
    # a target that is neither the shape nor the pattern (watermarked reads the pattern)
    tgt = torch.tensor(
        [next(t for t in ((y + k) % 4 for k in (1, 2, 3)) if t != m) for y, m in zip(src.tolist(), mark)]
    )
    cfs = []
    for i in range(n):
        s = sample_item(0, "watermark_balanced", "test", i)
        t = int(tgt[i])
        edit = (
            add_watermark(s, t) if i % 2 == 0 else add_watermark(render(t, s.background, np.random.default_rng(i)), t)
        )
        cfs.append(torch.from_numpy(edit.image).permute(2, 0, 1))
    cf = torch.stack(cfs)
    suite = VCEMetrics(load_classifier("watermarked"), features=None, audit=True, resamples=500)
    rows = suite.update(x, cf, src, tgt, [f"s{i}" for i in range(n)])
    m, audit, _ = suite.compute()
    assert m["flip_rate"] == 1.0 and audit["n_success"] == n
    assert audit["watermark_only"] == 0.5 and audit["shape_changed"] == 0.5
    # a patch-only edit whose background happens to be the target's also counts as background-only
    kept_bg = sum(int(d[i]["background"] == int(tgt[i])) for i in range(0, n, 2))
    assert audit["background_only"] == kept_bg / n
    lo, hi = suite.last_intervals["watermark_only"]
    assert 0.2 < lo < 0.5 < hi < 0.8
    lo, hi = suite.last_intervals["shape_changed"]
    assert lo < 0.5 < hi
    assert [r["audit_watermark_only"] for r in rows[:4]] == [True, False, True, False]
    # an original the classifier already reads as the target succeeds unedited: not audited
    same = next(i for i in range(n) if mark[i] != int(src[i]))
    suite = VCEMetrics(load_classifier("watermarked"), features=None, audit=True, resamples=100)
    suite.update(x[[same]], x[[same]], src[[same]], torch.tensor([mark[same]]), ["u"])
    m, audit, _ = suite.compute()
    assert m["flip_rate"] == 1.0 and audit["n_success"] == 0 and "watermark_only" not in audit
    # originals without the patch: no watermark figure at all
    plain = ShapesWorld("balanced", "test", 4)
    xp = torch.stack([plain[i]["image"] for i in range(4)])
    suite = VCEMetrics(load_classifier("biased"), features=None, audit=True, resamples=100)
    rows = suite.update(xp, xp, src[:4], tgt[:4], ["a", "b", "c", "d"])
    _, audit, _ = suite.compute()
    assert "watermark_only" not in audit and "audit_watermark_only" not in rows[0]
