"""The protocol presets, CelebA / CelebA-HQ from local files, the papers' face classifiers and ACE's
attribute oracles: fake data, random weights saved where the loaders look, runs end to end."""

from __future__ import annotations

import csv
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_vce.cli import main
from lit_vce.data.celeba import (
    CELEBA_ATTRIBUTES,
    CelebAFaces,
    attribute_correlations,
    read_annotations,
)

SMILING, YOUNG = 31, 39


def _face(path, seed: int, size=(178, 218)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)


def _labels(i: int) -> list[int]:
    rng = np.random.default_rng(100 + i)
    return [int(v) for v in rng.choice([-1, 1], 40)]


@pytest.fixture(scope="module")
def fake_faces(tmp_path_factory):
    """A CelebA folder (torchvision's text layout) with 12 images in train/val/test, a
    CelebA-HQ folder with 6, and random weights for every model the presets load."""
    from lit_vce.classifiers.faces import save_random_face_classifier
    from lit_vce.metrics.embeddings import VGGFace2ResNet50
    from lit_vce.metrics.oracle import save_random_oracle
    from lit_vce.testing import save_random_inception_weights

    root = tmp_path_factory.mktemp("faces")
    celeba = root / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 13)]
    for i, n in enumerate(names):
        _face(celeba / "img_align_celeba" / n, i)
    rows = [f"{n} " + " ".join(str(v) for v in _labels(i)) for i, n in enumerate(names)]
    (celeba / "list_attr_celeba.txt").write_text(
        f"{len(names)}\n" + " ".join(CELEBA_ATTRIBUTES) + "\n" + "\n".join(rows) + "\n"
    )
    parts = [0] * 6 + [1] * 4 + [2] * 2
    (celeba / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, parts)))
    (celeba / "img_align_celeba" / names[7]).write_bytes(b"\xff\xd8\xff\xe0 truncated")  # a val image, corrupt

    hq = root / "celebahq"
    for k in range(6):
        _face(hq / "CelebA-HQ-img" / f"{k}.jpg", 50 + k, size=(300, 300))
    hq_rows = [f"{k}.jpg  " + " ".join(str(v) for v in _labels(20 + k)) for k in range(6)]
    (hq / "CelebAMask-HQ-attribute-anno.txt").write_text(
        "6\n" + " ".join(CELEBA_ATTRIBUTES) + "\n" + "\n".join(hq_rows) + "\n"
    )
    (hq / "CelebA-HQ-to-CelebA-mapping.txt").write_text(
        "idx         orig_idx  orig_file\n" + "".join(f"{k}  {k}  {names[k * 2]}\n" for k in range(6))
    )
    with (hq / "list_eval_partition.csv").open("w") as f:  # the CSV layout of DiME's and ACE's loaders
        f.write(
            "image_id,partition\n" + "".join(f"{n},{p}\n" for n, p in zip(names, [0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 0, 0]))
        )

    weights = root / "weights"
    save_random_face_classifier(weights / "celeba" / "classifier.pth", layout="dime")
    save_random_face_classifier(weights / "celebahq" / "classifier.pth", layout="steex", seed=1)
    save_random_oracle("celeba", weights / "celeba" / "oracle.pth")
    save_random_oracle("celebahq", weights / "celebahq" / "oracle.pth", seed=1)
    torch.manual_seed(2)
    arrays = {
        k: v.numpy() for k, v in VGGFace2ResNet50().net.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    (weights / "vggface2").mkdir(parents=True)
    (weights / "vggface2" / "resnet50_ft_weight.pkl").write_bytes(pickle.dumps(arrays))
    save_random_inception_weights(weights / "inception" / "weights-inception-2015-12-05-6726825d.pth")
    from diffusers import DDPMScheduler

    from lit_vce.testing.methods import tiny_unet

    from lit_vce.world.models import SCHEDULER_CONFIG

    unet = tiny_unet(64)
    unet.save_pretrained(root / "ddpm_tiny")
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(root / "ddpm_tiny")
    return root


def test_celeba_reads_both_layouts_and_the_papers_partitions(fake_faces, tmp_path):
    files, labels, parts = read_annotations(fake_faces / "celeba")
    assert len(files) == 12 and labels.shape == (12, 40) and set(labels.unique().tolist()) == {0, 1}  # -1 -> 0
    assert labels[3].tolist() == [max(v, 0) for v in _labels(3)]
    val = CelebAFaces(fake_faces / "celeba", "Smiling", "val", image_size=64)
    assert [f.split("/")[-1] for f in val.files] == [f"{i:06d}.jpg" for i in range(7, 11)]
    item = val[0]
    assert item["image"].shape == (3, 64, 64) and item["label"] == max(_labels(6)[SMILING], 0) and not item["error"]
    assert "unreadable image" in val[1]["error"]  # the corrupt file: a recorded failure, not a crash
    # the CSV layout (DiME's and ACE's) gives the same table
    csv_root = tmp_path / "csv"
    (csv_root / "img_align_celeba").mkdir(parents=True)
    with (csv_root / "list_attr_celeba.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", *CELEBA_ATTRIBUTES])
        for i in range(12):
            w.writerow([f"{i + 1:06d}.jpg", *_labels(i)])
    (csv_root / "list_eval_partition.csv").write_text(
        "image_id,partition\n" + "".join(f"{i + 1:06d}.jpg,{p}\n" for i, p in enumerate([0] * 6 + [1] * 4 + [2] * 2))
    )
    _, labels2, parts2 = read_annotations(csv_root)
    assert torch.equal(labels, labels2) and parts == parts2
    # CelebA-HQ: the partition is the CelebA original's (through the mapping file); ACE explains test
    hq = CelebAFaces(fake_faces / "celebahq", "Young", "test", image_size=32, hq=True)
    assert [f.split("/")[-1] for f in hq.files] == ["2.jpg", "3.jpg", "4.jpg"]  # 5.jpg maps to a training image
    assert hq.classes == ["not Young", "Young"]
    with pytest.raises(ValueError, match="unknown CelebA attribute 'Smilling'; did you mean"):
        CelebAFaces(fake_faces / "celeba", "Smilling")


