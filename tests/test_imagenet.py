"""ImageNet protocols and an end-to-end run on a tiny fake ImageNet folder with tiny
random models (timm test models, a 16px class-conditional UNet, random Inception
weights), all loaded offline through the real loading paths."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_vce.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "imagenet"
ZEBRA, SORREL, CHEETAH = 340, 339, 293


def test_cluster_protocol_targets_every_other_class_of_the_wordnet_cluster():
    from lit_vce.data.imagenet import cluster_targets, imagenet_class_names, wordnet_clusters
    from lit_vce.data.protocols import assign_target

    clusters = wordnet_clusters()
    assert all(3 <= len(c) <= 10 for _, c in clusters)
    names = imagenet_class_names()
    big_cats = next(c for _, c in clusters if CHEETAH in c)
    assert {names[c] for c in big_cats} >= {"cheetah", "leopard", "lion", "tiger"}
    targets = assign_target("cluster", CHEETAH, "x", 1000)
    assert set(targets) == set(big_cats) - {CHEETAH} and CHEETAH not in targets
    assert targets == cluster_targets()[CHEETAH]
    # a class outside every cluster is not explained
    assert any(assign_target("cluster", c, "x", 1000) == [] for c in range(1000))
    with pytest.raises(ValueError, match="1000 ImageNet classes"):
        from lit_vce.data.protocols import validate_protocol

        validate_protocol("cluster", 4)


def test_ldce_protocol_reads_the_per_image_list():
    from lit_vce.data.imagenet import closest_classes, ldce_val_targets
    from lit_vce.data.protocols import assign_target

    table = ldce_val_targets()
    assert len(table) == 50000
    # image 12345 is of class 246 (50 per class, sorted); its target is one of the 4 closest classes
    assert assign_target("ldce", 246, "x", 1000, index=12345) == [table[12345]]
    assert table[12345] in closest_classes()[12345 // 50]
    with pytest.raises(ValueError, match="50,000-image val folder"):
        assign_target("ldce", 0, "x", 1000, index=None)


def _jpeg(path: Path, seed: int, size=(40, 48)) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, 3)
    img = np.clip(base + rng.normal(0, 30, (*size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
    """A folder of 3 ImageNet synsets (zebra, sorrel, cheetah) with 3 JPEGs each plus one
    corrupt file, and tiny random models saved where the loaders look for them."""
    from diffusers import DDPMScheduler

    from lit_vce.testing.methods import tiny_unet
    from safetensors.torch import save_file

    from lit_vce.data.imagenet import imagenet_synsets
    from lit_vce.testing import save_random_inception_weights
    from lit_vce.world.models import SCHEDULER_CONFIG

    root = tmp_path_factory.mktemp("imagenet")
    val = root / "val"
    for k, cls in enumerate((ZEBRA, SORREL, CHEETAH)):
        folder = val / imagenet_synsets()[cls]
        folder.mkdir(parents=True)
        for i in range(3):
            _jpeg(folder / f"ILSVRC2012_val_{k}{i}.JPEG", 10 * k + i)
    (val / imagenet_synsets()[ZEBRA] / "ILSVRC2012_val_broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    weights = root / "weights"
    import timm

    torch.manual_seed(0)
    for name in ("test_vit", "test_efficientnet"):
        (weights / "timm").mkdir(parents=True, exist_ok=True)
        save_file(timm.create_model(name, pretrained=False).state_dict(), str(weights / "timm" / f"{name}.safetensors"))
    save_random_inception_weights(weights / "inception" / "weights-inception-2015-12-05-6726825d.pth")
    unet = tiny_unet(16, num_class_embeds=1001)
    unet.save_pretrained(root / "adm_tiny")
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(root / "adm_tiny")
    return root


def _predict_args(root: Path, protocol: str, out: Path, method: str = "classifier_guidance") -> list[str]:
    return [
        "predict",
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "methods" / f"{method}.yaml"),
        "--config",
        str(CONFIGS / "protocols" / f"{protocol}.yaml"),
        "--data.root",
        str(root / "val"),
        "--data.image_size",
        "32",
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "4",
        "--data.images_per_class",
        "null",
        "--model.resolution",
        "32",
        "--model.classifier",
        "timm:test_vit",
        "--model.second_classifier",
        "timm:test_efficientnet",
        "--model.method.init_args.diffusion",
        str(root / "adm_tiny"),
        "--model.method.init_args.num_steps",
        "4",
        "--trainer.accelerator",
        "cpu",
        "--writer.output_dir",
        str(out),
    ]


def test_fake_imagenet_predict_evaluate_leaderboard_end_to_end(fake_imagenet, tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(fake_imagenet / "weights"))
    runs = tmp_path / "runs"
    out = runs / "cg-pairs"
    main(_predict_args(fake_imagenet, "pairs", out))
    res = json.loads((out / "results.json").read_text())
    # zebra (3 + 1 corrupt) -> sorrel, sorrel (3) -> zebra, cheetah (3) -> cougar; the corrupt one was
    # attempted and failed (in N, not flipped, in no measured figure)
    assert res["protocol"] == "pairs" and res["dataset"] == "imagefolder"
    assert res["n"] == 10 and res["n_failed"] == 1 and res["metrics"]["fid_n"] == 9
    assert res["config"]["metrics"]["features"] == "inception-v3-2048" and res["config"]["metrics"]["resolution"] == 32
    rows = {r["sample_id"]: r for r in csv.DictReader((out / "samples.csv").open())}
    broken = next(r for s, r in rows.items() if "broken" in s)
    assert "unreadable image" in broken["failure"]
    pairs = {(int(r["source"]), int(r["target"])) for r in rows.values()}
    assert pairs == {(ZEBRA, SORREL), (SORREL, ZEBRA), (CHEETAH, 286)}
    assert all(r["success_independent"] in ("True", "False") for r in rows.values() if not r["failure"])

    main(["evaluate", str(out), "--resolution", "32", "--second-classifier", "timm:test_efficientnet"])
    ev = json.loads((out / "evaluation" / "results.json").read_text())
    assert ev["n"] == 10 and ev["n_failed"] == 1 and ev["protocol"] == "pairs"
    for key in ("flip_rate", "l1", "l2", "fid", "sfid", "cout", "flip_rate_independent"):
        assert ev["metrics"][key] == pytest.approx(res["metrics"][key], rel=1e-5), key

    main(["leaderboard", str(runs), "--sort-by", "FID"])
    md = (runs / "leaderboard.md").read_text()
    assert f"| classifier_guidance | timm:test_vit | pairs | 10 ({res['n_success']} ok, 1 failed) ! |" in md
    assert "1 of 10 failed" in md
    assert (runs / "leaderboard.html").is_file() and (runs / "leaderboard.tex").is_file()
    main(["report", str(runs)])
    assert (runs / "report.html").read_text().count("<img ") >= 9


def test_misclassified_protocol_explains_errors_towards_the_true_label(fake_imagenet, tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(fake_imagenet / "weights"))
    out = tmp_path / "err"
    main(_predict_args(fake_imagenet, "misclassified", out) + ["--model.fid_features", "none"])
    res = json.loads((out / "results.json").read_text())
    every = list(csv.DictReader((out / "samples.csv").open()))
    rows = [r for r in every if not r["failure"]]
    # the corrupt image was attempted (and failed); the protocol dropped the correctly classified ones
    assert rows and res["n"] == len(every) == len(rows) + 1 and len(rows) + res["config"]["not_selected"] == 9
    for r in rows:
        true_label = {"n02391049": ZEBRA, "n02389026": SORREL, "n02130308": CHEETAH}[r["sample_id"].split("/")[0]]
        assert int(r["target"]) == true_label  # the true label is the target
        assert int(r["source"]) == int(r["pred_before"]) != true_label  # the (wrong) prediction is the source


def test_every_imagenet_method_and_protocol_config_composes(capsys):
    names = {"classifier_guidance": "ClassifierGuidance", "dvce": "DVCE", "digin": "DiGIN"}
    for method in names:
        for protocol in ("pairs", "ldce", "cluster", "misclassified"):
            with pytest.raises(SystemExit) as e:
                main(
                    [
                        "predict",
                        "--config",
                        str(CONFIGS / "base.yaml"),
                        "--config",
                        str(CONFIGS / "methods" / f"{method}.yaml"),
                        "--config",
                        str(CONFIGS / "protocols" / f"{protocol}.yaml"),
                        "--print_config",
                    ]
                )
            assert e.value.code == 0
            printed = capsys.readouterr().out
            assert f"protocol: {protocol}" in printed and f"lit_vce.methods.{names[method]}" in printed


BASELINE_OVERRIDES = {  # tiny settings; everything else comes from the method's ImageNet config
    "svce": ["--model.method.init_args.steps", "2", "--model.method.init_args.eps", "5.0"],
    "dime": [
        "--model.method.init_args.diffusion",
        "{adm}",
        "--model.method.init_args.num_steps",
        "4",
        "--model.method.init_args.scales",
        "[8.0]",
        "--model.method.init_args.perceptual_weight",
        "0.0",
    ],
    "ace": [
        "--model.method.init_args.diffusion",
        "{adm}",
        "--model.method.init_args.num_steps",
        "10",
        "--model.method.init_args.attack_steps",
        "1",
        "--model.method.init_args.dilation",
        "3",
        "--data.image_size",
        "16",
    ],
    "fastdime": [
        "--model.method.init_args.diffusion",
        "{adm}",
        "--model.method.init_args.num_steps",
        "4",
        "--model.method.init_args.scales",
        "[8.0]",
        "--model.method.init_args.warmup",
        "1",
        "--model.method.init_args.perceptual_weight",
        "0.0",
    ],
    "ldce": [
        "--model.method.init_args.diffusion.init_args.model",
        "{sd}",
        "--model.method.init_args.diffusion.init_args.num_steps",
        "4",
        "--model.method.init_args.strength",
        "0.5",
    ],
}


@pytest.mark.parametrize(
    "method,protocol",
    [("svce", "pairs"), ("dime", "misclassified"), ("ace", "pairs"), ("ldce", "pairs"), ("fastdime", "pairs")],
)
def test_the_baselines_imagenet_configs_compose_with_the_protocols(
    method, protocol, fake_imagenet, tiny_sd, tmp_path, monkeypatch
):
    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(fake_imagenet / "weights"))
    out = tmp_path / method
    args = [
        "predict",
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "methods" / f"{method}.yaml"),
        "--config",
        str(CONFIGS / "protocols" / f"{protocol}.yaml"),
        "--data.root",
        str(fake_imagenet / "val"),
        "--data.image_size",
        "32",
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "4",
        "--data.images_per_class",
        "null",
        "--model.resolution",
        "32",
        "--model.classifier",
        "timm:test_vit",
        "--model.second_classifier",
        "timm:test_efficientnet",
        "--model.fid_features",
        "none",
        "--trainer.accelerator",
        "cpu",
        "--writer.output_dir",
        str(out),
    ]
    if method in ("dime", "ldce", "fastdime"):  # the configs' inner batch size is a memory knob for real models
        args += ["--model.method.init_args.inner_batch_size", "null"]
    args += [a.format(adm=fake_imagenet / "adm_tiny", sd=tiny_sd[0]) for a in BASELINE_OVERRIDES[method]]
    main(args)
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == method and res["protocol"] == protocol and res["n_failed"] == 1  # the corrupt JPEG
    assert res["config"]["method"]["name"] == method and 0 <= res["metrics"]["flip_rate"] <= 1


def test_every_preset_composes_with_the_method_configs(capsys):
    """Each preset with a method of its domain, and the ACE table's preset with every ImageNet method."""
    from lit_vce.report.published import known_presets

    presets = known_presets()
    assert {
        "ace-imagenet",
        "dvce-imagenet",
        "svce-imagenet",
        "ldce-imagenet",
        "digin-imagenet",
        "celeba-smile",
        "celeba-age",
        "celebahq-smile",
        "celebahq-age",
    } <= set(presets)
    pairs = [
        (
            p,
            "celeba/methods/dime"
            if p.startswith("celeba-")
            else "celebahq/methods/ace"
            if p.startswith("celebahq")
            else "imagenet/methods/classifier_guidance",
        )
        for p in presets
    ]
    pairs += [
        ("ace-imagenet", f"imagenet/methods/{m}")
        for m in (
            "ace",
            "dime",
            "fastdime",
            "maskdime",
            "rcsb",
            "dvce",
            "dvce_2023",
            "svce",
            "ldce",
            "digin",
            "classifier_guidance",
        )
    ]
    for preset, method in pairs:
        with pytest.raises(SystemExit) as e:
            main(["predict", "--config", f"presets/{preset}", "--config", method, "--print_config"])
        assert e.value.code == 0, (preset, method)
        printed = capsys.readouterr().out
        assert f"preset: {preset}" in printed


