"""Every ImageNet preset runs end to end on a fake full val folder (conftest) with random weights saved where
its classifier's loader looks (the ACE zero-shot preset with ACE: tests/test_imagenet.py; CelebA:
tests/test_presets.py). SVCE (two steps, no diffusion model) keeps each run to seconds; what is
tested is the preset's data, protocol, classifier, input transform and conventions."""

from __future__ import annotations

import json

import pytest
import torch

from lit_vce.cli import main


@pytest.fixture(scope="module")
def preset_weights(tmp_path_factory):
    """Random weights for every ImageNet preset's classifier, where their loaders look."""
    import timm
    import torchvision
    from safetensors.torch import save_file

    from lit_vce.testing import save_random_inception_weights

    root = tmp_path_factory.mktemp("preset_weights")
    w = root / "weights"
    (w / "timm").mkdir(parents=True)
    (w / "robustness").mkdir()
    torch.manual_seed(0)
    for name in ("resnet50.tv_in1k", "vit_base_patch16_384.augreg_in21k_ft_in1k"):
        save_file(timm.create_model(name, pretrained=False).state_dict(), str(w / "timm" / f"{name}.safetensors"))
    # the robustness library's layout: the model under module.model., its normaliser and attacker beside it
    sd = torchvision.models.resnet50().state_dict()
    blob = {
        "model": {
            **{f"module.model.{k}": v for k, v in sd.items()},
            **{f"module.attacker.model.{k}": v for k, v in sd.items()},
            "module.normalizer.new_mean": torch.zeros(3, 1, 1),
            "module.normalizer.new_std": torch.ones(3, 1, 1),
        },
        "epoch": 0,
    }
    torch.save(blob, w / "robustness" / "madry_ft.pt")
    save_random_inception_weights(w / "inception" / "weights-inception-2015-12-05-6726825d.pth")
    return w


#: preset -> (VCEs of the first 2 images, the classifier spec, its preprocessing)
PRESETS = {
    "ace-imagenet-cc": ("timm:resnet50.tv_in1k", "none"),
    "ace-imagenet-ep": ("timm:resnet50.tv_in1k", "none"),
    "dvce-imagenet": ("robustness:madry_ft.pt", "resize"),
    "svce-imagenet": ("robustness:madry_ft.pt", "resize"),
    "ldce-imagenet": ("timm:resnet50.tv_in1k", "resize_crop"),
    "digin-imagenet": ("timm:vit_base_patch16_384.augreg_in21k_ft_in1k", "resize"),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_imagenet_preset_runs_end_to_end(preset, preset_weights, full_val_folder, tmp_path, monkeypatch):
    from lit_vce.data.imagenet import digin_vce_targets, ldce_val_targets

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(preset_weights))
    out = tmp_path / preset
    main(
        [
            "predict",
            "--config",
            f"presets/{preset}",
            "--config",
            "imagenet/methods/svce",
            "--data.root",
            str(full_val_folder),
            "--data.image_size",
            "64",
            "--data.num_samples",
            "2",
            "--data.num_workers",
            "0",
            "--data.batch_size",
            "2",
            "--model.resolution",
            "64",
            "--model.method.init_args.steps",
            "2",
            "--model.interval_resamples",
            "10",
            "--model.fid_interval_resamples",
            "0",
            "--model.s3",
            "off",
            "--model.metrics",  # all but COUT: its 51 passes of ViT-B/16 at 384 px took 70 of digin-imagenet's 98 s
            "fid,sfid,lpips,latent,independent,audit",
            "--trainer.accelerator",
            "cpu",
            "--writer.output_dir",
            str(out),
        ]
    )
    res = json.loads((out / "results.json").read_text())
    spec, preprocessing = PRESETS[preset]
    assert res["n"] == 2 and res["n_failed"] == 0 and res["config"]["metric_settings"]["preset"] == preset
    assert res["config"]["classifier"] == {"spec": spec, "preprocessing": preprocessing}
    rows = [json.loads(p.read_text()) for p in sorted((out / "samples").glob("*.json"))]
    pairs = sorted((int(r["source"]), int(r["target"])) for r in rows)
    protocol = res["protocol"]
    if protocol == "pairs":  # the first images in folder order: those of the smallest source class, to its pair
        first = {"ace-imagenet-cc": (286, 293), "ace-imagenet-ep": (283, 285)}.get(preset, (283, 285))
        assert pairs == [first, first]
    elif protocol == "ldce":  # val images 0 and 1 (10 per class), to LDCE's listed targets
        assert pairs == sorted((0, ldce_val_targets()[i]) for i in (0, 1))
    else:  # DiG-IN's list: its first listed image with a cluster, to the first two other classes of it
        assert protocol == "digin"
        first = next(i for i, (_, t) in sorted(digin_vce_targets().items()) if t)
        start, targets = digin_vce_targets()[first]
        assert pairs == sorted((start, t) for t in targets[:2])
