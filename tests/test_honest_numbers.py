"""Numbers a paper can print (issue 24): no failed sample, crashed resume, partial
evaluation or silent default may move a reported figure. Each test reproduces one
defect of the harness before it and asserts the behaviour that replaced it."""

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_vce.cli import main

CG = str(Path(__file__).resolve().parents[1] / "configs" / "world" / "classifier_guidance.yaml")
SMALL = ["--model.method.init_args.num_steps", "4", "--data.batch_size", "4", "--model.second_classifier", "null"]


def _predict(out: Path, n: int = 8, *extra: str) -> dict:
    main(["predict", "--config", CG, *SMALL, "--data.num_samples", str(n), "--writer.output_dir", str(out), *extra])
    return json.loads((out / "results.json").read_text())


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    out = tmp_path_factory.mktemp("honest") / "run8"
    return out, _predict(out, 8)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- 1. failed samples ------------------------------------------------------------
def test_a_run_whose_every_sample_fails_reports_no_flip_no_distance_and_ranks_last(tmp_path, run8):
    from lit_vce.report.leaderboard import load_results, markdown_table

    out = tmp_path / "runs" / "inf"
    res = _predict(out, 8, "--model.method.init_args.scale", "1e39")
    assert res["n"] == 8 and res["n_failed"] == 8 and res["n_success"] == 0
    m = res["metrics"]
    assert m["flip_rate"] == 0 and m["untargeted_flip_rate"] == 0  # was 0.125: a failed sample flipped
    for key in ("l1", "l2", "target_confidence", "cout", "fid"):  # was L2 0.0 and FID -2e-5
        assert np.isnan(m[key]), key
    assert res["warnings"] == ["8 of 8 failed"]
    rows = _rows(out / "samples.csv")
    assert all(r["failure"] and r["success"] == "False" and r["l2"] == "" for r in rows)
    _copy(run8[0], tmp_path / "runs" / "ok")
    table = markdown_table(load_results(tmp_path / "runs"), sort_by="L2")
    body = [line for line in table.splitlines() if line.startswith("| classifier_guidance")]
    assert "8 (0 ok, 8 failed) !" in body[-1] and "8 (0 ok, 8 failed)" not in body[0]  # ranked last by L2, marked
    assert "8 of 8 failed" in table


def test_nan_scale_through_the_api_fails_every_sample_and_flips_none():
    from lit_vce import explain
    from lit_vce.data.world import ShapesWorld

    d = ShapesWorld("balanced", "test", 4)
    x = torch.stack([d[i]["image"] for i in range(4)])
    out = explain(
        x,
        "square",
        classifier="biased",
        method="classifier_guidance",
        num_steps=4,
        scale=float("nan"),
        sources=[0, 0, 2, 3],
    )
    assert out.n == 4 and out.n_failed == 4 and out.n_success == 0 and not out.success.any()
    assert out.metrics["flip_rate"] == 0  # was 0.75
    assert np.isnan(out.metrics["l2"]) and all("non-finite" in r["failure"] for r in out.rows)
    assert torch.isfinite(out.counterfactuals).all()


def test_evaluate_counts_unreadable_counterfactuals_as_attempted_failures(tmp_path, run8, capsys):
    from lit_vce.report.leaderboard import load_results, markdown_table

    run = _copy(run8[0], tmp_path / "runs" / "broken")
    pngs = sorted((run / "counterfactuals").glob("*.png"))
    for p in pngs[:4]:
        p.write_bytes(p.read_bytes()[:40])  # truncated
    main(["evaluate", str(run), "--fid-interval-resamples", "0"])
    ev = json.loads((run / "evaluation" / "results.json").read_text())
    rows = _rows(run / "evaluation" / "samples.csv")
    ok = [r for r in rows if not r["failure"]]
    assert ev["n"] == 8 and ev["n_failed"] == 4 and len(ok) == 4
    # was 1.000 at N=4: the denominator is every attempted sample
    assert ev["metrics"]["flip_rate"] == pytest.approx(sum(r["success"] == "True" for r in ok) / 8)
    assert ev["metrics"]["flip_rate"] <= 0.5
    assert all("sha256" in r["failure"] or "unreadable" in r["failure"] for r in rows if r["failure"])
    assert np.mean([float(r["l2"]) for r in ok]) == pytest.approx(ev["metrics"]["l2"], rel=1e-5)
    table = markdown_table(load_results(tmp_path / "runs"))
    assert "8 (" in table and "4 failed) !" in table


