"""``lit_vce.explain``: counterfactuals and metrics from Python, without LightningCLI,
byte-identical to what ``lit-vce predict`` writes for the same sample ids."""

from __future__ import annotations

import csv


import pytest
import torch

from lit_vce import explain
from lit_vce.lightning.cli import run_predict
from lit_vce.data.datamodule import VCEDataModule
from lit_vce.io import load_png, quantize, sample_key
from lit_vce.methods import ClassifierGuidance

FAST = dict(scale=2.0, l1_weight=0.6, normalize=True, sampler="ddpm", num_steps=10, skip=0.6)


def _world_items(n: int):
    dm = VCEDataModule(dataset="world", regime="balanced", split="test", num_samples=n, protocol="random")
    dm.setup("predict")
    items = [dm.dataset[i] for i in range(n)]
    return (
        torch.stack([it["image"] for it in items]),
        [it["source"] for it in items],
        [it["target"] for it in items],
        [it["sample_id"] for it in items],
    )


@pytest.mark.slow
def test_explain_gives_the_bytes_predict_writes(tmp_path):
    images, sources, targets, ids = _world_items(3)
    run_predict(
        [
            "--config",
            "world/classifier_guidance",
            "--data.num_samples",
            "3",
            "--data.batch_size",
            "3",
            "--model.deterministic",
            "true",
            "--model.second_classifier",
            "null",
            *[a for k, v in FAST.items() for a in (f"--model.method.init_args.{k}", str(v))],
            "--writer.output_dir",
            str(tmp_path / "run"),
        ]
    )
    out = explain(
        images,
        targets,
        classifier="biased",
        method=ClassifierGuidance(**FAST),
        sources=sources,
        sample_ids=ids,
        deterministic=True,
        batch_size=2,
    )
    rows = {r["sample_id"]: r for r in csv.DictReader((tmp_path / "run" / "samples.csv").open())}
    for j, sid in enumerate(ids):
        saved = load_png(tmp_path / "run" / "counterfactuals" / f"{sample_key(sid)}.png")
        assert torch.equal(saved, out.counterfactuals[j]), sid
        assert (rows[sid]["success"] == "True") == bool(out.success[j])
    assert out.metrics["flip_rate"] == pytest.approx(sum(r["success"] == "True" for r in rows.values()) / 3)
    assert out.audit is not None and "background_only" in out.audit


def test_explain_by_name_with_class_names_raises_the_target_confidence(tmp_path):
    images, sources, _, _ = _world_items(2)
    names = ["circle", "square", "triangle", "cross"]
    targets = [names[(s + 1) % 4] for s in sources]
    out = explain(images, targets, classifier="robust", method="classifier_guidance", sources=sources, **FAST)
    assert (
        out.counterfactuals.shape == images.shape and out.counterfactuals.min() >= 0 and out.counterfactuals.max() <= 1
    )
    assert out.target.tolist() == [(s + 1) % 4 for s in sources]
    with torch.no_grad():
        from lit_vce.classifiers import load_classifier

        clf = load_classifier("robust")
        before = clf(out.originals).softmax(1)[torch.arange(2), out.target]
        after = clf(out.counterfactuals).softmax(1)[torch.arange(2), out.target]
    assert bool((after > before).all())
    assert {"l1", "l2", "target_conf_before", "target_conf_after"} <= set(out.rows[0])
    text = repr(out)
    assert text.startswith("Explanation(method='classifier_guidance', classifier='robust', n=2, n_success=")
    assert "tensor" not in text and len(text) < 300  # a summary, not the tensors


@pytest.mark.slow
def test_a_saved_explanation_is_a_run_that_evaluate_leaderboard_and_report_read(tmp_path):
    from lit_vce.cli import main
    from lit_vce.report.results import RunResults

    images, sources, _, _ = _world_items(3)
    targets = [(s + 1) % 4 for s in sources]
    out = explain(images, targets, classifier="robust", method="classifier_guidance", sources=sources, **FAST)
    run = out.save(tmp_path / "runs" / "api")
    results = RunResults.load(run / "results.json")  # the schema, checked against the table beside it
    assert (results.n, results.n_success, results.n_failed) == (3, out.n_success, 0)
    assert results.metrics["flip_rate"] == out.metrics["flip_rate"] and results.classifier == "robust"
    assert results.s_per_img == pytest.approx(out.seconds / 3, rel=1e-3) and results.s_per_img > 0  # never a 0 s/img
    table = list(csv.DictReader((run / "samples.csv").open()))
    assert {r["method"] for r in table} == {"classifier_guidance"} and {r["seed"] for r in table} == {"0"}
    for j, row in enumerate(out.rows):  # the PNGs and records predict would write
        key = sample_key(row["sample_id"])
        assert torch.equal(load_png(run / "counterfactuals" / f"{key}.png"), out.counterfactuals[j])
        assert torch.equal(load_png(run / "originals" / f"{key}.png"), out.originals[j])
        assert (run / "samples" / f"{key}.json").is_file()
    main(["evaluate", str(run)])
    evaluated = RunResults.load(run / "evaluation" / "results.json")
    assert evaluated.n == 3 and evaluated.metrics["flip_rate"] == pytest.approx(out.metrics["flip_rate"])
    assert evaluated.metrics["l2"] == pytest.approx(out.metrics["l2"], rel=1e-5)
    main(["leaderboard", str(tmp_path / "runs")])
    board = (tmp_path / "runs" / "leaderboard.md").read_text()
    assert "classifier guidance" in board.lower() or "classifier_guidance" in board
    main(["report", str(run), "--out", str(tmp_path / "report.html")])
    assert "classifier" in (tmp_path / "report.html").read_text()
    with pytest.raises(FileExistsError, match="already holds a run"):
        out.save(run)


