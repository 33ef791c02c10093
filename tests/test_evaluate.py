"""`lit-vce evaluate`: re-reading saved images, plain folder pairs, bad input, DDP == one
process, Inception FID with offline weights against torch-fidelity, latent L1/L2."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_vce.cli import main

CG = str(Path(__file__).resolve().parents[1] / "configs" / "world" / "classifier_guidance.yaml")


@pytest.fixture(scope="module")
def world_run(tmp_path_factory) -> Path:
    """A small predict run on the world (7 samples: uneven over 2 processes)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    main(
        [
            "predict",
            "--config",
            CG,
            "--model.method.init_args.num_steps",
            "6",
            "--data.num_samples",
            "7",
            "--data.batch_size",
            "4",
            "--writer.output_dir",
            str(out),
            "--model.second_classifier",
            "oracle",
        ]
    )
    return out


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}


def test_evaluate_rereads_a_run_and_matches_the_inline_metrics(world_run):
    main(["evaluate", str(world_run), "--second-classifier", "oracle", "--world-audit"])
    inline = json.loads((world_run / "results.json").read_text())
    ev = json.loads((world_run / "evaluation" / "results.json").read_text())
    assert ev["stage"] == "evaluate" and ev["method"] == inline["method"] == "classifier_guidance"
    assert ev["classifier"] == "biased" and ev["n"] == 7 and ev["sample_ids_hash"] == inline["sample_ids_hash"]
    a, b = _numeric(inline["metrics"]), _numeric(ev["metrics"])
    assert set(a) == set(b) and {"fid", "sfid", "cout", "l1", "l2", "flip_rate_independent"} <= set(a)
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), k
    assert ev["audit"] == inline["audit"]
    table = list(csv.DictReader((world_run / "evaluation" / "samples.csv").open()))
    assert len(table) == 7
    assert np.mean([float(r["cout"]) for r in table]) == pytest.approx(b["cout"], rel=1e-5)


def test_metrics_selects_what_is_computed_and_the_rest_is_unchanged(world_run, tmp_path, capsys):
    full = json.loads((world_run / "results.json").read_text())["metrics"]
    out = tmp_path / "fid_only"
    main(["evaluate", str(world_run), "--metrics", "fid", "--second-classifier", "oracle", "--out", str(out)])
    got = json.loads((out / "results.json").read_text())["metrics"]
    assert not {"sfid", "cout", "flip_rate_independent"} & set(got)  # neither computed nor loaded
    for k in ("fid", "fid_successful", "flip_rate", "target_confidence", "l1", "l2"):
        assert got[k] == pytest.approx(full[k], rel=1e-6, nan_ok=True), k
    assert next(csv.DictReader((out / "samples.csv").open())).get("cout") in (None, "")  # its column stays empty
    with pytest.raises(SystemExit):
        main(["evaluate", str(world_run), "--metrics", "fid,speed", "--out", str(tmp_path / "bad")])
    assert "unknown metric(s) speed: choose from fid, sfid" in capsys.readouterr().err


