"""End to end through Lightning: predict, writer, resume, bad input, DDP == one process."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lit_vce.cli import main
from lit_vce.classifiers import ImageClassifier
from lit_vce.data import VCEDataModule
from lit_vce.lightning import VCEModule, VCEPredictionWriter
from lit_vce.methods import ClassifierGuidance
from lit_vce.world.models import SmallCNN

FAST = ["--model.method.init_args.num_steps", "6", "--data.num_samples", "6", "--data.batch_size", "4"]
CG = str(Path(__file__).resolve().parents[1] / "configs" / "world" / "classifier_guidance.yaml")


def _pngs(d: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted((d / "counterfactuals").glob("*.png"))}


def test_cli_predict_writes_results_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    main(["predict", "--config", CG, *FAST, "--writer.output_dir", str(out), "--model.second_classifier", "oracle"])
    res = json.loads((out / "results.json").read_text())
    # FID under both conventions, each with its N
    assert res["metrics"]["fid_n"] == 6
    for key in ("method", "classifier", "n", "seed", "versions", "wall_time_s"):
        assert key in res
    for key in ("flip_rate", "target_confidence", "l1", "l2", "fid", "sfid", "cout"):
        assert np.isfinite(res["metrics"][key])
    assert res["n"] == 6 and set(res["audit"]) == {"n_success", "shape_changed", "background_only"}
    lo, hi = res["intervals"]["background_only"]  # the audit's figures carry intervals too
    if res["audit"]["n_success"] > 1:
        assert lo <= res["audit"]["background_only"] <= hi
    rows = (out / "samples.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("sample_id,source,target")
    # per-sample values are kept: the aggregate is recomputable from the table
    import csv

    table = list(csv.DictReader((out / "samples.csv").open()))
    assert np.mean([float(r["l1"]) for r in table]) == pytest.approx(res["metrics"]["l1"], rel=1e-4)
    successes = sum(1 for r in table if r["success"] == "True")
    assert res["metrics"]["fid_successful_n"] == successes == res["n_success"]
    # the audit reads the flipped VCEs: successes whose original was not already read as the target
    flipped = sum(r["success"] == "True" and r["pred_before"] != r["target"] for r in table)
    assert res["audit"]["n_success"] == flipped
    m = res["metrics"]
    assert m["flip_rate"] == pytest.approx(successes / 6)
    assert m["flip_rate_independent"] == pytest.approx(sum(r["success_independent"] == "True" for r in table) / 6)
    assert m["target_confidence"] == pytest.approx(np.mean([float(r["target_conf_after"]) for r in table]), rel=1e-5)
    assert m["target_confidence_independent"] > 0
    first = _pngs(out)
    assert len(first) == 6 and (out / "grid.png").is_file()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "counterfactuals").glob("*.png")}
    capsys.readouterr()
    # same command again: everything is skipped, nothing rewritten, same numbers
    main(["predict", "--config", CG, *FAST, "--writer.output_dir", str(out)])
    assert "6 samples already finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "counterfactuals").glob("*.png")} == mtimes
    res2 = json.loads((out / "results.json").read_text())
    assert res2["resumed"] == 6 and res2["n"] == 6
    for key in ("flip_rate", "l1", "l2", "fid", "sfid", "cout"):  # (COUT near 0: 3e-9 apart measured)
        assert res2["metrics"][key] == pytest.approx(res["metrics"][key], rel=1e-6, abs=1e-7)


def test_inference_mode_trainer_is_refused_with_a_clear_message(tmp_path):
    module = VCEModule(
        classifier="robust", method=ClassifierGuidance(num_steps=4), fid_features="none", world_audit=False
    )
    dm = VCEDataModule(num_samples=2, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        inference_mode=True,
        callbacks=[VCEPredictionWriter(str(tmp_path))],
    )
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        trainer.predict(module, dm, return_predictions=False)


def _folder(tmp_path: Path, classes=("ant", "bee")) -> Path:
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    (root / classes[0] / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def _two_class_classifier():
    torch.manual_seed(0)
    return ImageClassifier(SmallCNN(num_outputs=2, width=8), 32, ["ant", "bee"], name="tiny2")


def test_corrupt_image_is_a_recorded_failure_and_the_run_continues(tmp_path):
    root = _folder(tmp_path)
    out = tmp_path / "run"
    module = VCEModule(classifier=_two_class_classifier(), method=ClassifierGuidance(num_steps=4), world_audit=False)
    dm = VCEDataModule(dataset="imagefolder", root=str(root), image_size=32, protocol="next", batch_size=3)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        inference_mode=False,
        callbacks=[VCEPredictionWriter(str(out))],
    )
    trainer.predict(module, dm, return_predictions=False)
    rows = {r["sample_id"]: r for r in (json.loads(p.read_text()) for p in (out / "samples").glob("*.json"))}
    assert len(rows) == 5
    broken = rows["ant/broken.jpg->1"]
    assert "unreadable image" in broken["failure"] and broken["success"] is False
    assert sum(1 for r in rows.values() if not r["failure"]) == 4
    assert len(list((out / "counterfactuals").glob("*.png"))) == 4
    res = json.loads((out / "results.json").read_text())
    # the accounting rule: the unreadable image was attempted, failed, and counts as not flipped
    assert res["n"] == 5 and res["n_failed"] == 1 and res["n_success"] <= 4
    assert res["metrics"]["flip_rate"] == pytest.approx(res["n_success"] / 5)
    assert res["warnings"] == ["1 of 5 failed"]


def test_bad_classes_stop_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="target equals the source"):
        VCEDataModule(protocol="pairs", pairs=[[1, 1]]).setup()
    with pytest.raises(ValueError, match="unknown class id 7"):
        VCEDataModule(protocol="fixed", target=7).setup()
    # a folder with 3 classes explained by a 2-class classifier: refused before any sample is written
    root = _folder(tmp_path, ("ant", "bee", "cat"))
    out = tmp_path / "run"
    module = VCEModule(classifier=_two_class_classifier(), method=ClassifierGuidance(num_steps=4), world_audit=False)
    dm = VCEDataModule(dataset="imagefolder", root=str(root), image_size=32, protocol="next")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        inference_mode=False,
        callbacks=[VCEPredictionWriter(str(out))],
    )
    with pytest.raises(ValueError, match=r"class ids \[2\] are unknown"):
        trainer.predict(module, dm, return_predictions=False)
    assert not list((out / "samples").glob("*.json"))


#: each per-step method and DiG-IN with few steps (the settings of its test_kwargs)
DDP_METHODS = {
    "classifier_guidance": ["--model.method.init_args.num_steps", "6"],
    "dvce": ["--model.method.init_args.num_steps", "10"],
    "dime": ["--model.method.init_args.num_steps", "10", "--model.method.init_args.max_inner_steps", "2"],
    "fastdime": ["--model.method.init_args.num_steps", "10"],
    "maskdime": ["--model.method.init_args.num_steps", "10"],
    "ldce": ["--model.method.init_args.num_steps", "10"],
    "digin": [
        "--model.method.init_args.num_steps",
        "8",
        "--model.method.init_args.search.injection_fractions",
        "[0.3, 0.5]",
        "--model.method.init_args.optimisation.outer_steps",
        "2",
        "--model.method.init_args.optimisation.num_cutouts",
        "2",
        "--model.method.init_args.inversion.null_text_steps",
        "2",
    ],
}

#: runs each command of the JSON list given as its argument, in one process of a launch
_RUN_EACH = "import json, sys\nfrom lit_vce.cli import main\nfor cmd in json.load(open(sys.argv[1])):\n    main(cmd)\n"


def _ddp_args(method: str, out: Path, devices: int) -> list[str]:
    n = 3 if method == "digin" else 5  # uneven shards either way (3 and 2, 2 and 1)
    return [
        "predict",
        "--config",
        f"world/{method}",
        *DDP_METHODS[method],
        "--data.num_samples",
        str(n),
        "--data.batch_size",
        "2" if devices == 2 else str(n),
        "--writer.output_dir",
        str(out),
        "--trainer.devices",
        str(devices),
        "--model.deterministic",
        "true",
        *(["--trainer.strategy", "ddp"] if devices == 2 else []),
    ]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> Path:
    """Every method's two-process run, all in one torchrun launch of two CPU processes (one
    start-up instead of one per method; each process runs the seven predicts in turn, the
    process group made by the first and reused)."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "cmds.json").write_text(json.dumps([_ddp_args(m, root / m, 2) for m in DDP_METHODS]))
    (root / "run_each.py").write_text(_RUN_EACH)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, str(root / "run_each.py"), str(root / "cmds.json")], capture_output=True, text=True, timeout=900, env=env
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("method", list(DDP_METHODS))
def test_two_ddp_processes_give_the_images_and_metrics_of_one(tmp_path, method, two_process_runs):
    """devices=2 (DDP over gloo, batch 2) vs devices=1 (one batch), deterministic mode:
    byte-identical PNGs and the same metrics and intervals, for every per-step method
    and DiG-IN."""
    n = 3 if method == "digin" else 5
    main(_ddp_args(method, tmp_path / "d1", 1))  # the one-process reference runs in this process
    runs = {d: two_process_runs / method if d == 2 else tmp_path / "d1" for d in (1, 2)}
    runs = {d: (json.loads((out / "results.json").read_text()), _pngs(out)) for d, out in runs.items()}
    (r1, p1), (r2, p2) = runs[1], runs[2]
    assert r1["world_size"] == 1 and r2["world_size"] == 2 and r2["method"] == r1["method"]
    assert r1["n"] == r2["n"] == n and r1["n_failed"] == r2["n_failed"] == 0
    assert p1.keys() == p2.keys() and len(p1) == n
    max_diff = max(np.abs(p1[k] - p2[k]).max() for k in p1)
    assert max_diff == 0, f"max pixel difference {max_diff}/255"
    assert r1["n_success"] == r2["n_success"]
    for key, value in r1["metrics"].items():
        if isinstance(value, float):
            assert r2["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
    # the bootstrap resamples samples ordered by key: the same intervals on 2 processes as on 1
    assert set(r1["intervals"]) >= {"flip_rate", "l1", "l2", "fid", "cout"} | ({"sfid"} if n >= 4 else set())
    for key, ci in r1["intervals"].items():
        assert r2["intervals"][key] == pytest.approx(ci, rel=1e-5, nan_ok=True), key


def test_lpips_in_predict_when_weights_are_present_and_required_on_demand(tmp_path, monkeypatch):
    import torchvision

    from lit_vce.errors import MissingWeightsError
    from lit_vce.metrics.lpips import ALEXNET_FILE

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(MissingWeightsError, match=ALEXNET_FILE):
        VCEModule(classifier="robust", method=ClassifierGuidance(num_steps=4), lpips="on")
    assert VCEModule(classifier="robust", method=ClassifierGuidance(num_steps=4)).metrics.lpips is None  # auto: skipped
    ckpt = tmp_path / "w" / "lpips" / "checkpoints" / ALEXNET_FILE
    ckpt.parent.mkdir(parents=True)
    torch.save(torchvision.models.alexnet().state_dict(), ckpt)
    out = tmp_path / "run"
    main(["predict", "--config", CG, *FAST, "--writer.output_dir", str(out)])
    assert np.isfinite(json.loads((out / "results.json").read_text())["metrics"]["lpips"])


def test_demo_writes_leaderboards_and_the_html_report(tmp_path, capsys):
    from lit_vce.demo import run_demo

    out = tmp_path / "demo"
    table = run_demo(
        out,
        num_samples=4,
        batch_size=4,
        methods=("classifier_guidance",),
        classifiers=("biased", "robust"),
        extra=["--model.method.init_args.num_steps", "4"],
        analyses=False,
    )
    assert table.count("| classifier_guidance |") == 2
    for name in ("leaderboard.md", "leaderboard.html", "leaderboard.tex", "report.html"):
        assert (out / name).is_file(), name
    for clf in ("biased", "robust"):  # each row holds its run's figures, as results.json has them
        res = json.loads((out / f"classifier_guidance-{clf}" / "results.json").read_text())
        row = next(line for line in table.splitlines() if f"| classifier_guidance | {clf} |" in line)
        assert f"{res['metrics']['flip_rate']:.3f}" in row and f"{res['metrics']['l2']:.3f}" in row
        assert f"| {res['n']} ({res['n_success']} ok" in row
    page = (out / "report.html").read_text()
    assert "classifier_guidance · biased" in page and "classifier_guidance · robust" in page
    printed = capsys.readouterr().out
    assert "background only" in printed and "report.html" in printed


def test_predict_takes_a_registered_method_name_and_rejects_empty_runs(tmp_path):
    out = tmp_path / "byname"
    main(
        [
            "predict",
            "--config",
            CG,
            "--model.method",
            "fastdime",
            "--model.method.init_args.num_steps",
            "10",
            "--model.method.init_args.warmup",
            "1",
            "--data.num_samples",
            "2",
            "--data.batch_size",
            "2",
            "--writer.output_dir",
            str(out),
        ]
    )
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "fastdime" and res["n"] == 2
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        VCEDataModule("world", num_samples=0)


def test_resume_removes_stray_temporary_files(tmp_path):
    out = tmp_path / "run"
    main(["predict", "--config", CG, *FAST, "--writer.output_dir", str(out)])
    stray = [out / "samples" / ".x.json.123.tmp", out / "counterfactuals" / ".y.png.9.tmp", out / ".results.json.5.tmp"]
    for p in stray:
        p.write_text("half-written")
    main(["predict", "--config", CG, *FAST, "--writer.output_dir", str(out)])
    assert not any(p.exists() for p in stray)


def test_resuming_into_a_folder_of_another_configuration_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    main(["predict", "--config", CG, *FAST, "--writer.output_dir", str(out)])
    first = json.loads((out / "results.json").read_text())
    table = list(csv.DictReader((out / "samples.csv").open()))
    # generation time is the sum of the per-sample seconds as written
    assert first["attempts"] == 1 and first["wall_time_total_s"] == pytest.approx(
        sum(float(r["seconds"]) for r in table), abs=1e-3
    )
    assert first["s_per_img"] == pytest.approx(first["wall_time_total_s"] / 6, abs=1e-3)
    before = {
        p: p.read_bytes()
        for p in (out / "config.yaml", out / "logs" / "metrics.csv", out / "run.json", out / "results.json")
    }
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(
            [
                "predict",
                "--config",
                CG,
                *FAST,
                "--writer.output_dir",
                str(out),
                "--model.seed",
                "3",
                "--model.method.init_args.scale",
                "5.0",
            ]
        )
    # one line, exit 2, nothing touched
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert re.search(r"another configuration: .*method\.scale \(2\.0 -> 5\.0\).*seed \(0 -> 3\)", err), err
    assert {p: p.read_bytes() for p in before} == before
    assert not (out / ".lock").exists()
    # more samples and another batch size are the same run: resumed, times add up
    main(
        [
            "predict",
            "--config",
            CG,
            *FAST,
            "--writer.output_dir",
            str(out),
            "--data.num_samples",
            "8",
            "--data.batch_size",
            "3",
        ]
    )
    grown = json.loads((out / "results.json").read_text())
    assert grown["n"] == 8 and grown["resumed"] == 6 and grown["attempts"] == 2
    table = list(csv.DictReader((out / "samples.csv").open()))
    assert grown["wall_time_total_s"] == pytest.approx(sum(float(r["seconds"]) for r in table), abs=1e-3)
    assert grown["wall_time_total_s"] > first["wall_time_total_s"]
    main(
        [
            "predict",
            "--config",
            CG,
            *FAST,
            "--writer.output_dir",
            str(out),
            "--model.seed",
            "3",
            "--writer.resume",
            "force",
        ]
    )
    forced = json.loads((out / "results.json").read_text())
    assert forced["attempts"] == 3 and any("--writer.resume force" in w for w in forced["warnings"])


def test_a_run_of_an_older_version_resumes_when_only_none_valued_options_differ(tmp_path, capsys):
    """An option added with default None (off) must not set older runs apart: data.attribute did,
    and resuming every run made before it was refused with an empty list of differences."""
    from lit_vce.lightning.resume import fingerprint_hash

    out = tmp_path / "run"
    main(["predict", "--config", CG, *FAST, "--writer.output_dir", str(out)])
    run = json.loads((out / "run.json").read_text())
    # as an older version wrote it: other None-valued keys, so another hash in run.json and every record
    legacy = {**run["fingerprint"], "data": {**run["fingerprint"]["data"], "attribute": None, "root": None}}
    legacy_hash = fingerprint_hash(legacy)
    assert legacy_hash != run["fingerprint_hash"]
    (out / "run.json").write_text(json.dumps({**run, "fingerprint": legacy, "fingerprint_hash": legacy_hash}))
    for rec in (out / "samples").glob("*.json"):
        (rec).write_text(json.dumps({**json.loads(rec.read_text()), "run_fingerprint": legacy_hash}))
    main(["predict", "--config", CG, *FAST, "--writer.output_dir", str(out), "--data.num_samples", "8"])
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 8 and res["resumed"] == 6
    assert json.loads((out / "run.json").read_text())["equivalent_hashes"] == [legacy_hash]
    main(["predict", "--config", CG, *FAST, "--writer.output_dir", str(out), "--data.num_samples", "8"])  # and again
    assert json.loads((out / "results.json").read_text())["resumed"] == 8
    # a real difference is still refused, and a key one side lacks is named as absent
    run = json.loads((out / "run.json").read_text())
    changed = {**run["fingerprint"], "data": {**run["fingerprint"]["data"], "crop": "center"}}
    (out / "run.json").write_text(json.dumps({"fingerprint": changed, "fingerprint_hash": fingerprint_hash(changed)}))
    for rec in (out / "samples").glob("*.json"):
        (rec).write_text(json.dumps({**json.loads(rec.read_text()), "run_fingerprint": fingerprint_hash(changed)}))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["predict", "--config", CG, *FAST, "--writer.output_dir", str(out)])
    assert "data.crop ('center' -> absent)" in capsys.readouterr().err