def test_explain_rejects_bad_input_clearly():
    images, sources, targets, _ = _world_items(2)
    with pytest.raises(ValueError, match="has no class 'sqare'; did you mean square"):
        explain(images, ["sqare", "circle"], classifier="robust", method="classifier_guidance", **FAST)
    with pytest.raises(ValueError, match="class id 9 is unknown"):
        explain(images, [9, 1], classifier="robust", method="classifier_guidance", **FAST)
    with pytest.raises(ValueError, match="target equals source for"):
        explain(images, sources, classifier="robust", method="classifier_guidance", sources=sources, **FAST)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        explain(images * 255, targets, classifier="robust", method="classifier_guidance", **FAST)
    with pytest.raises(ValueError, match="no such|unknown method"):
        explain(images, targets, classifier="robust", method="nope")
    with pytest.raises(TypeError, match="ImageClassifier"):
        explain(images, targets, classifier=torch.nn.Linear(3, 4), method="classifier_guidance", **FAST)


def test_explain_reads_image_files(tmp_path):
    from PIL import Image

    images, sources, targets, _ = _world_items(1)
    path = tmp_path / "x.png"
    Image.fromarray((images[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    a = explain([path], targets, classifier="robust", method=ClassifierGuidance(**FAST), sources=sources, metrics=False)
    b = explain(
        quantize(images),
        targets,
        classifier="robust",
        method=ClassifierGuidance(**FAST),
        sources=sources,
        metrics=False,
    )
    assert torch.equal(a.counterfactuals, b.counterfactuals)
    c = explain(
        [Image.open(path)],
        targets,
        classifier="robust",
        method=ClassifierGuidance(**FAST),
        sources=sources,
        metrics=False,
    )  # a PIL image is read as its file is
    assert torch.equal(c.originals, a.originals) and torch.equal(c.counterfactuals, a.counterfactuals)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read"):
        explain([bad], targets, classifier="robust", method="classifier_guidance", **FAST)


def test_predict_and_explain_share_one_batch_path_with_masks_and_captions(tmp_path, tiny_sd):
    """DiG-IN on a text model with the data's foreground masks and captions: predict writes
    the bytes explain() returns (both run lit_vce.batches.explain_batch)."""
    import lightning as L
    from PIL import Image

    from lit_vce.data.datamodule import collate
    from lit_vce.diffusion import LatentDiffusion
    from lit_vce.lightning import VCEModule, VCEPredictionWriter
    from lit_vce.methods import DiGIN

    folder, clf = tiny_sd
    root = tmp_path / "img"
    for k, cls in enumerate(("circle", "square")):
        (root / cls).mkdir(parents=True)
        (tmp_path / "masks" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200, 40 + 80 * k, 10)).save(root / cls / "a.png")
        m = Image.new("L", (40, 40), 0)
        m.paste(255, (8, 8, 32, 32))
        m.save(tmp_path / "masks" / cls / "a.png")
    (tmp_path / "captions.csv").write_text(
        "file,caption\ncircle/a.png,a red circle on a mat\nsquare/a.png,a green square\n"
    )

    def data():
        return VCEDataModule(
            "imagefolder",
            root=str(root),
            image_size=32,
            protocol="next",
            batch_size=2,
            captions=str(tmp_path / "captions.csv"),
            masks=str(tmp_path / "masks"),
            class_names=clf.class_names,
        )

    def method():
        return DiGIN(
            LatentDiffusion(str(folder), num_steps=4),
            num_steps=4,
            outer_steps=1,
            null_text_steps=1,
            num_cutouts=1,
            injection_fractions=(0.5,),
            blend_fractions=(0.5,),
            mask_source="batch",
        )

    module = VCEModule(
        classifier=clf,
        method=method(),
        fid_features="none",
        world_audit=False,
        lpips="off",
        deterministic=True,
        interval_resamples=0,
        fid_interval_resamples=0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        inference_mode=False,
        enable_model_summary=False,
        callbacks=[VCEPredictionWriter(str(tmp_path / "run"))],
    )
    dm = data()
    trainer.predict(module, dm, return_predictions=False)
    rows = {r["sample_id"]: r for r in csv.DictReader((tmp_path / "run" / "samples.csv").open())}
    assert len(rows) == 2 and all(r["diag_caption_used"] == "1.0" for r in rows.values())
    assert all(0 < float(r["diag_mask_fraction"]) < 1 for r in rows.values())

    dm = data()
    dm.setup("predict")
    batch = collate([dm.dataset[i] for i in range(len(dm.dataset))])
    out = explain(
        batch["image"],
        batch["target"],
        classifier=clf,
        method=method(),
        sources=batch["source"],
        sample_ids=batch["sample_id"],
        deterministic=True,
        masks=batch["mask"],
        captions=batch["caption"],
        metrics=False,
    )
    for j, sid in enumerate(batch["sample_id"]):
        saved = load_png(tmp_path / "run" / "counterfactuals" / f"{sample_key(sid)}.png")
        assert torch.equal(saved, out.counterfactuals[j]), sid
        assert float(rows[sid]["diag_mask_fraction"]) == pytest.approx(out.rows[j]["diagnostics"]["mask_fraction"])
    with pytest.raises(ValueError, match="masks: shape"):
        explain(batch["image"], batch["target"], classifier=clf, method=method(), masks=batch["mask"][:1])
    with pytest.raises(ValueError, match="one caption per image"):
        explain(batch["image"], batch["target"], classifier=clf, method=method(), captions=["a"])