def test_predict_computes_only_the_selected_metrics_and_evaluate_keeps_the_selection(world_run, tmp_path, capsys):
    full = json.loads((world_run / "results.json").read_text())
    run = tmp_path / "no_cout"
    args = ["predict", "--config", CG, "--model.method.init_args.num_steps", "6", "--data.num_samples", "7"]
    main([*args, "--data.batch_size", "4", "--model.metrics", "sfid,fid", "--writer.output_dir", str(run)])
    res = json.loads((run / "results.json").read_text())
    assert res["config"]["metric_settings"]["metrics"] == "fid,sfid"  # stored in the canonical order
    assert not {"cout", "cout_source_correct", "lpips"} & set(res["metrics"])
    for k in ("fid", "sfid", "flip_rate", "target_confidence", "l1", "l2"):  # the same samples and figures
        assert res["metrics"][k] == pytest.approx(full["metrics"][k], rel=1e-6, nan_ok=True), k
    main(["evaluate", str(run), "--out", str(tmp_path / "ev")])  # the run's selection
    assert "cout" not in json.loads((tmp_path / "ev" / "results.json").read_text())["metrics"]
    main(["evaluate", str(run), "--metrics", "cout", "--out", str(tmp_path / "ev_cout")])  # unless told
    assert json.loads((tmp_path / "ev_cout" / "results.json").read_text())["metrics"]["cout"] == pytest.approx(
        full["metrics"]["cout"], rel=1e-6
    )
    with pytest.raises(SystemExit):
        main([*args, "--model.metrics", "fid,cuot", "--writer.output_dir", str(tmp_path / "bad")])
    assert "unknown metric(s) cuot: choose from fid, sfid" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_frechet_distance_matches_the_general_eigenvalue_route():
    from lit_vce.metrics.vce import frechet_distance

    g = torch.Generator().manual_seed(0)
    for n in (20, 300):  # rank-deficient and full-rank covariances of 64-d features
        a = torch.randn(n, 64, generator=g, dtype=torch.float64)
        b = 1.3 * torch.randn(n, 64, generator=g, dtype=torch.float64) + 0.2
        mu1, c1, mu2, c2 = a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)
        ref = (
            ((mu1 - mu2) ** 2).sum()
            + c1.trace()
            + c2.trace()
            - 2 * torch.linalg.eigvals(c1 @ c2).real.clamp_min(0).sqrt().sum()
        )
        assert float(frechet_distance(mu1, c1, mu2, c2)) == pytest.approx(float(ref), rel=1e-7)
        assert abs(float(frechet_distance(mu1, c1, mu1, c1))) < 1e-7 * float(c1.trace())


def test_two_processes_give_the_one_process_numbers_with_uneven_shards(world_run, tmp_path, monkeypatch):
    from lit_vce.testing import save_random_alexnet_weights

    # LPIPS too, its backbone given by path (random weights stand in)
    alexnet = save_random_alexnet_weights(tmp_path / "w" / "alexnet.pth")
    monkeypatch.setenv("LIT_VCE_LPIPS_WEIGHTS", str(alexnet))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    outs = {}
    for devices in (1, 2):
        out = tmp_path / f"p{devices}"
        cmd = [
            sys.executable,
            "-m",
            "lit_vce.cli",
            "evaluate",
            str(world_run),
            "--out",
            str(out),
            "--accelerator",
            "cpu",
            "--devices",
            str(devices),
            "--batch-size",
            "2",
            "--second-classifier",
            "oracle",
            "--world-audit",
        ]
        if devices == 1:  # the reference runs in this process (one start-up less)
            main(cmd[3:])
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
        outs[devices] = json.loads((out / "results.json").read_text())
    one, two = outs[1], outs[2]
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["n"] == one["n"] == 7
    a, b = _numeric(one["metrics"]), _numeric(two["metrics"])
    assert set(a) == set(b) and {"lpips", "fid", "sfid", "cout", "flip_rate_independent"} <= set(a)
    # the reductions are exact (sum/cat states); what differs is the float rounding of
    # batched forwards when the shards change the batch composition
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-8), k
    assert one["audit"] == two["audit"]
    # every sample is in the table exactly once
    rows = list(csv.DictReader((tmp_path / "p2" / "samples.csv").open()))
    assert len({r["sample_id"] for r in rows}) == len(rows) == 7


