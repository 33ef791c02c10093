"""Weights in one place: a CLI run builds its models in ``prepare_data`` on one process
per node (downloads allowed) and in ``setup`` on the others from the caches only (the
hub offline, no download attempted); constructors validate specs without loading."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_vce import weights
from lit_vce.errors import MissingWeightsError, UnknownNameError

BUILDS: list[str | None] = []


def _recording_family(name: str, **kwargs):
    """A classifier family that records in which phase it was built (and whether the hub was offline)."""
    import huggingface_hub.constants as hub

    from lit_vce.classifiers.loaders import load_world_classifier

    BUILDS.append(weights.phase())
    log = os.environ.get("LIT_VCE_TEST_BUILD_LOG")
    if log:
        with open(log, "a") as f:
            f.write(
                f"{os.environ.get('NODE_RANK', '0')} {os.environ.get('LOCAL_RANK', '0')} {weights.phase()} "
                f"{int(hub.HF_HUB_OFFLINE)}\n"
            )
    return load_world_classifier(name, **kwargs)


@pytest.fixture
def recording(monkeypatch):
    from lit_vce.registry import CLASSIFIER_FAMILIES

    monkeypatch.setitem(CLASSIFIER_FAMILIES._items, "rectest", _recording_family)
    BUILDS.clear()
    return BUILDS


def test_cache_only_puts_the_hub_offline_and_restores_it(monkeypatch):
    import huggingface_hub.constants as hub

    for k in ("LIT_VCE_OFFLINE", "HF_HUB_OFFLINE", "RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    assert weights.may_download() and weights.phase() is None
    with weights.cache_only():
        assert hub.is_offline_mode() and os.environ["HF_HUB_OFFLINE"] == "1"
        assert not weights.may_download() and "prepare_data" in weights.no_download_reason()
    assert not hub.is_offline_mode() and "HF_HUB_OFFLINE" not in os.environ
    monkeypatch.setenv("RANK", "1")
    assert not weights.may_download() and "rank 1" in weights.no_download_reason()
    with weights.fetching():  # the fetching process of a run downloads whatever its rank
        assert weights.may_download()
    monkeypatch.setenv("LIT_VCE_OFFLINE", "1")
    with weights.fetching():
        assert not weights.may_download()


def test_a_cache_only_process_never_downloads_a_missing_robustbench_checkpoint(tmp_path, monkeypatch):
    from lit_vce.classifiers import load_classifier

    monkeypatch.delenv("LIT_VCE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with (
        weights.cache_only(),
        pytest.raises(MissingWeightsError, match="Salman2020Do_R18.pt is missing .*prepare_data"),
    ):
        load_classifier("robustbench:Salman2020Do_R18", model_dir=str(tmp_path))


def test_a_deferred_stage_builds_in_prepare_data_once(recording):
    from lit_vce.lightning.module import VCEModule
    from lit_vce.lightning.stage import deferred_build
    from lit_vce.methods import ClassifierGuidance

    eager = VCEModule(classifier="rectest:robust", method=ClassifierGuidance(num_steps=2), fid_features="none")
    assert recording == [None] and eager.classifier.name == "robust"
    recording.clear()
    with deferred_build():
        module = VCEModule(classifier="rectest:robust", method=ClassifierGuidance(num_steps=2), fid_features="none")
    assert recording == [] and not hasattr(module, "metrics")  # nothing loaded by the constructor
    module.prepare_data()
    module.setup("predict")  # the fetching process built already: no second build
    assert recording == ["fetch"] and module.metrics is not None and module.run_name == "classifier_guidance-robust"
    with deferred_build():
        other = VCEModule(classifier="rectest:robust", method=ClassifierGuidance(num_steps=2), fid_features="none")
    other.setup("predict")  # without a Trainer of several processes: builds as usual
    assert recording[-1] is None


def test_constructors_reject_unknown_specs_before_loading_anything():
    from lit_vce.lightning.module import VCEModule
    from lit_vce.lightning.stage import deferred_build

    with deferred_build():
        with pytest.raises(UnknownNameError, match="did you mean timm:resnet50"):
            VCEModule(classifier="resnet50")
        with pytest.raises(UnknownNameError, match="unknown classifier family 'timmm'"):
            VCEModule(classifier="timmm:resnet50")
        with pytest.raises(UnknownNameError, match="timm has no model 'resnet5O'"):
            VCEModule(classifier="robust", second_classifier="timm:resnet5O")


def test_the_cli_defers_the_method_to_prepare_data_and_fetch_builds_it(capsys):
    from lit_vce.lightning.cli import TRAINER_DEFAULTS, VCECLI, resolve_method_names, run_predict
    from lit_vce.data.datamodule import VCEDataModule
    from lit_vce.lightning.module import VCEModule

    args = resolve_method_names(["--config", "world/dvce", "--model.method.init_args.num_steps", "3"])
    cli = VCECLI(
        VCEModule, VCEDataModule, args=args, trainer_defaults=TRAINER_DEFAULTS, run=False, seed_everything_default=False
    )
    assert cli.model.method is None and cli.config.model.method.class_path == "lit_vce.methods.DVCE"
    cli.model.prepare_data()
    assert type(cli.model.method).__name__ == "DVCE" and cli.model.method.describe()["num_steps"] == 3
    run_predict(["--config", "world/dvce"], run=False)
    assert "every model of this run loaded" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plugin(tmp_path: Path) -> Path:
    """A package on PYTHONPATH registering the recording family through an entry point
    (how another package would), so the CLI's processes have it."""
    site = tmp_path / "site"
    (site / "lit_vce_rectest-0.dist-info").mkdir(parents=True)
    (site / "lit_vce_rectest-0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: lit_vce_rectest\nVersion: 0\n"
    )
    (site / "lit_vce_rectest-0.dist-info" / "entry_points.txt").write_text(
        "[lit_vce.classifiers]\nrectest = test_weights:_recording_family\n"
    )
    return site


