import json

import pytest

from lit_vce.cli import main
from lit_vce.report.leaderboard import load_results, markdown_table
from lit_vce.report.results import RunResults, build_results


def _write(root, name, fr, l1):
    res = build_results(
        run_name=name,
        method=name,
        classifier="c",
        n=10,
        n_success=int(fr * 10),
        n_failed=0,
        metrics={"flip_rate": fr, "target_confidence": fr, "l1": l1, "l2": 1.0},
        seed=0,
        wall_time_s=1.0,
        sample_ids_hash="h",
        config={},
    )
    (root / name).mkdir()
    (root / name / "results.json").write_text(json.dumps(res))


def test_leaderboard_sorts_by_the_declared_direction(tmp_path, capsys):
    _write(tmp_path, "low_fr_close", 0.2, 5.0)
    _write(tmp_path, "high_fr_far", 0.9, 50.0)
    rows = lambda table: [line.split("|")[1].strip() for line in table.splitlines()[2:]]  # noqa: E731
    results = load_results(tmp_path)
    assert rows(markdown_table(results, "FR")) == ["high_fr_far", "low_fr_close"]  # higher is better
    assert rows(markdown_table(results, "L1")) == ["low_fr_close", "high_fr_far"]  # lower is better
    main(["leaderboard", str(tmp_path)])
    assert (tmp_path / "leaderboard.md").read_text().count("| c |") == 2
    with pytest.raises(SystemExit) as e:
        main(["leaderboard", str(tmp_path / "empty")])
    assert e.value.code == 2 and "no results.json under" in capsys.readouterr().err