def _pair_folders(tmp_path: Path, world_run: Path) -> tuple[Path, Path, Path]:
    o, c = tmp_path / "orig", tmp_path / "cf"
    o.mkdir(), c.mkdir()
    rows = json.loads((world_run / "results.json").read_text())
    table = list(csv.DictReader((world_run / "samples.csv").open()))
    from lit_vce.io import sample_key

    lines = ["file,source,target"]
    for i, r in enumerate(table[:4]):
        key = sample_key(r["sample_id"])
        name = f"img{i}.png"
        (o / name).write_bytes((world_run / "originals" / f"{key}.png").read_bytes())
        (c / name).write_bytes((world_run / "counterfactuals" / f"{key}.png").read_bytes())
        target = r["target"] if i else "square"  # a class name works too (world class 1)
        lines.append(f"{name},{r['source']},{target}")
    del rows
    # bad samples: a missing counterfactual, a corrupt one, a size mismatch
    for name in ("missing.png", "corrupt.png", "small.png"):
        (o / name).write_bytes((o / "img1.png").read_bytes())
        lines.append(f"{name},0,2")
    (c / "corrupt.png").write_bytes(b"\x89PNG not really")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(c / "small.png")
    targets = tmp_path / "targets.csv"
    targets.write_text("\n".join(lines) + "\n")
    return o, c, targets


def test_plain_folders_with_bad_samples_become_failure_rows(world_run, tmp_path):
    from lit_vce.data.world import CLASS_NAMES

    o, c, targets = _pair_folders(tmp_path, world_run)
    assert CLASS_NAMES[1] == "square"
    out = tmp_path / "ev"
    main(
        [
            "evaluate",
            "--originals",
            str(o),
            "--counterfactuals",
            str(c),
            "--targets",
            str(targets),
            "--classifier",
            "biased",
            "--method",
            "elsewhere",
            "--out",
            str(out),
        ]
    )
    res = json.loads((out / "results.json").read_text())
    # the accounting rule: the 3 bad samples were attempted, failed and count as not flipped
    assert res["method"] == "elsewhere" and res["n"] == 7 and res["n_failed"] == 3
    assert res["metrics"]["flip_rate"] == pytest.approx(res["n_success"] / 7) and res["n_success"] <= 4
    rows = {r["sample_id"]: r for r in csv.DictReader((out / "samples.csv").open())}
    assert rows["img0.png"]["target"] == "1"
    assert "missing counterfactual" in rows["missing.png"]["failure"]
    assert "unreadable counterfactual" in rows["corrupt.png"]["failure"]
    assert "size mismatch" in rows["small.png"]["failure"]
    assert not rows["img2.png"]["failure"]


@pytest.mark.parametrize(
    "csv_text, message",
    [
        ("file,source,target\nimg0.png,0,9\n", "unknown to the classifier"),
        ("file,source,target\n", "lists no samples"),
        ("file,target\nimg0.png,1\n", "missing column"),
        ("file,source,target\nimg0.png,0,zebra\n", "unknown target class 'zebra'"),
        ("file,source,target\n../img0.png,0,1\n", "relative path"),
    ],
)
def test_bad_whole_input_is_a_clear_error_and_writes_nothing(world_run, tmp_path, capsys, csv_text, message):
    o, c, _ = _pair_folders(tmp_path, world_run)
    bad = tmp_path / "bad.csv"
    bad.write_text(csv_text)
    out = tmp_path / "ev"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "evaluate",
                "--originals",
                str(o),
                "--counterfactuals",
                str(c),
                "--targets",
                str(bad),
                "--classifier",
                "biased",
                "--out",
                str(out),
            ]
        )
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", str(tmp_path)])
    assert "not a predict run folder" in capsys.readouterr().err