def test_a_smaller_run_into_a_larger_folder_reports_its_own_samples(tmp_path, run8, capsys):
    run = _copy(run8[0], tmp_path / "run")
    res = _predict(run, 4)
    assert res["n"] == 4 and res["n_success"] <= 4 and res["resumed"] == 4  # was n=4, n_success=5
    assert len(_rows(run / "samples.csv")) == 4
    assert res["metrics"]["flip_rate"] == pytest.approx(res["n_success"] / 4)
    assert "4 other finished samples" in capsys.readouterr().out


def test_compare_states_the_pairs_each_metric_used(tmp_path, run8, capsys):
    from lit_vce.report.compare import compare_runs, format_comparison

    a = run8[0]
    b = tmp_path / "half"
    _predict(b, 8, "--model.method.init_args.scale", "4.0")
    # fail half of B: its records say so, the table is rebuilt by evaluate
    for p in sorted((b / "counterfactuals").glob("*.png"))[:4]:
        p.write_bytes(b"broken")
    main(["evaluate", str(b), "--fid-interval-resamples", "0"])
    r = compare_runs(a, b, resamples=200)
    assert r["n_paired"] == 8 and r["n_failed_b"] == 4
    assert r["metrics"]["flip_rate"]["n"] == 8  # a failed sample counts, as not flipped
    for m in ("l1", "l2", "target_confidence"):
        assert r["metrics"][m]["n"] == 4  # measured over the 4 pairs both runs measured
    ev = json.loads((b / "evaluation" / "results.json").read_text())
    assert r["metrics"]["flip_rate"]["mean_b"] == pytest.approx(
        ev["metrics"]["flip_rate"]
    )  # the same as the leaderboard's
    text = format_comparison(r)
    assert "4 of them failed" in text and " N " in text.splitlines()[1]


