"""Analyses beyond VCEs: disagreement and neuron objectives, spurious units, the CLI runs."""

import csv
import json

import pytest
import torch

from lit_vce.classifiers import load_classifier
from lit_vce.cli import main
from lit_vce.data.world import ShapesWorld
from lit_vce.objectives import Disagreement, NeuronActivation, ObjectiveContext


@pytest.fixture(scope="module")
def world():
    d = ShapesWorld("balanced", "test", 256)
    items = [d[i] for i in range(len(d))]
    return (
        torch.stack([it["image"] for it in items]),
        torch.tensor([it["label"] for it in items]),
        torch.tensor([it["background"] for it in items]),
    )


def test_disagreement_scores_are_the_published_variants(world):
    x, y, _ = world
    x, y = x[:6], y[:6]
    f1, f2 = load_classifier("biased"), load_classifier("robust")
    ctx = ObjectiveContext(x, y, y, f1)
    with torch.no_grad():
        l1, l2 = f1(x), f2(x)
        p1, p2 = l1.softmax(1).gather(1, y[:, None])[:, 0], l2.softmax(1).gather(1, y[:, None])[:, 0]
        torch.testing.assert_close(Disagreement(f2, "confidence")(x, ctx), -(p1 - p2))
        torch.testing.assert_close(
            Disagreement(f2, "log_confidence")(x, ctx), -(p1.log() - p2.log()), rtol=1e-4, atol=1e-5
        )

        def margin(logits):
            own = logits.gather(1, y[:, None])[:, 0]
            other = logits.clone().scatter_(1, y[:, None], float("-inf")).max(1).values
            return own - other

        torch.testing.assert_close(Disagreement(f2, "logit_margin")(x, ctx), -(margin(l1) - margin(l2)))
    with pytest.raises(ValueError, match="variant"):
        Disagreement(f2, "nope")


def test_neuron_objective_reads_the_penultimate_unit(world):
    x, y, _ = world
    clf = load_classifier("biased")
    obj = NeuronActivation(clf, unit=13)
    with torch.no_grad():
        act, _ = obj.activation(x[:4], ObjectiveContext(x[:4], y[:4], y[:4], clf))
        expected = clf.model.features(clf.preprocess(x[:4]))[:, 13]
    torch.testing.assert_close(act[:, 0], expected)
    assert torch.equal(obj(x[:4], ObjectiveContext(x[:4], y[:4], y[:4], clf)), -act.mean(1))
    assert "max unit 13 of penultimate" in obj.describe()
    with pytest.raises(ValueError, match="no layer"):
        NeuronActivation(clf, 0, layer="nope")


def test_spurious_units_of_biased_track_the_background_and_of_robust_the_shape(world):
    from lit_vce.analyses import spurious_units

    x, y, bg = world
    biased = spurious_units(load_classifier("biased"), x, y, {"shape": y, "background": bg}, top=3)
    robust = spurious_units(load_classifier("robust"), x, y, {"shape": y, "background": bg}, top=3)
    assert biased["mean_corr_background"] > 0.6 > biased["mean_corr_shape"]
    assert robust["mean_corr_shape"] > 0.6 > robust["mean_corr_background"]
    entry = biased["classes"]["2"][0]
    assert {"unit", "contribution", "share_of_logit", "corr_shape", "corr_background", "confidence_drop"} <= set(entry)
    # removing a unit that drives the class lowers the class confidence
    assert entry["confidence_drop"] > 0
    # bootstrap intervals over images hold the figure, narrow with more images, are seeded
    lo, hi = biased["intervals"]["mean_corr_background"]
    assert lo < biased["mean_corr_background"] < hi and hi - lo < 0.2
    again = spurious_units(load_classifier("biased"), x, y, {"shape": y, "background": bg}, top=3)
    assert again["intervals"] == biased["intervals"]
    half = spurious_units(load_classifier("biased"), x[::2], y[::2], {"shape": y[::2], "background": bg[::2]}, top=3)
    wide = half["intervals"]["mean_corr_background"]
    assert wide[1] - wide[0] > hi - lo


def test_spurious_cli_adds_the_watermark_factor_for_the_watermarked_classifier(tmp_path, capsys):
    from lit_vce.analyses.spurious import main as spurious_main

    res = spurious_main(
        ["--classifier", "watermarked", "--num-samples", "256", "--resamples", "200", "--out", str(tmp_path)]
    )
    assert res["regime"] == "watermark_balanced"
    assert res["mean_corr_watermark"] > 0.8 > res["mean_corr_shape"]
    lo, hi = res["intervals"]["mean_corr_watermark"]
    assert lo < res["mean_corr_watermark"] < hi
    assert "watermark == class" in capsys.readouterr().out