def test_inception_fid_uses_offline_weights_and_matches_torch_fidelity(tmp_path, monkeypatch):
    import torch_fidelity

    from lit_vce.errors import MissingWeightsError
    from lit_vce.io import load_png
    from lit_vce.metrics import FeatureFID
    from lit_vce.metrics.features import INCEPTION_FILE, InceptionFeatures
    from lit_vce.testing import save_random_inception_weights

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("LIT_VCE_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(MissingWeightsError, match=INCEPTION_FILE):
        InceptionFeatures()
    path = save_random_inception_weights(tmp_path / "elsewhere" / "inception.pth")
    monkeypatch.setenv("LIT_VCE_INCEPTION_WEIGHTS", str(path))
    features = InceptionFeatures()
    assert features.weights_path == str(path)
    rng = np.random.default_rng(0)
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        for i in range(10):
            arr = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            if side == "b":
                arr = (arr.astype(float) ** 2 / 255).astype(np.uint8)  # a different distribution
            Image.fromarray(arr).save(tmp_path / side / f"{i}.png")
    fid = FeatureFID(features, 2048)
    for side, real in (("a", True), ("b", False)):
        fid.update(torch.stack([load_png(p) for p in sorted((tmp_path / side).glob("*.png"))]), real=real)
    with pytest.warns(UserWarning, match="rank-deficient"):
        ours = float(fid.compute())
    ref = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "a"),
        input2=str(tmp_path / "b"),
        fid=True,
        cuda=False,
        verbose=False,
        feature_extractor_weights_path=str(path),
    )
    ref = ref["frechet_inception_distance"]
    assert ref > 1 and ours == pytest.approx(ref, rel=1e-4)


def test_latent_distances_and_declared_resolution(tmp_path, tiny_classifier):
    from diffusers import AutoencoderKL

    from lit_vce.metrics.suite import VCEMetrics

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    suite = VCEMetrics(tiny_classifier, features=None, autoencoder=str(tmp_path / "vae"), resolution=32)
    x, y = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    rows = suite.update(x, y, torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), ["a", "b", "c"])
    with torch.no_grad():
        zx, zy = (vae.encode(v * 2 - 1).latent_dist.mean * vae.config.scaling_factor for v in (x, y))
    expect = (zy - zx).flatten(1).abs().sum(1)
    assert [r["latent_l1"] for r in rows] == pytest.approx(expect.tolist(), rel=1e-5)
    up = [
        torch.nn.functional.interpolate(v, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        for v in (x, y)
    ]
    assert [r["l2"] for r in rows] == pytest.approx((up[1] - up[0]).flatten(1).norm(dim=1).tolist(), rel=1e-5)
    metrics, _, n = suite.compute()
    assert n == 3 and metrics["latent_l1"] == pytest.approx(float(expect.mean()), rel=1e-5)
    assert metrics["latent_l2"] > 0 and "fid" not in metrics
    suite.reset()
    suite.update(x, x.clone(), torch.tensor([0]).repeat(3), torch.tensor([1]).repeat(3), ["a", "b", "c"])
    assert suite.compute()[0]["latent_l2"] == 0


def test_evaluate_inherits_the_runs_metric_settings_and_keeps_its_generation_time(world_run, tmp_path):
    import shutil

    out = tmp_path / "ev"
    main(["evaluate", str(world_run), "--out", str(out)])  # no flags: the run's second classifier and audit
    inline = json.loads((world_run / "results.json").read_text())
    ev = json.loads((out / "results.json").read_text())
    assert "flip_rate_independent" in ev["metrics"] and ev["audit"] == inline["audit"] is not None
    assert ev["wall_time_s"] == pytest.approx(inline["wall_time_total_s"]) and ev["evaluation_time_s"] > 0
    # a counterfactual without its sample record is listed as a failure, not dropped
    run = tmp_path / "run"
    shutil.copytree(world_run, run)
    shutil.rmtree(run / "evaluation", ignore_errors=True)
    gone = sorted((run / "samples").glob("*.json"))[0]
    gone.unlink()
    main(["evaluate", str(run), "--out", str(tmp_path / "ev2")])
    rows = list(csv.DictReader((tmp_path / "ev2" / "samples.csv").open()))
    assert len(rows) == 7
    missing = [r for r in rows if r["failure"]]
    assert len(missing) == 1 and f"samples/{gone.stem}.json is missing" in missing[0]["failure"]
