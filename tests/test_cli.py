"""User mistakes end in one line naming the option and the fix, not a traceback;
configs are found by name inside the package."""

from __future__ import annotations

import json

import pytest
import torch

from lit_vce.cli import main
from lit_vce.lightning.cli import resolve_method_names
from lit_vce.config_files import config_root, find_config, shipped_configs
from lit_vce.errors import ConfigNotFoundError


def _fails(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_configs_are_found_by_name_inside_the_package(tmp_path, monkeypatch):
    assert "world/dvce" in shipped_configs() and "imagenet/methods/digin" in shipped_configs()
    for name in ("world/dvce", "world/dvce.yaml", "configs/world/dvce.yaml"):
        assert find_config(name).resolve() == (config_root() / "world" / "dvce.yaml").resolve()
    local = tmp_path / "world" / "dvce.yaml"  # a local file of that name wins over the shipped one
    local.parent.mkdir()
    local.write_text("model: {}\n")
    monkeypatch.chdir(tmp_path)
    assert find_config("world/dvce.yaml").resolve() == local.resolve()
    with pytest.raises(ConfigNotFoundError, match="did you mean world/dvce"):
        find_config("world/dvec")
    argv = resolve_method_names(["--config", "imagenet/protocols/pairs"])
    assert argv[1] == str(config_root() / "imagenet" / "protocols" / "pairs.yaml")


def test_lit_vce_configs_lists_them(capsys):
    main(["configs"])
    out = capsys.readouterr().out
    assert "world/digin" in out and "imagenet/base" in out


def test_an_unknown_config_is_one_line(capsys):
    line = _fails(capsys, ["predict", "--config", "world/dvec"])
    assert line.startswith("lit-vce predict: --config world/dvec") and "did you mean world/dvce" in line


def test_a_bare_timm_name_as_classifier_suggests_the_family(capsys):
    line = _fails(capsys, ["predict", "--config", "world/classifier_guidance", "--model.classifier", "resnet50"])
    assert "did you mean timm:resnet50?" in line


def test_a_misspelt_timm_model_suggests_the_name(capsys):
    line = _fails(capsys, ["predict", "--config", "world/classifier_guidance", "--model.classifier", "timm:resnt50"])
    assert "timm has no model 'resnt50'" in line and "resnet50" in line


def test_an_unknown_family_is_one_line(capsys):
    line = _fails(capsys, ["predict", "--config", "world/classifier_guidance", "--model.classifier", "tim:resnet50"])
    assert "unknown classifier family 'tim'; did you mean timm?" in line


def test_a_misspelt_method_suggests_the_registered_one(capsys):
    line = _fails(capsys, ["predict", "--config", "world/classifier_guidance", "--model.method", "classifer_guidance"])
    assert "--model.method classifer_guidance: no such method; did you mean classifier_guidance?" in line


def test_a_methods_help_takes_its_registered_name(capsys):
    for name, arg in (("dvce", "cone_angle"), ("DVCE", "cone_angle"), ("ClassifierGuidance", "skip")):
        with pytest.raises(SystemExit) as e:
            main(["predict", "--config", "world/dvce", "--model.method.help", name])
        assert e.value.code == 0 and f"--model.method.{arg}" in capsys.readouterr().out, name
    assert resolve_method_names(["--model.method.help=rcsb"]) == ["--model.method.help=lit_vce.methods.rcsb.RCSB"]
    line = _fails(capsys, ["predict", "--config", "world/dvce", "--model.method.help", "dvc"])
    assert "--model.method.help dvc: no such method; did you mean dvce?" in line


def test_a_missing_data_folder_is_one_line(capsys, tmp_path):
    line = _fails(
        capsys,
        [
            "predict",
            "--config",
            "world/classifier_guidance",
            "--data.dataset",
            "imagefolder",
            "--data.root",
            str(tmp_path / "absent"),
            "--writer.output_dir",
            str(tmp_path / "run"),
        ],
    )
    assert line.startswith("lit-vce predict: --data:") and "absent" in line


def test_an_unknown_target_class_is_one_line(capsys, tmp_path):
    line = _fails(
        capsys,
        [
            "predict",
            "--config",
            "world/classifier_guidance",
            "--data.protocol",
            "pairs",
            "--data.pairs",
            "[[0, 7]]",
            "--writer.output_dir",
            str(tmp_path / "run"),
        ],
    )
    assert line.startswith("lit-vce predict: --data:") and "unknown class id 7" in line


def test_lit_vce_debug_keeps_the_traceback(monkeypatch):
    monkeypatch.setenv("LIT_VCE_DEBUG", "1")
    with pytest.raises(ConfigNotFoundError, match="world/dvec"):
        main(["predict", "--config", "world/dvec"])


class _TTY:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_bars_show_on_a_terminal_and_not_under_quiet(monkeypatch):
    from lit_vce.progress import progress, progress_enabled

    tty = _TTY()
    monkeypatch.setattr("sys.stderr", tty)
    monkeypatch.setenv("LIT_VCE_QUIET", "0")  # restored after the test, which main(["--quiet"]) changes
    for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    assert progress_enabled()
    list(progress(range(3), desc="null-text inversion", file=tty))
    assert "null-text inversion" in tty.text
    monkeypatch.setenv("RANK", "1")  # only rank 0 draws
    assert not progress_enabled()
    monkeypatch.delenv("RANK")
    main(["--quiet", "configs"])
    assert not progress_enabled()
    quiet = _TTY()
    list(progress(range(3), desc="null-text inversion", file=quiet))
    assert quiet.text == ""


def test_fetch_builds_the_run_without_generating(capsys, tmp_path):
    main(["fetch", "--config", "world/classifier_guidance", "--writer.output_dir", str(tmp_path / "run")])
    assert "every model of this run loaded" in capsys.readouterr().out
    assert not (tmp_path / "run" / "samples").exists() or not list((tmp_path / "run" / "samples").iterdir())


def test_missing_weights_offline_are_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_VCE_OFFLINE", "1")
    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path / "weights"))
    line = _fails(
        capsys,
        [
            "fetch",
            "--config",
            "world/classifier_guidance",
            "--model.second_classifier",
            "robustbench:Salman2020Do_R18",
            "--writer.output_dir",
            str(tmp_path / "run"),
        ],
    )
    assert line.startswith("  - robustbench:Salman2020Do_R18:") and "Salman2020Do_R18.pt is missing" in line