def test_results_schema_rejects_missing_metrics_and_unknown_fields(tmp_path):
    with pytest.raises(ValueError, match="metrics.target_confidence is missing"):
        build_results(
            run_name="x",
            method="x",
            classifier="c",
            n=1,
            n_success=0,
            n_failed=0,
            metrics={"flip_rate": 0.0},
            seed=0,
            wall_time_s=0.0,
            sample_ids_hash="h",
            config={},
        )
    _write(tmp_path, "ok", 0.5, 1.0)
    data = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert {"versions", "git_sha", "hardware", "wall_time_s", "seed"} <= set(data)
    data["surprise"] = 1
    (tmp_path / "ok" / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown result fields"):
        RunResults.load(tmp_path / "ok" / "results.json")
    with pytest.raises(FileNotFoundError, match="no VCE results.json"):  # the only one is skipped
        load_results(tmp_path)


def _browser() -> str | None:
    import os
    import shutil

    found = os.environ.get("LIT_VCE_BROWSER") or next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if found is None and os.environ.get("LIT_VCE_REQUIRE_BROWSER") == "1":
        pytest.fail("LIT_VCE_REQUIRE_BROWSER=1 but no chromium found (apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from pathlib import Path

    cg = str(Path(__file__).resolve().parents[1] / "configs" / "world" / "classifier_guidance.yaml")
    root = tmp_path_factory.mktemp("report")
    for clf in ("biased", "robust"):
        main(
            [
                "predict",
                "--config",
                cg,
                "--model.classifier",
                clf,
                "--model.method.init_args.num_steps",
                "6",
                "--data.num_samples",
                "6",
                "--writer.output_dir",
                str(root / f"cg-{clf}"),
            ]
        )
    return root


def test_html_report_renders_its_images_in_a_real_browser(two_runs, tmp_path):
    import re
    import subprocess

    from lit_vce.report.html import find_runs, rank_samples, write_report

    out = write_report([two_runs], tmp_path / "report.html", rank_by="l2", examples=2)
    page = out.read_text()
    n_img = page.count("<img ")
    # per run (best, median, worst) x 3 images each, plus side by side (6 ids x 3 images)
    shown = sum(len(g) for run in find_runs([two_runs]) for g in rank_samples(run.rows, "l2", 2).values())
    assert shown >= 6 and n_img == 3 * shown + 6 * 3
    assert "classifier_guidance · biased" in page and "classifier_guidance · robust" in page and "<svg" in page
    # every link of the contents has its target; captions name classes, not ids
    targets = set(re.findall(r"id='([^']+)'", page))
    links = re.findall(r"<nav class='toc'>.*?</nav>", page)[0]
    assert set(re.findall(r"href='#([^']+)'", links)) <= targets and "run-cg-biased" in targets
    assert re.search(r"(circle|square|triangle|cross) → (circle|square|triangle|cross)</span> [✓✗]", page)
    assert page.count("<div class='metrics'>") == 2 and "<details class='run' id='run-cg-biased' open>" in page
    # originals the classifier already read as the target are counted per run and never ranked
    from lit_vce.report.html import already_target

    notes = re.findall(r"(\d+) of (\d+) successes had an original already read as the target", page)
    expected = [
        (sum(map(already_target, run.rows)), sum(r["success"] == "True" and not r["failure"] for r in run.rows))
        for run in find_runs([two_runs])
    ]
    assert [tuple(map(int, n)) for n in notes] == [e for e in expected if e[0]]
    assert any(e[0] for e in expected)  # the biased classifier reads some originals as the target
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium on this machine (CI installs it; LIT_VCE_REQUIRE_BROWSER=1 makes this a failure)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        out.resolve().as_uri(),
    ]
    dom = subprocess.run([browser, *flags], capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, dom[-2000:]
    assert int(loaded.group(1)) == int(loaded.group(2)) == n_img
    # a deleted image is seen as broken by the browser: the check can fail
    next((tmp_path / "report_files").glob("*.png")).unlink()
    dom = subprocess.run([browser, *flags], capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert int(loaded.group(1)) == n_img - 1


def _twenty_runs(two_runs, root):
    """Ten methods x two classifiers: the two runs copied under ten method names."""
    import shutil

    for k in range(10):
        for clf in ("biased", "robust"):
            dst = root / f"m{k}-{clf}"
            shutil.copytree(two_runs / f"cg-{clf}", dst)
            data = json.loads((dst / "results.json").read_text())
            data["method"] = data["run_name"] = f"method_{k}"
            (dst / "results.json").write_text(json.dumps(data))
    return root


def test_twenty_series_get_twenty_styles_that_name_method_and_classifier(two_runs, tmp_path):
    from lit_vce.report.html import find_runs
    from lit_vce.report.plots import series_styles

    runs = find_runs([_twenty_runs(two_runs, tmp_path / "runs")])
    styles = series_styles(runs)
    assert len(runs) == 20 and len({(s["color"], s["dash"], s["marker"]) for s in styles}) == 20
    by_method = {}
    for r, s in zip(runs, styles):  # the colour is the method's, whatever the classifier
        by_method.setdefault(r.results.method, set()).add(s["color"])
    assert all(len(c) == 1 for c in by_method.values()) and len({c.pop() for c in by_method.values()}) == 10


def test_the_side_by_side_table_of_twenty_runs_is_fully_visible(two_runs, tmp_path):
    """1280 px wide, 20 runs: the table fits the page (the browser's layout says so) and
    a screenshot shows its last column's images."""
    import re
    import subprocess

    import numpy as np
    from PIL import Image

    from lit_vce.report.html import write_report

    out = write_report([_twenty_runs(two_runs, tmp_path / "runs")], tmp_path / "report.html")
    page = out.read_text()
    assert page.count("<details class='run'") == 20 and " open>" not in page  # closed past four runs
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium on this machine (CI installs it; LIT_VCE_REQUIRE_BROWSER=1 makes this a failure)")
    base = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [*base, "--window-size=1280,900", "--dump-dom", out.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'data-side-fits="yes"' in dom, re.findall(r"data-side[^ ]*", dom)
    left, top, right, bottom = map(int, re.search(r'data-side-box="([\d,-]+)"', dom).group(1).split(","))
    assert right <= 1280 and bottom - top > 20 * 72  # a row per run
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*base, f"--window-size=1280,{bottom + 40}", f"--screenshot={shot}", out.resolve().as_uri()],
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[1] == 1280
    last = pixels[top + 10 : bottom - 10, right - 90 : right - 4]  # the last column: one image per run
    rows_with_image = (np.abs(last - 255).sum(axis=2) > 60).any(axis=1)
    assert rows_with_image.mean() > 0.5  # painted inside the screenshot, not cut off


def test_leaderboard_html_and_latex_mark_the_best_value_per_direction(two_runs):
    main(["leaderboard", str(two_runs)])
    html = (two_runs / "leaderboard.html").read_text()
    tex = (two_runs / "leaderboard.tex").read_text()
    results = load_results(two_runs)
    best_fr = max(r.metrics["flip_rate"] for r in results)
    best_l2 = min(r.metrics["l2"] for r in results)
    assert f'data-value="{best_fr}" class="best"' in html and f'data-value="{best_l2}" class="best"' in html
    assert r"\textbf{" + f"{best_l2:.3f} [" in tex and r"\toprule" in tex and "classifier\\_guidance" in tex
    # every figure with an interval shows it: value [lo, hi], the interval around the value
    for r in results:
        lo, hi = r.intervals["l2"]
        assert lo <= r.metrics["l2"] <= hi
        assert (
            f"{r.metrics['l2']:.3f} [{lo:.3f}, {hi:.3f}]" in html
            and f"{r.metrics['l2']:.3f} [{lo:.3f}, {hi:.3f}]" in tex
        )
    from lit_vce.report.html import Run, plot_flip_rate_vs_l2

    svg = plot_flip_rate_vs_l2([Run(two_runs / n) for n in ("cg-biased", "cg-robust")])
    assert svg.count("class='ci'") == 4  # an L2 and a flip-rate error bar per run
    assert 'class="sortable"' in html and "addEventListener('click'" in html


def test_evaluation_results_replace_inline_ones_in_the_leaderboard(two_runs):
    main(["evaluate", str(two_runs / "cg-biased")])
    results = load_results(two_runs)
    assert len(results) == 2
    assert {r.stage for r in results if r.classifier == "biased"} == {"evaluate"}


def test_report_ranks_successful_samples_in_the_metric_direction():
    from lit_vce.report.html import already_target, rank_samples

    rows = [
        {"sample_id": str(i), "l2": str(v), "cout": str(-v), "success": str(s), "failure": f}
        for i, (v, s, f) in enumerate(
            [(5, True, ""), (1, True, ""), (3, True, ""), (0.5, False, ""), (0.1, True, "nan")]
        )
    ]
    g = rank_samples(rows, "l2", 1)
    assert [r["sample_id"] for r in g["best"]] == ["1"] and [r["sample_id"] for r in g["worst"]] == ["0"]
    assert [r["sample_id"] for r in rank_samples(rows, "cout", 1)["best"]] == ["1"]
    # an original the classifier already read as the target is a success with nothing explained
    rows[2].update(pred_before="7", target="7", l2="0")
    assert [r["sample_id"] for r in rank_samples(rows, "l2", 1)["best"]] == ["1"]
    only = [dict(rows[2])]
    assert [r["sample_id"] for r in rank_samples(only, "l2", 1)["best"]] == ["2"]  # shown when nothing else is
    assert already_target(rows[2]) and not already_target({**rows[2], "failure": "nan"})  # a failure never is
    assert not already_target({**rows[2], "success": "False"})
    with pytest.raises(ValueError, match="rank_by"):
        rank_samples(rows, "nope", 1)


def test_triples_are_the_images_and_the_clipped_channel_sum_of_the_change():
    import torch

    from lit_vce.report.grids import triples

    o = torch.zeros(1, 3, 2, 2)
    c = o.clone()
    c[0, 0, 0, 0], c[0, 1, 0, 0], c[0, 2, 1, 1], c[0, 0, 1, 0] = 0.3, 0.4, 1.5, -0.2  # out of range: clamped first
    t = triples(o, c)
    assert t.shape == (1, 3, 3, 2, 2)
    assert torch.equal(t[0, 0], o[0]) and torch.equal(t[0, 1], c[0].clamp(0, 1))
    expected = torch.tensor([[0.7, 0.0], [0.0, 1.0]])
    assert all(torch.allclose(t[0, 2, ch], expected) for ch in range(3))  # grey: the same on every channel