def test_cd_correlations_are_aces_over_the_training_partition(fake_faces):
    corr = attribute_correlations(fake_faces / "celeba", SMILING)
    train = np.array([[max(v, 0) for v in _labels(i)] for i in range(6)], dtype=float)
    for j in range(40):  # ACE's get_correlations: np.corrcoef of the query column with each column, train only
        expected = np.corrcoef(train[:, SMILING], train[:, j])[0, 1]
        assert corr[j] == pytest.approx(0.0 if np.isnan(expected) else expected, abs=1e-9), j
    assert corr[SMILING] == pytest.approx(1.0)


def _caffe_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The Caffe-named ResNet-50 trunk written from the official layer list (BTE/STEEX's
    Resnet50_128 / Resnet50_ft_dag forward), straight on the checkpoint's keys."""

    def bn(h, name):
        return F.batch_norm(
            h,
            sd[f"{name}.running_mean"],
            sd[f"{name}.running_var"],
            sd[f"{name}.weight"],
            sd[f"{name}.bias"],
            False,
            0.0,
            1e-5,
        )

    h = F.relu(bn(F.conv2d(x, sd["conv1_7x7_s2.weight"], stride=2, padding=3), "conv1_7x7_s2_bn"))
    h = F.max_pool2d(h, 3, 2, 0, ceil_mode=True)
    for stage, blocks in ((2, 3), (3, 4), (4, 6), (5, 3)):
        for b in range(1, blocks + 1):
            p = f"conv{stage}_{b}"
            s = 2 if (b == 1 and stage > 2) else 1
            y = F.relu(bn(F.conv2d(h, sd[f"{p}_1x1_reduce.weight"], stride=s), f"{p}_1x1_reduce_bn"))
            y = F.relu(bn(F.conv2d(y, sd[f"{p}_3x3.weight"], padding=1), f"{p}_3x3_bn"))
            y = bn(F.conv2d(y, sd[f"{p}_1x1_increase.weight"]), f"{p}_1x1_increase_bn")
            short = bn(F.conv2d(h, sd[f"{p}_1x1_proj.weight"], stride=s), f"{p}_1x1_proj_bn") if b == 1 else h
            h = F.relu(short + y)
    return F.avg_pool2d(h, 7, 1)