# --- 2. crashed and concurrent runs ------------------------------------------------
def _cli(*args, quiet: bool = False):
    """``lit-vce ARGS`` in a child process (``quiet``: its output discarded, so an unread pipe never blocks it)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "LIT_VCE_DEBUG": "0"}
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "lit_vce.cli", *args], stdout=out, stderr=out, text=True, env=env)


@pytest.mark.slow
def test_a_killed_run_resumed_with_another_seed_is_refused_in_one_line_and_time_is_kept(tmp_path, capsys):
    out = tmp_path / "run"
    # 20 steps a sample: slow enough that the kill lands before the last one on a loaded machine
    args = [
        "predict",
        "--config",
        CG,
        "--model.method.init_args.num_steps",
        "20",
        "--data.batch_size",
        "1",
        "--data.num_samples",
        "8",
        "--writer.output_dir",
        str(out),
        "--model.second_classifier",
        "null",
    ]
    proc = _cli(*args, quiet=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((out / "samples").glob("*.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list((out / "samples").glob("*.json")))
    assert 3 <= written < 8 and not (out / "results.json").exists()
    killed = {
        json.loads(p.read_text())["sample_id"]: json.loads(p.read_text())["seconds"]
        for p in (out / "samples").glob("*.json")
    }
    assert all(v > 0 for v in killed.values())
    assert json.loads((out / "run.json").read_text())["fingerprint"]["seed"] == 0  # before the first sample
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # in this process: one start-up less, the same CLI
        main([*args, "--model.seed", "1"])
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("lit-vce")]
    assert refused.value.code == 2 and len(err) == 1 and "seed (0 -> 1)" in err[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before  # nothing touched
    # the same configuration resumes; the killed attempt's generation time is kept
    main(args)
    res = json.loads((out / "results.json").read_text())
    rows = _rows(out / "samples.csv")
    assert res["n"] == 8 and res["resumed"] == written and res["attempts"] == 2 and {r["seed"] for r in rows} == {"0"}
    # every sample's generation time is in the sum, the killed attempt's included (it was lost: attempts 1)
    assert res["wall_time_total_s"] == pytest.approx(sum(float(r["seconds"]) for r in rows), abs=1e-3)
    assert {r["sample_id"]: float(r["seconds"]) for r in rows if r["sample_id"] in killed} == pytest.approx(killed)
    assert res["s_per_img"] == pytest.approx(res["wall_time_total_s"] / 8, abs=1e-3)


def test_a_second_process_on_a_locked_folder_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    from lit_vce.lightning.lock import RunLock

    out = tmp_path / "run"
    lock = RunLock(out)
    lock.acquire()  # a live holder (this process)
    try:
        with pytest.raises(SystemExit) as e:
            main(["predict", "--config", CG, *SMALL, "--data.num_samples", "2", "--writer.output_dir", str(out)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and "in use by process" in err
        assert not (out / "samples").exists() and not (out / "config.yaml").exists()
    finally:
        lock.release()
    # a lock left by a process that no longer exists (kill -9) is stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "token": "x"}))
    res = _predict(out, 2)
    assert res["n"] == 2 and not (out / ".lock").exists()  # released at the end


@pytest.mark.slow
def test_two_processes_started_on_one_folder_one_runs_the_other_refuses(tmp_path):
    out = tmp_path / "run"
    # enough work (8 samples, 20 steps) that the first still holds the folder when the second claims it
    args = [
        "predict",
        "--config",
        CG,
        *SMALL,
        "--data.num_samples",
        "8",
        "--model.method.init_args.num_steps",
        "20",
        "--writer.output_dir",
        str(out),
    ]
    first = _cli(*args)
    time.sleep(0.3)
    second = _cli(*args, "--model.seed", "1")
    (_o1, e1), (_o2, e2) = first.communicate(timeout=600), second.communicate(timeout=600)
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], (e1[-1500:], e2[-1500:])
    loser_err = e2 if second.returncode == 2 else e1
    assert "in use by process" in loser_err and "Traceback" not in loser_err
    winner_seed = 1 if second.returncode == 0 else 0
    res = json.loads((out / "results.json").read_text())
    rows = _rows(out / "samples.csv")
    assert res["seed"] == winner_seed and {r["seed"] for r in rows} == {str(winner_seed)} and res["n"] == 8


def test_waiting_for_the_lock_takes_it_when_the_holder_leaves(tmp_path):
    import threading

    from lit_vce.lightning.lock import RunFolderLocked, RunLock

    a = RunLock(tmp_path)
    a.acquire()
    with pytest.raises(RunFolderLocked, match=r"is in use by process \d+ on .*one run writes into a folder at a time"):
        RunLock(tmp_path).acquire()
    threading.Timer(0.3, a.release).start()
    b = RunLock(tmp_path, wait_s=10)
    b.acquire()
    assert b.held and json.loads((tmp_path / ".lock").read_text())["token"] == b.token
    b.release()


# --- 4. corrupt files ----------------------------------------------------------------
def test_corrupt_files_are_regenerated_on_resume_and_failed_by_evaluate_and_the_report(tmp_path, run8, capsys):
    from lit_vce.report.html import write_report

    run = _copy(run8[0], tmp_path / "run")
    rows = {r["sample_id"]: r for r in _rows(run / "samples.csv")}
    records = sorted((run / "samples").glob("*.json"))
    keys = [p.stem for p in records]
    cf, orig = run / "counterfactuals" / f"{keys[0]}.png", run / "originals" / f"{keys[1]}.png"
    cf.write_bytes(cf.read_bytes()[:50])  # truncated counterfactual
    orig.write_bytes(orig.read_bytes()[:50])  # truncated original
    # a single bit flipped inside the image data: the PNG may still decode; its sha256 does not match
    flipped = run / "counterfactuals" / f"{keys[2]}.png"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    from lit_vce.report.html import Run

    write_report([run], tmp_path / "report.html", examples=8)  # no crash (it was OSError: image file is truncated)
    r = Run(run)
    sids = [json.loads(p.read_text())["sample_id"] for p in records[:3]]
    for sid, side in zip(sids, ("counterfactual", "original", "counterfactual")):
        image, problem = r.load(sid, side)
        assert image is None and "does not match its recorded sha256" in problem and str(run) in problem
    main(["evaluate", str(run), "--out", str(tmp_path / "ev"), "--fid-interval-resamples", "0"])
    ev = {r["sample_id"]: r for r in _rows(tmp_path / "ev" / "samples.csv")}
    bad = [sid for sid, r in ev.items() if r["failure"]]
    assert len(bad) == 3 and all(str(run) in ev[s]["failure"] for s in bad)
    capsys.readouterr()
    res = _predict(run, 8)  # resume: the three samples are generated again
    out = capsys.readouterr().out
    assert out.count("regenerating sample") == 3 and res["resumed"] == 5 and res["n_failed"] == 0
    fresh = {r["sample_id"]: r for r in _rows(run / "samples.csv")}
    assert all(fresh[s]["l2"] == rows[s]["l2"] for s in rows)  # the same samples as the first time
    main(["evaluate", str(run), "--out", str(tmp_path / "ev2"), "--fid-interval-resamples", "0"])
    assert json.loads((tmp_path / "ev2" / "results.json").read_text())["n_failed"] == 0


# --- 5./6. atomic results and bad files ------------------------------------------------
def test_results_and_table_of_two_evaluations_are_never_read_as_one(tmp_path, run8, capsys):
    from lit_vce.report.compare import compare_runs
    from lit_vce.report.leaderboard import load_results

    run = _copy(run8[0], tmp_path / "runs" / "a")
    main(["evaluate", str(run), "--fid-interval-resamples", "0"])
    old = (run / "evaluation" / "results.json").read_bytes()
    (run / "counterfactuals" / sorted(p.name for p in (run / "counterfactuals").glob("*.png"))[0]).write_bytes(b"x")
    main(["evaluate", str(run), "--fid-interval-resamples", "0"])
    (run / "evaluation" / "results.json").write_bytes(old)  # killed between the two renames: old results, new table
    capsys.readouterr()
    with pytest.raises(FileNotFoundError, match="no VCE results.json"):
        load_results(tmp_path / "runs")
    assert "not from the same run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not from the same run"):
        compare_runs(run, run)


@pytest.mark.parametrize("content", ['{"run_name": "x", "metho', '{"run_name": 1, "n": "eight"}', "[1, 2]"])
def test_a_bad_results_file_is_skipped_with_one_line_naming_it(tmp_path, run8, capsys, content):
    _copy(run8[0], tmp_path / "runs" / "good")
    bad = tmp_path / "runs" / "bad" / "results.json"
    (bad.parent / "counterfactuals").mkdir(parents=True)  # a run folder whose results are bad
    bad.write_text(content)
    capsys.readouterr()
    main(["leaderboard", str(tmp_path / "runs")])
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if "skipped" in line]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "classifier_guidance" in out.out
    main(["report", str(tmp_path / "runs")])
    assert str(bad) in capsys.readouterr().err


def test_config_yaml_is_written_atomically_and_kept_when_a_write_fails(tmp_path, run8, monkeypatch):
    import lit_vce.io as io

    run = _copy(run8[0], tmp_path / "run")
    before = (run / "config.yaml").read_bytes()

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "_write_file", full)
    with pytest.raises(SystemExit) as e:
        main(["predict", "--config", CG, *SMALL, "--data.num_samples", "8", "--writer.output_dir", str(run)])
    assert e.value.code == 2
    assert (run / "config.yaml").read_bytes() == before and not list(run.glob(".*.tmp"))


def test_disk_full_is_one_line_and_the_run_resumes_exactly(tmp_path, run8, capsys, monkeypatch):
    import lit_vce.io as io

    out = tmp_path / "run"
    real = io._write_file
    calls = {"n": 0}

    def fills_up(path, data):
        calls["n"] += 1
        if "samples" in str(path.parent) and calls["n"] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(io, "_write_file", fills_up)
    with pytest.raises(SystemExit) as e:
        _predict(out, 8)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "no space left" in err[0] and str(out / "samples") in err[0]
    assert not list(out.rglob(".*.tmp"))
    monkeypatch.setattr(io, "_write_file", real)
    res = _predict(out, 8)
    assert res["resumed"] > 0 and res["metrics"]["l2"] == pytest.approx(run8[1]["metrics"]["l2"], rel=1e-9)


# --- 7. silent wrong defaults ------------------------------------------------------
def test_the_world_ddpm_is_refused_on_images_of_another_resolution(tmp_path):
    from lit_vce import explain
    from lit_vce.classifiers import ImageClassifier
    from lit_vce.errors import ConfigError
    from lit_vce.world.models import SmallCNN

    clf = ImageClassifier(SmallCNN(num_outputs=3, width=8), 64, ["zebra", "horse", "ant"], name="tiny64")
    with pytest.raises(ConfigError, match=r"world's 32 px ddpm.*64x64.*imagenet/methods/classifier_guidance"):
        explain(torch.rand(2, 3, 64, 64), "zebra", classifier=clf, method="classifier_guidance")
    with pytest.raises(ConfigError, match=r"robust partner robust has 4 classes"):
        explain(torch.rand(2, 3, 64, 64), "zebra", classifier=clf, method="dvce")
    with pytest.raises(ConfigError, match=r"world's 32 px bridge.*64x64.*imagenet/methods/rcsb"):
        explain(torch.rand(2, 3, 64, 64), "zebra", classifier=clf, method="rcsb")


def test_openai_clip_weights_are_loaded_with_quickgelu(tmp_path, monkeypatch):
    import open_clip

    from lit_vce.classifiers import load_classifier

    kw = dict(
        embed_dim=16,
        vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True, **kw).eval()
    path = tmp_path / "openclip" / "ViT-B-32" / "openai.pt"
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path))
    names = ["cat", "dog", "zebra"]
    clf = load_classifier(
        "openclip:ViT-B-32/openai", class_names=names, templates=["a photo of a {}."], model_kwargs=kw, head_cache=False
    )
    acts = {type(m).__name__ for m in clf.modules()}
    assert "QuickGELU" in acts and "GELU" not in acts
    gelu = open_clip.create_model("ViT-B-32", pretrained=None, **kw).eval()
    gelu.load_state_dict(ref.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        mine = clf.model.clip.encode_image(x) if hasattr(clf.model, "clip") else None
        a, b = ref.encode_image(x), gelu.encode_image(x)
    assert not torch.allclose(a, b, atol=1e-4)  # the tiny model tells the two activations apart
    if mine is not None:
        assert torch.allclose(mine, a, atol=1e-5)
    # a tag trained with GELU keeps GELU
    path2 = tmp_path / "openclip" / "ViT-B-32" / "laion2b_s34b_b79k.pt"
    torch.save(gelu.state_dict(), path2)
    clf2 = load_classifier(
        "openclip:ViT-B-32/laion2b_s34b_b79k",
        class_names=names,
        templates=["a photo of a {}."],
        model_kwargs=kw,
        head_cache=False,
    )
    assert "QuickGELU" not in {type(m).__name__ for m in clf2.modules()}


def test_imagenet_synset_folders_are_not_read_as_another_classifiers_classes(tmp_path, capsys):
    from PIL import Image

    for syn in ("n01440764", "n01443537"):  # tench, goldfish
        (tmp_path / "img" / syn).mkdir(parents=True)
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "img" / syn / "a.png")
    with pytest.raises(SystemExit) as e:
        main(
            [
                "predict",
                "--config",
                CG,
                *SMALL,
                "--data.dataset",
                "imagefolder",
                "--data.root",
                str(tmp_path / "img"),
                "--data.image_size",
                "32",
                "--data.protocol",
                "next",
                "--writer.output_dir",
                str(tmp_path / "run"),
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and "ImageNet synsets" in err and "tench" in err and "circle" in err


# --- 8. clear errors ----------------------------------------------------------------
@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        (torch.zeros(0, 3, 32, 32), {}, "nothing to explain"),
        (None, {"batch_size": 0}, "batch_size must be a positive integer"),
        ([torch.rand(3, 32)], {}, r"images\[0\]: expected \(3, H, W\)"),
    ],
)
def test_explain_rejects_bad_input_in_one_clear_error(images, kwargs, message):
    from lit_vce import explain

    images = torch.rand(2, 3, 32, 32) if images is None else images
    with pytest.raises(ValueError, match=message):
        explain(images, "square", classifier="biased", num_steps=2, **kwargs)


def test_explain_resizes_a_list_of_differently_sized_tensors():
    from lit_vce import explain

    out = explain(
        [torch.rand(3, 40, 48), torch.rand(3, 32, 32)],
        "square",
        classifier="biased",
        num_steps=2,
        sources=[0, 2],
        metrics=False,
    )
    assert out.counterfactuals.shape == (2, 3, 32, 32) and out.n == 2


def test_evaluate_refuses_a_target_equal_to_its_source_like_predict_and_explain(tmp_path, run8, capsys):
    from lit_vce import explain
    from lit_vce.errors import ConfigError

    run = _copy(run8[0], tmp_path / "run")
    rec = sorted((run / "samples").glob("*.json"))[0]
    row = json.loads(rec.read_text())
    row["target"] = row["source"]
    rec.write_text(json.dumps(row))
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(run)])
    assert e.value.code == 2 and "target equals source" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="target equals source"):
        explain(torch.rand(1, 3, 32, 32), 1, classifier="biased", sources=[1], num_steps=2)


# --- 9. provenance -----------------------------------------------------------------
def test_results_record_the_cpu_model_and_every_model_librarys_version(run8):
    res = run8[1]
    assert res["hardware"]["cpu_model"] and res["hardware"]["cpu_model"] != res["hardware"]["machine"]
    for lib in ("transformers", "open_clip_torch", "robustbench", "diffusers", "timm", "torch", "lightning"):
        assert lib in res["versions"] and res["versions"][lib] != "not installed", lib


def test_evaluating_an_unfinished_predict_run_says_it_is_partial(tmp_path, run8, capsys):
    from lit_vce.report.leaderboard import load_results, markdown_table

    run = _copy(run8[0], tmp_path / "runs" / "killed")
    for name in ("results.json", "samples.csv"):  # a predict run killed before its end
        (run / name).unlink()
    for p in sorted((run / "samples").glob("*.json"))[:3]:  # three samples it never reached
        p.unlink()
        for side in ("counterfactuals", "originals"):
            (run / side / f"{p.stem}.png").unlink()
    main(["evaluate", str(run), "--classifier", "biased", "--fid-interval-resamples", "0"])
    assert "did not finish" in capsys.readouterr().out
    ev = json.loads((run / "evaluation" / "results.json").read_text())
    assert ev["n"] == 5 and any(w.startswith("partial") for w in ev["warnings"])
    assert "partial: the predict run" in markdown_table(load_results(tmp_path / "runs"))
