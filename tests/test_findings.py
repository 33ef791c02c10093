"""lit-vce findings: the shortcut findings table is rendered from the run folders."""

import json

import pytest

from lit_vce.cli import main


def test_findings_runs_the_vce_configurations_on_all_three_classifiers_and_renders_the_table(tmp_path, capsys):
    out = tmp_path / "findings"
    main(
        ["findings", "--out", str(out), "--num-samples", "4", "--batch-size", "4", "--configs", "svce", "--no-disagree"]
        + ["--spurious-images", "256", "--spurious-resamples", "200"]  # the size test_analyses uses
    )
    for clf in ("biased", "robust", "watermarked"):
        res = json.loads((out / "vce" / f"svce-{clf}" / "results.json").read_text())
        assert res["n"] == 4
    wm = json.loads((out / "vce" / "svce-watermarked" / "results.json").read_text())
    assert wm["config"]["data"]["regime"] == "watermark_balanced" and "watermark_only" in wm["audit"]
    findings = json.loads((out / "findings.json").read_text())["figures"]
    assert {
        "vce_background_only_biased_svce",
        "vce_shape_changed_robust_svce",
        "vce_watermark_only_watermarked_svce",
        "units_background_biased",
        "units_shape_robust",
        "units_watermark_watermarked",
    } <= set(findings)
    spurious = json.loads((out / "spurious" / "biased" / "spurious.json").read_text())
    assert spurious["n"] == 256
    units = findings["units_background_biased"]
    assert units["value"] == spurious["mean_corr_background"] and units["n"] == 256  # the figure is the file's
    assert units["interval"] == spurious["intervals"]["mean_corr_background"]
    assert units["met"] is (units["value"] >= units["target"] == 0.8)
    table = (out / "findings.md").read_text()
    assert "mean correlation of biased's top units with the background" in table and "[" in table
    row = next(line for line in table.splitlines() if line.startswith("| svce | 4 |"))
    assert row.count("|") == 9  # configuration, N, then FR and the figure for each of the three classifiers
    # re-rendering from the files gives the same table; an empty folder is an error
    main(["findings", "--out", str(out), "--render-only"])
    assert (out / "findings.md").read_text() == table
    with pytest.raises(FileNotFoundError, match="no finding"):
        main(["findings", "--out", str(tmp_path / "empty"), "--render-only"])
