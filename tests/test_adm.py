"""Parity of the ADM UNet and the respaced sampler with the official guided-diffusion code.

The fixtures (``tests/fixtures/adm_tiny_*.safetensors``, see the README there)
hold a small random-weight ADM with the ImageNet-256 options under ADM's own
parameter names, its inputs, and the official outputs: the raw model output
and, under 200-step respacing, ``p_mean_variance`` (clip_denoised=False) and
the guided mean ``condition_mean``. Every tensor must agree within 1e-5
relative (to its largest magnitude).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lit_vce.diffusion.adm import ADM_PRESETS, ADMConfig, ADMUNet, load_adm
from lit_vce.diffusion.gaussian import RespacedDiffusion, named_betas, space_timesteps

FIXTURES = Path(__file__).parent / "fixtures"
TOL = 1e-5


def _fixture(name):
    path = FIXTURES / f"adm_tiny_{name}.safetensors"
    cfg = json.loads(safe_open(str(path), "pt").metadata()["config"])
    data = load_file(str(path))
    state = {k[len("state_dict.") :]: v for k, v in data.items() if k.startswith("state_dict.")}
    return cfg, data, state


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(params=["uncond", "cond"])
def adm(request):
    cfg, data, state = _fixture(request.param)
    model = ADMUNet(ADMConfig.from_dict(cfg)).eval()
    model.load_state_dict(state, strict=True)  # ADM's own key names load as they are
    return cfg, data, model


def test_adm_unet_reproduces_the_official_model_output(adm):
    cfg, data, model = adm
    with torch.no_grad():
        out = model(data["x"], data["raw_timesteps"], data.get("y"))
    assert out.shape == (3, 6, 32, 32)
    assert _rel(out, data["raw_model_output"]) < TOL


def test_respaced_sampler_reproduces_p_mean_variance_and_the_guided_mean(adm):
    cfg, data, model = adm
    diff = RespacedDiffusion(
        named_betas(cfg["noise_schedule"], cfg["diffusion_steps"]), cfg["timestep_respacing"], "learned_range"
    )
    assert torch.equal(diff.timestep_map, data["timestep_map"])
    for i in (199, 100, 0):
        t = torch.full((3,), diff.model_timestep(i))
        with torch.no_grad():
            out = diff.p_mean_variance(model(data["x"], t, data.get("y")), data["x"], i, clip_denoised=False)
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            assert _rel(out[key], data[f"step{i}.{key}"]) < TOL, (i, key)
        assert _rel(out["eps"], data[f"step{i}.model_output"]) < TOL
        guided = diff.condition_mean(out, data[f"step{i}.gradient"])
        assert _rel(guided, data[f"step{i}.conditioned_mean"]) < TOL, i


def test_space_timesteps_follows_guided_diffusion():
    assert space_timesteps(1000, "200")[:3] == [0, 5, 10] and space_timesteps(1000, "200")[-1] == 999
    assert len(space_timesteps(1000, "200")) == 200
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    # sections: 10 steps over the first half, 5 over the second
    kept = space_timesteps(1000, "10,5")
    assert len(kept) == 15 and kept[0] == 0 and kept[9] == 499 and kept[10] == 500 and kept[-1] == 999
    with pytest.raises(ValueError, match="cannot divide a section of 10 steps into 20"):
        space_timesteps(10, "20")


def test_presets_build_the_published_architectures():
    # parameter counts of the published checkpoints (guided-diffusion's README models)
    with torch.device("meta"):  # shapes only: no memory, no time
        sizes = {k: sum(p.numel() for p in ADMUNet(ADMConfig.preset(k)).parameters()) for k in ADM_PRESETS}
    assert 552_000_000 < sizes["imagenet256_uncond"] < 555_000_000, sizes
    assert sizes["imagenet256_cond"] - sizes["imagenet256_uncond"] == 1000 * 1024  # the class embedding
    cond = ADMUNet(ADMConfig.preset("imagenet64_cond", num_channels=64, num_head_channels=32))
    assert cond.input_blocks[5][1].legacy_order is False  # the 64 px model uses the new attention order
    with torch.no_grad():
        out = cond(torch.randn(1, 3, 64, 64), torch.tensor([10.0]), torch.tensor([3]))
    assert out.shape == (1, 6, 64, 64)


def test_load_adm_from_a_checkpoint_file_and_clear_errors(tmp_path, monkeypatch):
    cfg, data, state = _fixture("uncond")
    ckpt = tmp_path / "tiny.pt"
    torch.save(state, ckpt)
    monkeypatch.setitem(
        ADM_PRESETS,
        "tiny",
        {**{k: v for k, v in cfg.items() if k in ADMConfig.__dataclass_fields__}, "file": "tiny_official.pt"},
    )
    model = load_adm("tiny", ckpt)
    with torch.no_grad():
        out = model(data["x"], data["raw_timesteps"])
    assert _rel(out, data["raw_model_output"]) < TOL
    save_file(state, str(tmp_path / "tiny.safetensors"))
    assert load_adm("tiny", tmp_path / "tiny.safetensors") is not None
    # missing file: the error names the expected path under the weights folder
    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path / "weights"))
    with pytest.raises(FileNotFoundError, match=r"adm/tiny_official\.pt"):
        load_adm("tiny")
    with pytest.raises(ValueError, match="does not fit"):
        load_adm("tiny", ckpt, num_channels=64)
    with pytest.raises(ValueError, match="unknown ADM preset"):
        ADMConfig.preset("nope")


def test_pixel_diffusion_runs_an_adm_checkpoint_with_the_respaced_sampler(tmp_path, tiny_adm_preset):
    from lit_vce.diffusion import PixelDiffusion
    from lit_vce.rngs import sample_rngs

    data = tiny_adm_preset
    gen = PixelDiffusion("adm:tiny", sampler="adm", num_steps=200, clip_sample=False)
    assert gen.learned_variance and gen.image_size == 32 and len(gen.timesteps) == 200
    # the wrapper calls the model at the original timestep of each respaced index, as the official one does
    with torch.no_grad():
        out = gen.p_mean_variance(gen.model_output(data["x"], 100), data["x"], 100)
    assert _rel(out["mean"], data["step100.mean"]) < TOL
    # an explicit path with the preset works too
    short = PixelDiffusion(f"adm:tiny@{tmp_path / 'adm' / 'tiny_official.pt'}", sampler="adm", num_steps=5)
    with pytest.raises(ValueError, match="does not fit"):  # overrides reach the architecture
        PixelDiffusion("adm:tiny", sampler="adm", num_steps=5, adm_overrides={"num_res_blocks": 1})
    assert short.respaced.timestep_map.tolist() == [0, 250, 500, 749, 999]
    with torch.no_grad():
        imgs = short.sample(None, sample_rngs(0, ["a", "b"]))
    assert imgs.shape == (2, 3, 32, 32) and torch.isfinite(imgs).all()


@pytest.mark.parametrize("method", ["dvce", "classifier_guidance"])
def test_imagenet_configs_point_at_the_adm_checkpoint_with_a_clear_error(method, tmp_path, monkeypatch):
    import importlib

    import yaml

    from lit_vce.errors import MissingWeightsError

    cfg = yaml.safe_load(
        (Path(__file__).parents[1] / "configs" / "imagenet" / "methods" / f"{method}.yaml").read_text()
    )
    spec = cfg["model"]["method"]
    module, _, name = spec["class_path"].rpartition(".")
    args = {**spec["init_args"], "robust_classifier": None} if method == "dvce" else spec["init_args"]
    assert args["diffusion"] == "adm:imagenet256_uncond"
    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=r"adm/256x256_diffusion_uncond\.pt"):
        getattr(importlib.import_module(module), name)(**args)


def test_guided_methods_run_on_an_adm_checkpoint(tiny_adm_preset, tiny_classifier):
    from lit_vce.rngs import sample_rngs
    from lit_vce.methods import DVCE, ClassifierGuidance, VCEBatch

    ids = ["a", "b"]
    batch = VCEBatch(torch.rand(2, 3, 16, 16), torch.tensor([0, 1]), torch.tensor([1, 2]), ids, sample_rngs(0, ids))
    cg = ClassifierGuidance(diffusion="adm:tiny", sampler="ddim", num_steps=6)  # eps = the first 3 of 6 channels
    dvce = DVCE(diffusion="adm:tiny", num_steps=6, robust_classifier=None)  # the respaced sampler, learned variance
    for method in (cg, dvce):
        out = method.generate(batch, tiny_classifier)
        assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.images).all()
        assert (out.images - batch.images).abs().mean() > 1e-3
    assert dvce.describe()["sampler"] == "adm" and dvce.describe()["clip_sample"] is False