def test_fetch_runs_on_a_cpu_login_node_and_names_every_missing_file_at_once(tmp_path):
    """imagenet/base asks for accelerator gpu; fetch builds on this machine's CPU and tries
    every part: the classifier (also DVCE's robust partner: named once), the ADM
    checkpoint, the second classifier and Inception are named in one run."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TORCH_HOME", "LIT_VCE_"))}
    env.update(
        LIT_VCE_OFFLINE="1",
        LIT_VCE_WEIGHTS_DIR=str(tmp_path / "w"),
        TORCH_HOME=str(tmp_path / "torch"),
        HF_HOME=str(tmp_path / "hf"),
        PYTHONWARNINGS="ignore",
        CUDA_VISIBLE_DEVICES="",
    )
    argv = ["fetch", "--config", "imagenet/base", "--config", "imagenet/methods/dvce", "--data.root", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "lit_vce.cli", *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = proc.stderr[proc.stderr.index("lit-vce fetch: ") :].splitlines()
    assert err[0] == "lit-vce fetch: 4 weight file(s) of this run are missing:"
    items = err[1:5]
    assert all(line.startswith("  - ") for line in items)
    assert "Salman2020Do_R50.pt is missing" in items[0]
    assert "256x256_diffusion_uncond.pt does not exist" in items[1]
    assert items[2].startswith("  - timm:convnext_base.fb_in1k: offline and not cached")
    assert items[3].startswith("  - Inception FID: no local weights")


def test_a_setting_a_constructor_rejects_is_one_line(capsys, tmp_path):
    line = _fails(
        capsys,
        [
            "predict",
            "--config",
            "world/classifier_guidance",
            "--model.fid_features",
            "bogus",
            "--writer.output_dir",
            str(tmp_path / "run"),
        ],
    )
    assert line == "lit-vce predict: fid_features must be 'world', 'inception' or 'none'"


def test_default_run_folders_are_named_by_method_classifier_and_protocol():
    from jsonargparse import Namespace

    from lit_vce.errors import ConfigError
    from lit_vce.lightning.cli import default_output_dir

    def cfg(out, classifier="robust", method="lit_vce.methods.DVCE", **model):
        return Namespace(
            writer=Namespace(output_dir=out),
            model=Namespace(classifier=classifier, method=Namespace(class_path=method), **model),
            data=Namespace(protocol="random", dataset="world"),
        )

    assert default_output_dir(cfg("auto")) == "runs/world/dvce-robust-random"
    assert default_output_dir(cfg("auto", "biased")) == "runs/world/dvce-biased-random"  # no collision
    spec = "robustbench:Salman2020Do_R50"
    assert default_output_dir(cfg("runs/p/{classifier}", spec)) == "runs/p/robustbench_Salman2020Do_R50"
    assert default_output_dir(cfg("runs/mine")) == "runs/mine"  # a folder stays as given
    assert default_output_dir(cfg("auto", analysis="disagree")) == "runs/analyses/disagree-robust"
    with pytest.raises(ConfigError, match=r"unknown field 'bogus'; the fields are \{method\}"):
        default_output_dir(cfg("runs/{bogus}"))
    with pytest.raises(ValueError, match="resolved by lit-vce predict"):
        from lit_vce.lightning.writer import VCEPredictionWriter

        VCEPredictionWriter()


def test_a_quiet_run_prints_its_result_line_and_each_warning_once_on_one_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("LIT_VCE_QUIET", "PYTHONWARNINGS")}
    argv = ["--quiet", "predict", "--config", "world/classifier_guidance", "--data.num_samples", "2"]
    argv += ["--model.method.init_args.num_steps", "4", "--writer.output_dir", str(tmp_path / "run")]
    proc = subprocess.run(
        [sys.executable, "-m", "lit_vce.cli", *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    text = "\n".join(lines)
    for noise in ("GPU available", "TPU available", "Tip:", "litlogger", "warnings.warn(", "Predicting"):
        assert noise not in text, noise
    assert not [line for line in lines if line[:1].isspace()]  # no echoed source lines
    warned = [line for line in lines if line.startswith("warning: ")]
    assert warned and len(warned) == len(set(warned))  # FID on 2 images warns: once each, one line
    assert "FID on N=2 images" in text
    assert [line for line in lines if not line.startswith("warning: ")] == [
        f"classifier_guidance-biased: 2 new samples, 0 failed; flip rate "
        f"{json.loads((tmp_path / 'run' / 'results.json').read_text())['metrics']['flip_rate']:.3f}; "
        f"results in {tmp_path / 'run' / 'results.json'}"
    ]


def test_library_noise_is_dropped_where_it_misleads(monkeypatch):
    import logging

    from lit_vce.logs import tame_library_logs

    tame_library_logs()
    got = []

    class Keep(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    hub, diffusers_log = (
        logging.getLogger("huggingface_hub.hf_api"),
        logging.getLogger("diffusers.models.modeling_utils"),
    )
    lightning = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    for lg in (hub, diffusers_log, lightning):
        lg.addHandler(Keep())
    try:
        monkeypatch.setenv("LIT_VCE_OFFLINE", "1")
        hub.warning("Could not reach the Hub (offline mode). Using cached commit hash for 'x'.")
        diffusers_log.warning("Cannot initialize model with low cpu memory usage because `accelerate` was not found")
        lightning.info("💡 Tip: For seamless cloud logging ... litlogger")
        monkeypatch.setenv("LIT_VCE_QUIET", "1")
        lightning.info("GPU available: False, used: False")
        assert got == []
        monkeypatch.delenv("LIT_VCE_OFFLINE")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the suite's own setting
        monkeypatch.delenv("LIT_VCE_QUIET")
        hub.warning("Could not reach the Hub (timeout). Using cached commit hash for 'x'.")  # not asked: shown
        lightning.warning("a real warning")
        assert got == ["Could not reach the Hub (timeout). Using cached commit hash for 'x'.", "a real warning"]
    finally:
        for lg in (hub, diffusers_log, lightning):
            lg.handlers = [h for h in lg.handlers if not isinstance(h, Keep)]


@pytest.mark.parametrize(
    ("method", "kwargs", "label", "total"),
    [
        ("classifier_guidance", {"num_steps": 8, "skip": 0.5, "sampler": "ddpm"}, "classifier_guidance steps", 4),
        ("svce", {"eps": 3.0, "steps": 5}, "svce steps", 5),
        ("fastdime", {"num_steps": 6, "warmup": 1, "scales": (8.0, 15.0)}, "fastdime attempts", 2),
    ],
)
def test_progress_inside_a_batch_shows_the_steps_and_the_time_per_image(monkeypatch, method, kwargs, label, total):
    import sys

    from lit_vce import explain
    from lit_vce.data.datamodule import VCEDataModule

    dm = VCEDataModule(dataset="world", regime="balanced", split="test", num_samples=2, protocol="random")
    dm.setup("predict")
    items = [dm.dataset[i] for i in range(2)]
    tty = _TTY()
    monkeypatch.setenv("LIT_VCE_QUIET", "0")
    monkeypatch.setattr(sys, "stderr", tty)
    import functools

    import lit_vce.progress

    # every update drawn (a bar redraws at most every 0.1 s; these runs are faster)
    monkeypatch.setattr(lit_vce.progress, "progress", functools.partial(lit_vce.progress.progress, mininterval=0))
    images = torch.stack([it["image"] for it in items])
    targets = [it["target"] for it in items]
    explain(images, targets, classifier="robust", method=method, metrics=False, **kwargs)
    assert f"{label}:   0%" in tty.text and f"/{total} [" in tty.text and " s/img]" in tty.text
    assert ("attempts" in tty.text) == (method == "fastdime")  # one attempt: no bar for it
    monkeypatch.setenv("LIT_VCE_QUIET", "1")  # quiet: no bar at all
    quiet = _TTY()
    monkeypatch.setattr(sys, "stderr", quiet)
    explain(images, targets, classifier="robust", method=method, metrics=False, **kwargs)
    assert quiet.text == ""


@pytest.mark.parametrize(
    ("extra", "yaml_text", "expected"),
    [
        (
            ["--model.method.init_args.num_stepz", "5"],
            None,
            "lit-vce predict: --model.method.init_args.num_stepz: DVCE has no setting 'num_stepz'; did you mean "
            "num_steps? (`lit-vce predict --model.method.help dvce` lists them)",
        ),
        (
            [],
            "model:\n  method:\n    init_args:\n      num_stepz: 4\n",
            "lit-vce predict: --model.method.init_args.num_stepz: DVCE has no setting 'num_stepz'; did you mean "
            "num_steps? (`lit-vce predict --model.method.help dvce` lists them)",
        ),
        (
            ["--model.clasifier", "robust"],
            None,
            "lit-vce predict: --model.clasifier: no such setting; did you mean --model.classifier? "
            "(`lit-vce predict --help` lists them)",
        ),
        (
            [],
            "data:\n  batchsize: 4\n",
            "lit-vce predict: --data.batchsize: no such setting; did you mean --data.batch_size? "
            "(`lit-vce predict --help` lists them)",
        ),
        (
            ["--model.method.init_args.num_steps", "abc"],
            None,
            "lit-vce predict: --model.method.init_args.num_steps: Expected a <class 'int'>. Got value: abc",
        ),
    ],
)
def test_a_nested_setting_typo_is_one_line_with_a_did_you_mean(capsys, tmp_path, extra, yaml_text, expected):
    argv = ["predict", "--config", "world/dvce", *extra, "--writer.output_dir", str(tmp_path / "run")]
    if yaml_text:
        (tmp_path / "mine.yaml").write_text(yaml_text)
        argv += ["--config", str(tmp_path / "mine.yaml")]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]  # the only line
    assert not (tmp_path / "run").exists()


def test_a_dig_in_group_typo_names_the_group_setting():
    from lit_vce.lightning.cli import parse_error_line

    message = (
        'Parser key "model.method":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
        "    - Problem with given class_path 'lit_vce.methods.DiGIN':\n"
        "        Group 'optimisation' does not accept option 'outer_stepz'\n"
    )
    assert parse_error_line(message) == (
        "--model.method.init_args.optimisation.outer_stepz: DiGIN has no setting 'optimisation.outer_stepz'; "
        "did you mean optimisation.outer_steps? (`lit-vce predict --model.method.help digin` lists them)"
    )
