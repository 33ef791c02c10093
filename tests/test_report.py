import json

import pytest

from lit_vce.cli import main
from lit_vce.report.leaderboard import load_results, markdown_table
from lit_vce.report.results import build_results


def _write(root, name, fr, l1):
    res = build_results(run_name=name, method=name, classifier="c", n=10, n_success=int(fr * 10), n_failed=0,
                        metrics={"flip_rate": fr, "target_confidence": fr, "l1": l1, "l2": 1.0}, seed=0, wall_time_s=1.0,
                        sample_ids_hash="h", config={})
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
    with pytest.raises(SystemExit):
        main(["leaderboard", str(tmp_path / "empty")])


def test_results_schema_rejects_missing_metrics_and_unknown_fields(tmp_path):
    with pytest.raises(ValueError, match="metrics.target_confidence is missing"):
        build_results(run_name="x", method="x", classifier="c", n=1, n_success=0, n_failed=0, metrics={"flip_rate": 0.0},
                      seed=0, wall_time_s=0.0, sample_ids_hash="h", config={})
    _write(tmp_path, "ok", 0.5, 1.0)
    data = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert {"versions", "git_sha", "hardware", "wall_time_s", "seed"} <= set(data)
    data["surprise"] = 1
    (tmp_path / "ok" / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown result fields"):
        load_results(tmp_path)