def test_ace_imagenet_preset_end_to_end_beside_the_published_figures(fake_imagenet, tmp_path, monkeypatch):
    """The ACE table's zebra-sorrel preset with ACE's ImageNet config (tiny ADM stand-in, random
    torchvision ResNet-50 saved where timm looks): the whole 256 px image reaches the classifier,
    and leaderboard --published sets our row beside the paper's FIDs in ACE's convention."""
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "weights"
    (weights / "timm").mkdir(parents=True)
    for name in ("test_vit", "test_efficientnet"):
        (weights / "timm" / f"{name}.safetensors").symlink_to(
            fake_imagenet / "weights" / "timm" / f"{name}.safetensors"
        )
    (weights / "inception").symlink_to(fake_imagenet / "weights" / "inception")
    torch.manual_seed(0)
    save_file(
        timm.create_model("resnet50.tv_in1k", pretrained=False).state_dict(),
        str(weights / "timm" / "resnet50.tv_in1k.safetensors"),
    )
    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(weights))
    runs = tmp_path / "runs"
    out = runs / "ace-zs"
    main(
        [
            "predict",
            "--config",
            "presets/ace-imagenet-zs",
            "--config",
            "imagenet/methods/ace",
            "--data.root",
            str(fake_imagenet / "val"),
            "--data.image_size",
            "16",
            "--data.num_workers",
            "0",
            "--data.batch_size",
            "4",
            "--model.resolution",
            "16",
            "--model.interval_resamples",
            "20",
            "--model.fid_interval_resamples",
            "0",
            "--model.method.init_args.diffusion",
            str(fake_imagenet / "adm_tiny"),
            "--model.method.init_args.num_steps",
            "10",
            "--model.method.init_args.attack_steps",
            "1",
            "--model.method.init_args.dilation",
            "3",
            "--trainer.accelerator",
            "cpu",
            "--writer.output_dir",
            str(out),
        ]
    )
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["metric_settings"]["preset"] == "ace-imagenet-zs" and res["protocol"] == "pairs"
    assert res["n"] == 7 and res["n_failed"] == 1  # zebra (3 + the corrupt one) -> sorrel, sorrel (3) -> zebra
    assert res["classifier"] == "timm:resnet50.tv_in1k"
    assert res["config"]["classifier"] == {"spec": "timm:resnet50.tv_in1k", "preprocessing": "none"}
    assert "fid_successful" in res["metrics"] and "cout_source_correct" in res["metrics"]
    main(["evaluate", str(out), "--resolution", "16"])  # the run's classifier, its preprocessing included
    ev = json.loads((out / "evaluation" / "results.json").read_text())
    assert ev["config"]["classifier"] == res["config"]["classifier"]
    for key in ("flip_rate", "target_confidence", "cout", "l1_per_value"):  # target confidence: same preprocessing
        assert ev["metrics"][key] == pytest.approx(res["metrics"][key], rel=1e-5, abs=1e-7), key
    main(["leaderboard", str(runs), "--published", "ace-imagenet", "--formats", "md"])
    table = (runs / "published-ace-imagenet.md").read_text()
    row = next(line for line in table.splitlines() if "ours (" in line)
    assert row.startswith("| ace-imagenet-zs | ace | ours (") and "7 (" in row
    fid = next(line for line in table.splitlines() if "67.7" in line)
    assert fid.startswith("| ace-imagenet-zs | ace (l2) | published † [1]")
    assert "70.2" in table and "93.6" in table and "1.27" not in table  # the family's tasks only
    assert "FID (ACE: all originals vs successful CFs)" in table and "the paper's PDF could not be read here" in table
    with pytest.raises(SystemExit) as e:
        main(["leaderboard", str(runs), "--published", "ace-imagenett"])
    assert e.value.code == 2


