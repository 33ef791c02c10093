"""Shared fixtures: tiny random models built offline, and the shipped world models."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("LIT_VCE_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_diffusion():
    """A random 16x16 class-conditional pixel diffusion model (4 classes + null), by sampler and steps."""
    from lit_vce.testing import tiny_pixel_diffusion

    return tiny_pixel_diffusion


@pytest.fixture
def tiny_classifier():
    """A random SmallCNN wrapped as a 4-class classifier of 16x16 images."""
    from lit_vce.testing import tiny_classifier as make

    return make()


@pytest.fixture
def tiny_batch():
    from lit_vce.testing import tiny_batch as make

    return make()


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random Stable Diffusion folder (UNet, VAE, CLIP text encoder, tokenizer) and a 4-class classifier."""
    from lit_vce.classifiers import ImageClassifier
    from lit_vce.testing import save_tiny_latent_diffusion
    from lit_vce.world.models import SmallCNN

    folder = save_tiny_latent_diffusion(tmp_path_factory.mktemp("sd") / "sd")
    torch.manual_seed(0)
    clf = ImageClassifier(SmallCNN(width=8), 32, ["circle", "square", "triangle", "star"], name="tiny")
    return folder, clf


@pytest.fixture(scope="session")
def tiny_sam(tmp_path_factory):
    """A tiny random Segment Anything model saved as a local folder."""
    from transformers import SamConfig, SamModel
    from transformers.models.sam.configuration_sam import SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    torch.manual_seed(0)
    cfg = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=16,
            output_channels=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            window_size=4,
            global_attn_indexes=[0],
            num_pos_feats=8,
            mlp_dim=32,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=16
        ),
    )
    folder = tmp_path_factory.mktemp("sam") / "sam"
    SamModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_adm_preset(tmp_path, monkeypatch):
    """The parity ADM (``tests/fixtures/adm_tiny_uncond``) as preset ``tiny``, its checkpoint
    where ``adm:tiny`` looks for it; returns the fixture's tensors."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    from lit_vce.diffusion.adm import ADM_PRESETS, ADMConfig

    path = Path(__file__).parent / "fixtures" / "adm_tiny_uncond.safetensors"
    cfg = json.loads(safe_open(str(path), "pt").metadata()["config"])
    data = load_file(str(path))
    state = {k[len("state_dict.") :]: v for k, v in data.items() if k.startswith("state_dict.")}
    monkeypatch.setitem(
        ADM_PRESETS,
        "tiny",
        {**{k: v for k, v in cfg.items() if k in ADMConfig.__dataclass_fields__}, "file": "tiny_official.pt"},
    )
    (tmp_path / "adm").mkdir()
    torch.save(state, tmp_path / "adm" / "tiny_official.pt")
    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path))
    return data


@pytest.fixture(scope="session")
def full_val_folder(tmp_path_factory):
    """A full ImageNet val folder: 1000 synset folders of 50 files each, hard links to one small
    JPEG, so image indices follow ImageFolder order as in the real val set."""
    import os

    import numpy as np
    from PIL import Image

    from lit_vce.data.imagenet import imagenet_synsets

    root = tmp_path_factory.mktemp("full_val")
    one = root / "one.JPEG"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(one, quality=90)
    for c, synset in enumerate(imagenet_synsets()):
        (root / "val" / synset).mkdir(parents=True)
        for j in range(50):
            os.link(one, root / "val" / synset / f"ILSVRC2012_val_{c:04d}{j:02d}.JPEG")
    return root / "val"