SMALL = [
    "--model.method.init_args.num_steps",
    "4",
    "--model.method.init_args.outer_steps",
    "2",
    "--model.method.init_args.num_cutouts",
    "1",
]


def test_disagree_runs_through_the_cli_and_writes_results(tmp_path, capsys):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs" / "world" / "disagree.yaml"
    out = tmp_path / "dis"
    main(["disagree", "--config", str(cfg), "--data.per_class", "1", "--writer.output_dir", str(out), *SMALL])
    res = json.loads((out / "results.json").read_text())
    assert res["stage"] == "analysis" and res["method"] == "digin-disagree" and res["n"] == 4
    assert {"disagreement_rate", "class_confidence", "class_confidence_second", "background_without_shape"} <= set(
        res["metrics"]
    )
    assert res["config"]["objective"].startswith("Disagreement(logit_margin")
    rows = list(csv.DictReader((out / "samples.csv").open()))
    assert len(rows) == 4 and {r["class"] for r in rows} == {"0", "1", "2", "3"}
    assert len(list((out / "counterfactuals").glob("*.png"))) == 4
    # an analysis is not a VCE run: the leaderboard refuses a folder holding only analyses
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["leaderboard", str(tmp_path)])
    assert e.value.code == 2 and "no VCE results.json under" in capsys.readouterr().err


def test_neurons_on_real_images_keep_the_object_and_change_the_rest(tmp_path):
    from pathlib import Path

    from lit_vce.io import load_png, sample_key

    cfg = Path(__file__).resolve().parents[1] / "configs" / "world" / "neurons.yaml"
    out = tmp_path / "neu"
    main(
        [
            "neurons",
            "--config",
            str(cfg),
            "--data.num_samples",
            "3",
            "--writer.output_dir",
            str(out),
            "--model.method.init_args.null_text_steps",
            "3",
            *SMALL,
        ]
    )
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "digin-neurons" and res["n"] == 3 and "activation" in res["metrics"]
    d = ShapesWorld("balanced", "test", 3)
    inside = outside = 0.0
    for i in range(3):
        it = d[i]
        key = sample_key(it["sample_id"])
        diff = (load_png(out / "counterfactuals" / f"{key}.png") - it["image"]).abs().mean(0)
        m = it["mask"][0]
        inside += float((diff * m).sum() / m.sum())
        outside += float((diff * (1 - m)).sum() / (1 - m).sum())
    assert inside < 0.5 * outside, (inside, outside)


def test_disagreement_summary_has_per_class_rates_and_order_free_intervals():
    from lit_vce.analyses.generate import summarise, summary_intervals

    rows = []
    for i in range(40):
        y = i % 4
        hit = (i // 4) % 2 == 0 if y == 0 else (i // 4) % 3 != 0  # class 0: 5 of 10 images, the others 6 of 10
        rows.append(
            {
                "sample_id": f"s{i:02d}",
                "class": y,
                "failure": "",
                "disagrees": hit,
                "class_conf": 0.9,
                "class_conf_second": 0.1,
                "oracle_shape": (y + 1) % 4 if hit else y,
                "oracle_background": y,
            }
        )
    m = summarise("disagree", rows)
    per = {y: sum(1 for r in rows if r["class"] == y and r["disagrees"]) / 10 for y in range(4)}
    assert m["background_without_shape"] == pytest.approx(sum(per.values()) / 4)
    for y in range(4):
        assert m[f"background_without_shape_class{y}"] == per[y]
    ci = summary_intervals("disagree", rows, seed=0)
    assert ci == summary_intervals("disagree", rows[::-1], seed=0)  # order of the gathered rows is irrelevant
    for key in ("background_without_shape", "background_without_shape_class1", "disagreement_rate"):
        lo, hi = ci[key]
        assert lo <= m[key] <= hi and hi > lo, key
    # a per-class rate rests on 10 images: its interval is wider than the overall one on 40
    assert (
        ci["background_without_shape_class1"][1] - ci["background_without_shape_class1"][0]
        > ci["background_without_shape"][1] - ci["background_without_shape"][0]
    )