def test_digin_protocol_follows_the_official_list_and_cluster_rule(full_val_folder, tmp_path):
    """DiG-IN's inet_vce_idcs.py images, each to every other class of its class's first
    in_hierarchy cluster (uvces_imagenet.py fill_img_idcs); a class in no cluster is skipped."""
    import yaml

    from lit_vce.data import VCEDataModule
    from lit_vce.data.imagenet import ASSETS, digin_vce_targets, imagenet_synsets
    from lit_vce.data.protocols import assign_target

    data = yaml.safe_load((ASSETS / "digin_vce_list.yaml").read_text())
    table = digin_vce_targets()
    # 568 entries, one listed twice (13556, red wolf): 567 images, 511 of them in a cluster
    assert len(data["images"]) == 568 and len(table) == 567 and all(i // 50 == s for i, s in data["images"])
    assert sum(1 for _, t in table.values() if t) == 511
    assert table[357] == (7, [])  # cock: in no cluster, skipped as the official script skips it
    assert assign_target("digin", 7, "x", 1000, index=357) == [] and assign_target("digin", 0, "x", 1000, index=0) == []
    first = next(c for c in data["clusters"].values() if 817 in c)  # sports car: 'car, auto, ...'
    idx = next(i for i, s in data["images"] if s == 817)
    assert table[idx] == (817, [t for t in first if t != 817]) and len(table[idx][1]) == len(first) - 1
    # the VCEs of the official rule: 2863 there (the doubled image's 3 twice), 2860 distinct here
    assert sum(len(t) for _, t in table.values()) == 2860
    with pytest.raises(ValueError, match="class 817, the folder has it as class 3"):
        assign_target("digin", 3, "x", 1000, index=idx)
    # a full val folder (1000 synset folders of 50 files): ImageFolder order
    dm = VCEDataModule(
        "imagefolder", root=str(full_val_folder), protocol="digin", image_size=8, batch_size=4, num_samples=None
    )
    dm.setup("predict")
    explained = dm._data.entries
    want = [(i, s, t) for i, (s, ts) in sorted(table.items()) for t in ts]
    assert [(dm._data.base.items[k][2], lab, t) for k, lab, t in explained] == want
    small = tmp_path / "val_small"
    for synset in imagenet_synsets()[:3]:
        (small / synset).mkdir(parents=True)
        os.link(next((full_val_folder / synset).iterdir()), small / synset / "a.JPEG")
    with pytest.raises(ValueError, match="protocol 'digin' needs the full ImageNet val folder"):
        VCEDataModule("imagefolder", root=str(small), protocol="digin", image_size=8).setup("predict")


def test_the_class_synset_table_is_ilsvrcs_sorted_synsets():
    """ILSVRC's class indices are its 1000 synsets in sorted order; LDCE's table had 51 classes
    under another sense of their name (hen 8: the meat), so a real val folder was not ImageNet."""
    from lit_vce.data.imagenet import imagenet_synsets

    s = imagenet_synsets()
    assert len(set(s)) == 1000 and s == sorted(s)
    assert (s[8], s[134], s[517]) == ("n01514859", "n02012849", "n03126707")