@pytest.mark.slow
@pytest.mark.parametrize("per_node", [True, False])
def test_two_simulated_nodes_fetch_on_one_process_per_node_or_one_in_all(tmp_path, per_node):
    site = _plugin(tmp_path)
    log = tmp_path / "builds.txt"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("SLURM_", "MASTER_", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK", "HF_HUB_OFFLINE", "LIT_VCE_OFFLINE")
        )
    }
    env.update(
        PYTHONWARNINGS="ignore",
        LIT_VCE_QUIET="1",
        LIT_VCE_TEST_BUILD_LOG=str(log),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        PYTHONPATH=os.pathsep.join([str(site), str(Path(__file__).parent)]),
    )
    cmd = [
        sys.executable,
        "-m",
        "lit_vce.cli",
        "predict",
        "--config",
        "world/classifier_guidance",
        "--model.method.init_args.num_steps",
        "2",
        "--model.classifier",
        "rectest:robust",
        "--model.second_classifier",
        "null",
        "--model.fid_features",
        "none",
        "--model.fetch_per_node",
        str(per_node).lower(),
        "--data.num_samples",
        "2",
        "--trainer.num_nodes",
        "2",
        "--trainer.devices",
        "1",
        "--trainer.strategy",
        "ddp",
        "--trainer.accelerator",
        "cpu",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, "--writer.output_dir", str(tmp_path / f"node{r}")],
            env={**env, "NODE_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    builds = sorted(log.read_text().split("\n")[:-1])
    if per_node:  # each node's local rank 0 fetches
        assert builds == ["0 0 fetch 0", "1 0 fetch 0"]
    else:  # a shared cache: global rank 0 fetches, node 1 reads the cache with the hub offline
        assert builds == ["0 0 fetch 0", "1 0 cache 1"]
    assert (tmp_path / "node0" / "results.json").is_file()


def test_vgg19_is_found_in_the_torch_hub_cache_and_a_missing_one_names_both_places(tmp_path, monkeypatch):
    import torchvision

    from lit_vce.errors import MissingWeightsError
    from lit_vce.objectives.perceptual import VGG19_FILE, load_vgg19_features

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv("LIT_VCE_VGG_WEIGHTS", raising=False)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(MissingWeightsError, match=r"weights/vgg/vgg19-dcbbe73f\.pth or .*hub/checkpoints/vgg19"):
            load_vgg19_features(4)
        torch.manual_seed(0)
        feats = torchvision.models.vgg19().features[:4]
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(
            {f"features.{k}": v for k, v in feats.state_dict().items()}, tmp_path / "hub" / "checkpoints" / VGG19_FILE
        )
        got = load_vgg19_features(4)  # where torchvision itself would have put it
        assert torch.equal(got[0].weight, feats[0].weight)
    finally:
        torch.hub.set_dir(old)


def test_stable_diffusion_and_sam_offline_errors_name_what_is_missing_and_where(tmp_path):
    from lit_vce.diffusion.latent import load_latent_components
    from lit_vce.diffusion.masks import SamRefiner
    from lit_vce.errors import MissingWeightsError

    with pytest.raises(MissingWeightsError) as e:
        load_latent_components("someone/not-cached-sd", torch.float32)
    line = str(e.value)
    assert "'someone/not-cached-sd' is not in the Hugging Face cache" in line and "offline" in line
    assert "huggingface-cli download someone/not-cached-sd" in line and "\n" not in line
    with pytest.raises(MissingWeightsError, match=r"folder .*nowhere does not exist"):
        load_latent_components(str(tmp_path / "nowhere"), torch.float32)
    part = tmp_path / "sd"
    (part / "unet").mkdir(parents=True)
    (part / "unet" / "config.json").write_text("{}")
    (part / "tokenizer").mkdir()
    with pytest.raises(MissingWeightsError) as e:
        load_latent_components(str(part), torch.float32)
    assert "lacks vae/config.json, text_encoder/config.json, scheduler/, unet/ weights (*.safetensors)" in str(e.value)
    with pytest.raises(MissingWeightsError, match=r"Segment Anything model 'someone/sam' is not in the Hugging Face"):
        SamRefiner("someone/sam")
