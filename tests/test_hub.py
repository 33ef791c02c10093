"""The real hub loading paths, offline: tiny random models written into a local
Hugging Face cache in the hub's own layout, loaded by name with HF_HUB_OFFLINE=1
(in a fresh process, since huggingface_hub reads its environment at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lit_vce.testing import write_hf_cache

pytestmark = pytest.mark.slow


def test_the_installed_timm_can_use_the_installed_hub():
    # timm < 1.0.22 beside huggingface_hub >= 1 reports "Hugging Face hub model specified but package not installed"
    from timm.models._hub import has_hf_hub

    assert has_hf_hub(), "timm cannot import what it needs from huggingface_hub: every pretrained timm model would fail"


def _run_offline(code: str, cache: Path, tmp_path: Path, **env) -> dict:
    """Run ``code`` in a fresh interpreter with the hub offline and ``cache`` as its cache;
    the code prints one JSON line last."""
    full = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HOME": str(tmp_path / "hf_home"),
        "LIT_VCE_WEIGHTS_DIR": str(tmp_path / "weights"),
        **env,
    }
    full.pop("TRANSFORMERS_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_timm_loads_an_hf_hub_model_from_the_cache_offline(tmp_path):
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    save_for_hf(model, str(tmp_path / "export"), model_config={"num_classes": 5})
    write_hf_cache(tmp_path / "cache", "lit-vce-test/tiny-resnet", tmp_path / "export")
    out = _run_offline(
        """
        import json, torch
        from lit_vce.classifiers import load_classifier
        clf = load_classifier("timm:hf-hub:lit-vce-test/tiny-resnet")
        w = clf.model.state_dict()
        total = float(sum(v.double().sum() for v in w.values()))
        print(json.dumps({"name": clf.name, "k": clf.num_classes, "sum": total}))
    """,
        tmp_path / "cache",
        tmp_path,
    )
    assert out["name"] == "timm:hf-hub:lit-vce-test/tiny-resnet" and out["k"] == 5
    expected = float(sum(v.double().sum() for v in model.state_dict().values()))
    assert out["sum"] == pytest.approx(expected, rel=1e-9)  # the cached weights, not a fresh random init


def test_timm_hub_miss_offline_names_the_cache(tmp_path):
    out = _run_offline(
        """
        import json
        from lit_vce.classifiers import load_classifier, MissingWeightsError
        try:
            load_classifier("timm:hf-hub:lit-vce-test/absent")
            print(json.dumps({"raised": None}))
        except MissingWeightsError as e:
            print(json.dumps({"raised": str(e)}))
    """,
        tmp_path / "cache",
        tmp_path,
    )
    assert out["raised"] and "offline and not cached" in out["raised"] and "Hugging Face cache" in out["raised"]


def test_openclip_loads_an_hf_hub_model_from_the_cache_and_caches_its_head(tmp_path):
    import open_clip
    from open_clip.factory import get_model_config
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    cfg = get_model_config("ViT-B-32")
    cfg.update(
        embed_dim=16,
        vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    torch.manual_seed(0)
    model = open_clip.create_model(
        "ViT-B-32", pretrained=None, **{k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg")}
    )
    export = tmp_path / "export"
    export.mkdir()
    save_file(model.state_dict(), str(export / "open_clip_model.safetensors"))
    save_config_for_hf(model, export / "open_clip_config.json", model_config=cfg)
    write_hf_cache(tmp_path / "cache", "lit-vce-test/tiny-clip", export)
    code = """
        import json, time, torch
        from pathlib import Path
        from lit_vce.classifiers import load_classifier
        t = time.perf_counter()
        clf = load_classifier({"spec": "openclip:hf-hub:lit-vce-test/tiny-clip",
                               "class_names": ["circle", "square", "star"],
                               "templates": ["a photo of a {}.", "a drawing of a {}."]})
        x = torch.rand(2, 3, 32, 32)
        heads = sorted(str(p) for p in Path("%s").rglob("*.safetensors"))
        print(json.dumps({"k": clf.num_classes, "heads": heads, "w": clf.model.weights.sum().item(),
                          "logits": clf(x).sum().item(), "pos": clf.model.clip.positional_embedding.sum().item()}))
    """ % (tmp_path / "weights" / "openclip_heads")
    first = _run_offline(code, tmp_path / "cache", tmp_path)
    assert first["k"] == 3 and len(first["heads"]) == 1
    assert first["pos"] == pytest.approx(model.positional_embedding.sum().item(), rel=1e-6)
    second = _run_offline(code, tmp_path / "cache", tmp_path)  # the head comes from disk: the same weights
    assert second["heads"] == first["heads"] and second["w"] == first["w"]
    # other class names: another head
    from lit_vce.classifiers.openclip import zero_shot_head

    tok = open_clip.get_tokenizer("ViT-B-32")
    w = zero_shot_head(model, tok, ["circle", "square", "star"], ["a photo of a {}.", "a drawing of a {}."])
    assert w.shape == (16, 3) and torch.allclose(w.norm(dim=0), torch.ones(3), atol=1e-5)
    assert w.sum().item() == pytest.approx(first["w"], rel=1e-5, abs=1e-5)  # cached = computed


def test_diffusers_pipeline_loads_by_hub_id_from_the_cache_offline(tmp_path):
    from lit_vce.testing import save_tiny_latent_diffusion

    folder = save_tiny_latent_diffusion(tmp_path / "sd")
    write_hf_cache(tmp_path / "cache", "lit-vce-test/tiny-sd", folder)
    out = _run_offline(
        """
        import json
        from lit_vce.diffusion import LatentDiffusion
        d = LatentDiffusion(model="lit-vce-test/tiny-sd", num_steps=2)
        print(json.dumps({"unet": float(sum(p.double().sum() for p in d.unet.parameters())),
                          "text": type(d.text_encoder).__name__}))
    """,
        tmp_path / "cache",
        tmp_path,
    )
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        expected = float(sum(p.double().sum() for p in ref.parameters()))
    assert out["unet"] == pytest.approx(expected, rel=1e-9)
    assert out["text"] == "CLIPTextModel"


def test_lit_vce_offline_puts_the_hub_offline(tmp_path):
    out = _run_offline(
        """
        import json, os
        import lit_vce
        import huggingface_hub.constants as c
        print(json.dumps({"env": os.environ.get("HF_HUB_OFFLINE"), "hub": bool(c.HF_HUB_OFFLINE)}))
    """,
        tmp_path / "cache",
        tmp_path,
        LIT_VCE_OFFLINE="1",
        HF_HUB_OFFLINE="",
    )
    assert out == {"env": "1", "hub": True}