@pytest.mark.parametrize("kind", ["celeba", "celebahq"])
def test_the_attribute_oracles_match_the_official_forward(kind, fake_faces):
    from lit_vce.metrics.oracle import load_attribute_oracle

    blob = torch.load(fake_faces / "weights" / kind / "oracle.pth", weights_only=True)
    oracle = load_attribute_oracle(kind, fake_faces / "weights" / kind / "oracle.pth")
    x = torch.rand(2, 3, 128, 128)  # our images in [0, 1]; the official code takes them in [-1, 1]
    official_in = x * 2 - 1
    with torch.no_grad():
        if kind == "celeba":  # Resnet50_128.forward: (x+1)/2, RGB->BGR, minus mean/255, bicubic 224, 128-d, Linear
            sd, head = blob["feat_extract"], blob["classifier"]
            d = ((official_in + 1) / 2)[:, [2, 1, 0]] - torch.tensor([131.0912, 103.8827, 91.4953]).view(
                1, 3, 1, 1
            ) / 255
            d = F.interpolate(d, size=(224, 224), mode="bicubic", align_corners=False)
            f = F.conv2d(_caffe_forward(sd, d), sd["feat_extract.weight"]).flatten(1)
        else:  # OracleResnet: bicubic 224 of the [-1, 1] image, pooled 2048-d, Linear
            full = blob["model_state_dict"]
            sd = {k[len("feat_extract.") :]: v for k, v in full.items() if k.startswith("feat_extract.")}
            head = {k[len("classifier.") :]: v for k, v in full.items() if k.startswith("classifier.")}
            d = F.interpolate(official_in, size=(224, 224), mode="bicubic", align_corners=False)
            f = _caffe_forward(sd, d).flatten(1)
        expected = torch.sigmoid(f @ head["weight"].T + head["bias"])
        got = oracle(x)
    assert got.shape == (2, 40)
    assert torch.allclose(got, expected, atol=1e-5)
    assert float(got.std()) > 1e-3  # not a constant stand-in: the comparison above means something


def test_face_classifiers_are_binary_logits_of_the_papers_densenet(fake_faces, monkeypatch):
    from lit_vce.classifiers import load_classifier
    from lit_vce.classifiers.faces import AttributeDenseNet

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(fake_faces / "weights"))
    for spec, layout in (("celeba:Smiling", "feat_extract"), ("celebahq:39", "model_state_dict")):
        clf = load_classifier(spec)
        blob = torch.load(fake_faces / "weights" / spec.split(":")[0] / "classifier.pth", weights_only=True)
        assert layout in blob
        x = torch.rand(3, 3, 64, 64)
        logits = clf(x)
        ref = AttributeDenseNet(0)
        ref.load_state_dict(clf.model.state_dict())
        z = ref.eval().all_logits(x * 2 - 1)[:, clf.model.attribute]  # the papers feed [-1, 1]
        assert torch.allclose(logits[:, 1] - logits[:, 0], z, atol=1e-5) and torch.all(logits[:, 0] == 0)
        assert torch.allclose(logits.softmax(1)[:, 1], torch.sigmoid(z), atol=1e-6)  # p(class 1) = sigmoid(z)
    assert load_classifier("celebahq:39").class_names == ["not Young", "Young"]


def test_preprocessing_options_decide_which_pixels_reach_the_classifier():
    from lit_vce.classifiers import ImageClassifier

    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["shape"] = tuple(x.shape)
            return x.mean((2, 3))

    x = torch.rand(1, 3, 256, 256, requires_grad=True)
    for mode, shape, border_grad in (
        ("resize_crop", (1, 3, 224, 224), False),
        ("resize", (1, 3, 224, 224), True),
        ("none", (1, 3, 256, 256), True),
    ):
        clf = ImageClassifier(Probe(), 224, ["a", "b", "c"], resize_size=256, preprocessing=mode)
        (g,) = torch.autograd.grad(clf(x).sum(), x)
        assert seen["shape"] == shape, mode
        assert bool(g[..., :5, :].abs().sum() > 0) == border_grad, mode  # the top rows: outside the centre crop
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        ImageClassifier(Probe(), 224, ["a"], preprocessing="crop")


FACE_TINY = [
    "--model.method.init_args.diffusion",
    "{ddpm}",
    "--model.method.init_args.num_steps",
    "4",
    "--model.method.init_args.scales",
    "[8.0]",
    "--model.method.init_args.perceptual_weight",
    "0.0",
    "--model.method.init_args.inner_batch_size",
    "null",
    "--data.image_size",
    "64",
    "--data.num_workers",
    "0",
    "--data.batch_size",
    "4",
    "--model.interval_resamples",
    "20",
    "--model.fid_interval_resamples",
    "0",
    "--trainer.accelerator",
    "cpu",
]