def test_class_name_folders_are_mapped_to_the_classifiers_classes_by_name(tmp_path):
    from lit_vce.data.world import ShapesWorld

    # world images in folders named by their shape, in an order unlike the classifier's
    # (circle, square, triangle, cross)
    d = ShapesWorld("balanced", "test", 12)
    names = ("circle", "square", "triangle", "cross")
    for i in range(12):
        it = d[i]
        folder = tmp_path / "img" / names[it["label"]].upper()  # case does not matter
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((it["image"].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(folder / f"{i}.png")
    dm = VCEDataModule(
        "imagefolder", root=str(tmp_path / "img"), image_size=32, protocol="next", class_names=list(names)
    )
    dm.setup()
    base = dm._data.base
    assert {rel.split("/")[0]: lab for rel, lab, _ in base.items} == {
        n.upper(): i for i, n in enumerate(names) if (tmp_path / "img" / n.upper()).is_dir()
    }
    # through the CLI: the classifier's names reach the data, and robust reads the true shapes
    out = tmp_path / "run"
    main(
        [
            "predict",
            "--config",
            CG,
            "--model.classifier",
            "robust",
            "--data.dataset",
            "imagefolder",
            "--data.root",
            str(tmp_path / "img"),
            "--data.image_size",
            "32",
            "--data.num_samples",
            "12",
            "--model.method.init_args.num_steps",
            "4",
            "--writer.output_dir",
            str(out),
        ]
    )
    res = json.loads((out / "results.json").read_text())
    assert res["audit"] is None  # the world audit runs only on world data
    rows = list(__import__("csv").DictReader((out / "samples.csv").open()))
    assert all(r["pred_before"] == r["source"] for r in rows)  # labels by name: robust agrees on every image
    # a folder that names no class of the classifier is an error, not a silent folder order
    (tmp_path / "img" / "HEXAGON").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "img" / "HEXAGON" / "x.png")
    with pytest.raises(ValueError, match=r"\['HEXAGON'\] under .* name no class of the classifier"):
        VCEDataModule("imagefolder", root=str(tmp_path / "img"), image_size=32, class_names=list(names)).setup()


def test_results_record_the_resolved_cli_config(tmp_path):
    out = tmp_path / "run"
    main(["predict", "--config", CG, *FAST, "--writer.output_dir", str(out), "--model.method.init_args.scale", "3.5"])
    res = json.loads((out / "results.json").read_text())
    cli = res["config"]["cli"]
    assert cli["model"]["method"]["init_args"]["scale"] == 3.5 and cli["data"]["num_samples"] == 6
    assert res["config"]["precision"] and res["config"]["dtype"] == "torch.float32"
    assert res["versions"]["lit_vce"] and res["git_sha"]


@pytest.mark.parametrize(
    "spec", ["class_path: FastDiME", "class_path: fastdime", "class_path: lit_vce.methods.fastdime.FastDiME"]
)
def test_a_yaml_config_names_a_method_by_class_name_registered_name_or_path(tmp_path, spec):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"model:\n  method:\n    {spec}\n    init_args:\n      num_steps: 10\n      warmup: 1\n")
    out = tmp_path / "run"
    main(
        [
            "predict",
            "--config",
            CG,
            "--config",
            str(cfg),
            "--data.num_samples",
            "2",
            "--data.batch_size",
            "2",
            "--writer.output_dir",
            str(out),
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "fastdime" and results["config"]["method"]["warmup"] == 1


def test_a_yaml_config_names_a_method_by_its_registered_name_alone(tmp_path):
    from lit_vce.lightning.cli import resolve_method_names

    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  method: dvce\n  seed: 3\n")
    args = resolve_method_names(["--config", str(cfg), "--config=" + str(cfg)])
    for path in (args[1], args[2].partition("=")[2]):
        resolved = yaml.safe_load(Path(path).read_text())
        assert resolved["model"] == {"method": {"class_path": "lit_vce.methods.dvce.DVCE"}, "seed": 3}
    untouched = tmp_path / "plain.yaml"
    untouched.write_text("model:\n  seed: 1\n")
    assert resolve_method_names(["--config", str(untouched)]) == ["--config", str(untouched)]


def test_the_default_demo_runs_the_slow_methods_on_fewer_images_and_full_runs_everything(tmp_path, monkeypatch):
    import lit_vce.lightning.cli as cli
    import lit_vce.demo as demo

    calls = []
    monkeypatch.setattr(cli, "run_predict", lambda args: calls.append(list(args)))
    monkeypatch.setattr(cli, "run_analysis", lambda name, args: calls.append([name, *args]))
    (tmp_path / "lb.md").write_text("| table |")
    monkeypatch.setattr("lit_vce.report.leaderboard.write_leaderboard", lambda out: {"md": tmp_path / "lb.md"})
    monkeypatch.setattr("lit_vce.report.html.write_report", lambda *a, **k: tmp_path / "report.html")

    def images(run_calls):
        return {
            Path(a[a.index("--writer.output_dir") + 1]).name: int(a[a.index("--data.num_samples") + 1])
            for a in run_calls
            if a[0] == "--config"
        }  # predict runs (analysis calls start with their name)

    (tmp_path / "quick").mkdir()
    (tmp_path / "full").mkdir()
    demo.run_demo(tmp_path / "quick")
    quick = images(calls)
    assert len(quick) == 20  # ten methods on both classifiers
    assert quick["classifier_guidance-biased"] == 32 and quick["svce-robust"] == 32
    assert quick["fastdime-robust"] == 24 and quick["dvce-biased"] == 16
    assert quick["digin-biased"] == 8 and quick["ace-robust"] == 4 and quick["dime-biased"] == 4
    assert quick["maskdime-biased"] == 8 and quick["rcsb-robust"] == 4
    assert any(c[0] == "disagree" and "--data.per_class" in c for c in calls)
    assert any(c[0] == "neurons" and "--data.num_samples" in c for c in calls)
    calls.clear()
    demo.run_demo(tmp_path / "full", full=True)
    assert set(images(calls).values()) == {64}
    assert not any("--data.per_class" in c or (c[0] == "neurons" and "--data.num_samples" in c) for c in calls)