@pytest.mark.parametrize(
    "preset,method",
    [
        ("celeba-smile", "celeba/methods/dime"),
        ("celebahq-age", "celebahq/methods/fastdime"),
        ("celeba-age", "celeba/methods/fastdime"),
        ("celebahq-smile", "celebahq/methods/dime"),
    ],
)
def test_celeba_presets_run_end_to_end_with_the_literature_metrics(preset, method, fake_faces, tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(fake_faces / "weights"))
    ds = preset.split("-")[0]
    out = tmp_path / preset
    args = [
        "predict",
        "--config",
        f"presets/{preset}",
        "--config",
        method,
        "--data.root",
        str(fake_faces / ds),
        "--writer.output_dir",
        str(out),
    ] + [a.format(ddpm=fake_faces / "ddpm_tiny") for a in FACE_TINY]
    if "fastdime" in method:
        args += ["--model.method.init_args.warmup", "1"]
    main(args)
    res = json.loads((out / "results.json").read_text())
    rows = list(csv.DictReader((out / "samples.csv").open()))
    n_images = (
        4 if ds == "celeba" else 3
    )  # the partition's images; each listed with both targets, the prediction's dropped
    assert res["n"] == n_images and res["config"]["not_selected"] == n_images and len(rows) == n_images
    for r in rows:
        if not r["failure"]:
            assert int(r["target"]) == 1 - int(r["pred_before"]) == 1 - int(r["source"])  # target = 1 - prediction
    settings = res["config"]["metric_settings"]
    assert settings["preset"] == preset and settings["attribute_oracle"] == ds
    q = SMILING if preset.endswith("smile") else YOUNG
    assert settings["attributes"]["query"] == q and len(settings["attributes"]["correlations"]) == 40
    assert settings["attributes"]["correlations"][q] == pytest.approx(1.0)
    m = res["metrics"]
    for key in ("mnac", "fva", "fs", "fid_successful", "l1_per_value", "cout_source_correct"):
        assert key in m, key
    assert settings["lpips_net"] == "vgg"  # LPIPS-VGG when its backbone is present (not in this test: 528 MB)
    assert res["config"]["metrics"]["attributes"]["query"] == CELEBA_ATTRIBUTES[q]
    ok = [r for r in rows if r["success"] == "True"]
    if ok:  # MNAC: the mean number of attributes changed over the successful counterfactuals
        assert m["mnac"] == pytest.approx(np.mean([int(r["attributes_changed"]) for r in ok]), abs=1e-6)
    if ds == "celeba":
        assert res["n_failed"] == 1 and any("unreadable image" in r["failure"] for r in rows)
    # evaluate reuses the run's conventions and attributes
    main(["evaluate", str(out)])
    ev = json.loads((out / "evaluation" / "results.json").read_text())
    for key in ("flip_rate", "mnac", "fva", "l1_per_value"):
        if not (isinstance(m.get(key), float) and np.isnan(m[key])):
            assert ev["metrics"][key] == pytest.approx(m[key], rel=1e-5, abs=1e-6), key


def test_a_face_oracle_needs_celeba_data(fake_faces, tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(fake_faces / "weights"))
    with pytest.raises(SystemExit) as e:
        main(
            [
                "predict",
                "--config",
                "world/classifier_guidance",
                "--model.attribute_oracle",
                "celeba",
                "--data.num_samples",
                "2",
                "--writer.output_dir",
                str(tmp_path / "x"),
                "--trainer.accelerator",
                "cpu",
            ]
        )
    assert e.value.code != 0


def test_flip_prediction_is_for_binary_classifiers():
    from lit_vce.data.protocols import validate_protocol

    with pytest.raises(ValueError, match="for binary classifiers"):
        validate_protocol("flip_prediction", 4)


def test_reproduce_script_runs_a_preset_evaluates_and_sets_it_beside_the_paper(fake_faces, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ,
        LIT_VCE_WEIGHTS_DIR=str(fake_faces / "weights"),
        OUT=str(tmp_path / "out"),
        LIT_VCE_BIN=str(Path(sys.executable).parent / "lit-vce"),
        LIT_VCE_QUIET="1",
    )
    flags = [a.format(ddpm=fake_faces / "ddpm_tiny") for a in FACE_TINY] + ["--model.method.init_args.warmup", "1"]
    done = subprocess.run(
        [
            "bash",
            str(repo / "scripts" / "reproduce.sh"),
            "celebahq-age",
            "fastdime",
            "--data.root",
            str(fake_faces / "celebahq"),
            *flags,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "out" / "celebahq-age" / "fastdime"
    assert (run / "results.json").is_file() and (run / "evaluation" / "results.json").is_file()
    table = (tmp_path / "out" / "published-celebahq-age.md").read_text()
    assert "| celebahq-age | fastdime | ours (" in table and "| celebahq-age | ace | published † [1]" in table
    assert "5.31" in table and "3.21" not in table
    bad = subprocess.run(
        ["bash", str(repo / "scripts" / "reproduce.sh"), "celebahq-age", "svce"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no method config celebahq/methods/svce" in bad.stderr
