"""Clusters on one machine: two simulated nodes without a shared filesystem give the
bytes and metrics of one process; the SLURM script orders its arguments and derives
workers and paths from SLURM's variables; a preempted SLURM job (faked variables,
SIGUSR1) is requeued and resumes by sample id; loggers receive the run's values."""

from __future__ import annotations

import csv
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_vce.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "--config",
    "world/classifier_guidance",
    "--model.method.init_args.num_steps",
    "6",
    "--model.deterministic",
    "true",
    "--model.second_classifier",
    "null",
]


def _pngs(d: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted((d / "counterfactuals").glob("*.png"))}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK"))
    }
    env.update(PYTHONWARNINGS="ignore", LIT_VCE_QUIET="1", **extra)
    return env


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "lit_vce.cli", "predict", *FAST, *args]


@pytest.mark.slow
def test_two_simulated_nodes_without_a_shared_filesystem_give_the_run_of_one_process(tmp_path):
    one = tmp_path / "one"  # the one-process reference, in this process (one start-up less)
    main(_cli("--data.num_samples", "5", "--data.batch_size", "5", "--writer.output_dir", str(one))[3:])
    port = str(_free_port())
    nodes = [tmp_path / "node0", tmp_path / "node1"]  # each node's own disk
    procs = [
        subprocess.Popen(
            _cli(
                "--data.num_samples",
                "5",
                "--data.batch_size",
                "2",
                "--writer.output_dir",
                str(nodes[r]),
                "--trainer.num_nodes",
                "2",
                "--trainer.devices",
                "1",
                "--trainer.strategy",
                "ddp",
            ),
            env=_env(NODE_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    ref = json.loads((one / "results.json").read_text())
    got = json.loads((nodes[0] / "results.json").read_text())
    assert not (nodes[1] / "results.json").exists()
    assert got["world_size"] == 2 and got["n"] == ref["n"] == 5
    for key in ("flip_rate", "target_confidence", "l1", "l2", "fid", "sfid", "cout"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-6), key
    # rank 0's table holds every sample although node 1's rows never reached its disk
    rows0 = list(csv.DictReader((nodes[0] / "samples.csv").open()))
    rows1 = list(csv.DictReader((one / "samples.csv").open()))
    assert [r["sample_id"] for r in rows0] == [r["sample_id"] for r in rows1]
    assert [(r["success"], r["l2"]) for r in rows0] == [(r["success"], r["l2"]) for r in rows1]
    p0, p1 = _pngs(nodes[0]), _pngs(nodes[1])
    assert p0 and p1 and not set(p0) & set(p1)  # the images stay on the node that made them
    ref_png = _pngs(one)
    assert {**p0, **p1}.keys() == ref_png.keys()
    assert all(np.array_equal({**p0, **p1}[k], ref_png[k]) for k in ref_png)


def _fake_srun(tmp_path: Path, record: bool) -> Path:
    """A stand-in ``srun``: records its arguments and ``SRUN_CPUS_PER_TASK``, or runs the
    command as task 0, its output in the ``--output`` file (``%x``/``%j``/``%t`` expanded)."""
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir(parents=True, exist_ok=True)
    if record:
        body = (
            f'printf "%s\\n" "$@" > {tmp_path / "srun_args.txt"}\n'
            f'echo "${{SRUN_CPUS_PER_TASK:-unset}}" > {tmp_path / "srun_cpus.txt"}\n'
        )
    else:
        body = (
            'out=""\n'
            "while [[ $# -gt 0 && $1 == --* ]]; do [[ $1 == --output=* ]] && out=${1#--output=}; shift; done\n"
            "if [[ -n $out ]]; then\n"
            '  out=$(printf %s "$out" | sed "s/%x/$SLURM_JOB_NAME/;s/%j/$SLURM_JOB_ID/;s/%t/${SLURM_PROCID:-0}/")\n'
            '  exec "$@" > "$out" 2>&1\n'
            "fi\n"
            'exec "$@"\n'
        )
    srun.write_text("#!/usr/bin/env bash\n" + body)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    return srun


def _slurm_script(tmp_path: Path, script: str, args: list[str], **slurm) -> subprocess.CompletedProcess:
    srun = _fake_srun(tmp_path, record=True)
    env = _env(SRUN=str(srun), SLURM_SUBMIT_DIR=str(ROOT), LIT_VCE_LOG_DIR=str(tmp_path / "logs"), **slurm)
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _srun_args(tmp_path: Path) -> tuple[list[str], list[str]]:
    """(srun's own options, the command it runs)."""
    args = (tmp_path / "srun_args.txt").read_text().split("\n")[:-1]
    k = next(i for i, a in enumerate(args) if not a.startswith("--"))
    return args[:k], args[k:]


def test_the_slurm_script_puts_the_users_arguments_first_and_the_slurm_layout_last(tmp_path):
    proc = _slurm_script(
        tmp_path,
        "slurm_predict.sh",
        ["--config", "imagenet/base", "--trainer.devices", "1", "--data.root", "rel/val"],
        SLURM_JOB_NUM_NODES="2",
        SLURM_NTASKS_PER_NODE="4(x2)",
        SLURM_CPUS_PER_TASK="8",
        SLURM_JOB_NAME="lit-vce",
        SLURM_JOB_ID="77",
    )
    assert proc.returncode == 0, proc.stderr
    opts, args = _srun_args(tmp_path)
    assert args[0] == str(ROOT / ".venv" / "bin" / "lit-vce") and args[1] == "predict"  # absolute, from the submit dir
    assert args[2:4] == ["--data.num_workers", "7"]  # cpus-per-task minus the main process, overridable after
    assert args[4:10] == ["--config", "imagenet/base", "--trainer.devices", "1", "--data.root", "rel/val"]
    assert args[10:] == ["--trainer.num_nodes", "2", "--trainer.devices", "4", "--trainer.strategy", "ddp"]
    # srun gets the CPUs sbatch was given (Slurm >= 22.05 does not pass them on by itself)
    assert (tmp_path / "srun_cpus.txt").read_text().strip() == "8"
    assert f"--output={tmp_path / 'logs'}/%x-%j-rank%t.out" in opts and "--kill-on-bad-exit=1" in opts
    assert "per-rank logs: " + str(tmp_path / "logs" / "lit-vce-77-rank<N>.out") in proc.stdout


@pytest.mark.parametrize(
    ("slurm", "devices"),
    [
        (
            {"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)"},
            "4",
        ),  # --ntasks 8 --nodes 2
        ({"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "8"}, "8"),  # --ntasks 8
        ({"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "8"}, "4"),  # no placement variable: an even split
    ],
)
def test_the_slurm_layout_comes_from_ntasks_alone(tmp_path, slurm, devices):
    proc = _slurm_script(tmp_path, "slurm_predict.sh", ["--config", "imagenet/base"], **slurm)
    assert proc.returncode == 0, proc.stderr
    _, args = _srun_args(tmp_path)
    assert args[-6:] == ["--trainer.num_nodes", slurm["SLURM_JOB_NUM_NODES"], "--trainer.devices", devices] + [
        "--trainer.strategy",
        "ddp",
    ]
    assert args[2:4] == ["--data.num_workers", "1"]  # no --cpus-per-task: SLURM's default of 2, minus one
    assert (tmp_path / "srun_cpus.txt").read_text().strip() == "unset"


@pytest.mark.parametrize(
    "slurm",
    [
        {"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "5,3"},
        {"SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS": "8"},
    ],
)
def test_an_uneven_slurm_layout_is_refused_in_one_line(tmp_path, slurm):
    proc = _slurm_script(tmp_path, "slurm_predict.sh", ["--config", "imagenet/base"], **slurm)
    assert proc.returncode == 2 and not (tmp_path / "srun_args.txt").exists()
    assert proc.stderr.count("\n") == 1 and "--ntasks-per-node" in proc.stderr


def test_the_slurm_evaluate_script_is_requeued_and_lays_out_like_predict(tmp_path):
    text = (ROOT / "scripts" / "slurm_evaluate.sh").read_text()
    assert "#SBATCH --requeue" in text
    proc = _slurm_script(
        tmp_path,
        "slurm_evaluate.sh",
        ["runs/x", "--num-workers", "3"],
        SLURM_JOB_NUM_NODES="2",
        SLURM_NTASKS="8",
        SLURM_TASKS_PER_NODE="4(x2)",
        SLURM_CPUS_PER_TASK="6",
        LIT_VCE_RANK_LOGS="0",
    )
    assert proc.returncode == 0, proc.stderr
    opts, args = _srun_args(tmp_path)
    assert opts == ["--kill-on-bad-exit=1", "--label"]  # one log, lines labelled by rank
    assert args[1:] == ["evaluate", "runs/x", "--num-workers", "5", "--num-workers", "3", "--accelerator", "gpu"] + [
        "--num-nodes",
        "2",
        "--devices",
        "4",
    ]  # argparse: the user's --num-workers (later) wins
    assert (tmp_path / "srun_cpus.txt").read_text().strip() == "6"


def test_settings_on_the_command_line_win_over_every_config_file_wherever_they_stand():
    from lit_vce.lightning.cli import configs_first

    argv = ["--data.num_workers", "7", "--config", "imagenet/base", "--x=1", "--config=b.yaml", "--config", "c"]
    assert configs_first(argv) == ["--config", "imagenet/base", "--config=b.yaml", "--config", "c"] + [
        "--data.num_workers",
        "7",
        "--x=1",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "lit_vce.cli", "predict", "--data.num_workers", "7", "--config", "imagenet/base"]
        + ["--print_config"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    import yaml

    cfg = yaml.safe_load(out.stdout)
    assert cfg["data"]["num_workers"] == 7 and cfg["data"]["batch_size"] == 8  # the file's other settings stay


@pytest.mark.slow
def test_the_torchrun_script_runs_ddp_without_slurm(tmp_path):
    env = _env(NPROC_PER_NODE="2", LIT_VCE_LOG_DIR=str(tmp_path / "logs"), PYTHON=sys.executable)
    out = tmp_path / "run"
    args = [*FAST[:-2], "--data.num_samples", "4", "--data.batch_size", "2", "--writer.output_dir", str(out)]
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "torchrun_predict.sh"), *args, "--trainer.accelerator", "cpu"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["n"] == 4 and results["n_failed"] == 0
    logs = sorted(p.parent.name for p in (tmp_path / "logs").rglob("stderr.log"))
    assert logs == ["0", "1"]  # one log folder per rank


@pytest.mark.slow
def test_a_preempted_slurm_job_is_requeued_and_resumes_by_sample_id(tmp_path):
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir(parents=True)
    scontrol.write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path / "scontrol.txt"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    srun = _fake_srun(tmp_path, record=False)
    out = tmp_path / "run"
    env = _env(
        PATH=f"{scontrol.parent}:{os.environ['PATH']}",
        SRUN=str(srun),
        SLURM_SUBMIT_DIR=str(ROOT),
        LIT_VCE=str(Path(sys.executable).parent / "lit-vce"),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="lit-vce",
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_JOB_NUM_NODES="1",
        SLURM_NODEID="0",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODELIST="localhost",
        SLURM_CPUS_PER_TASK="1",
        MASTER_PORT=str(_free_port()),
        LIT_VCE_LOG_DIR=str(tmp_path / "logs"),
    )
    script = [
        "bash",
        str(ROOT / "scripts" / "slurm_predict.sh"),
        *FAST,
        "--data.num_samples",
        "6",
        "--data.batch_size",
        "2",
        "--writer.output_dir",
        str(out),
        "--trainer.accelerator",
        "cpu",
    ]
    first = subprocess.run(
        [*script, "--trainer.callbacks+=lit_vce.testing.PreemptAfterBatches"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rank_log = tmp_path / "logs" / "lit-vce-4242-rank0.out"  # the per-rank log file
    assert first.returncode != 0 and "simulated preemption" in rank_log.read_text()
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    ckpts = list(out.glob("hpc_ckpt_*.ckpt"))
    assert len(ckpts) == 1 and ckpts[0].stat().st_size < 200_000  # no weights in it: progress is the run folder
    assert len(list((out / "samples").glob("*.json"))) == 2
    second = subprocess.run(
        script, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )  # the requeued job
    assert second.returncode == 0, rank_log.read_text()[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 6 and results["resumed"] == 2
    ref = tmp_path / "ref"  # the uninterrupted run, in this process
    main(_cli("--data.num_samples", "6", "--data.batch_size", "2", "--writer.output_dir", str(ref))[3:])
    a, b = _pngs(out), _pngs(ref)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # the resumed run's figures are the uninterrupted run's: the 2 re-read samples count as the 4 new ones do
    expected = json.loads((ref / "results.json").read_text())
    assert (results["n"], results["n_success"], results["n_failed"]) == (
        expected["n"],
        expected["n_success"],
        expected["n_failed"],
    )
    assert results["sample_ids_hash"] == expected["sample_ids_hash"]
    for key, value in expected["metrics"].items():
        if isinstance(value, float):
            assert results["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
    rows = {r["sample_id"]: r for r in csv.DictReader((out / "samples.csv").open())}
    for r in csv.DictReader((ref / "samples.csv").open()):
        assert (rows[r["sample_id"]]["success"], rows[r["sample_id"]]["l2"]) == (r["success"], r["l2"])


@pytest.mark.slow
def test_loggers_get_per_batch_and_final_values(tmp_path):
    from lit_vce.cli import main

    out = tmp_path / "csv"
    main(["predict", *FAST, "--data.num_samples", "4", "--data.batch_size", "2", "--writer.output_dir", str(out)])
    rows = list(csv.DictReader((out / "logs" / "metrics.csv").open()))
    batch = [r for r in rows if r.get("batch/flip_rate")]
    final = [r for r in rows if r.get("final/flip_rate")]
    assert len(batch) == 2 and len(final) == 1 and float(batch[0]["batch/s_per_img"]) > 0
    results = json.loads((out / "results.json").read_text())
    assert float(final[0]["final/flip_rate"]) == pytest.approx(results["metrics"]["flip_rate"])
    off = tmp_path / "off"
    main(["predict", *FAST, "--data.num_samples", "2", "--writer.output_dir", str(off), "--trainer.logger", "false"])
    assert (off / "results.json").is_file() and not (off / "logs").exists()
    import yaml

    hparams = yaml.safe_load((out / "logs" / "hparams.yaml").read_text())  # what tells runs apart
    assert (hparams["method"], hparams["classifier"], hparams["seed"]) == ("classifier_guidance", "biased", 0)
    assert hparams["method_settings"]["num_steps"] == 6 and hparams["config"]["data"]["num_samples"] == 4
    assert hparams["num_samples"] == 4  # Lightning's own: the data module's
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    tb = tmp_path / "tb"
    main(
        [
            "predict",
            *FAST,
            "--data.num_samples",
            "3",
            "--data.batch_size",
            "2",
            "--model.seed",
            "5",
            "--writer.output_dir",
            str(tb),
            "--trainer.logger",
            "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.save_dir",
            str(tb / "tb"),
        ]
    )
    (events,) = list((tb / "tb").rglob("events.out.tfevents.*"))
    ea = EventAccumulator(str(events), size_guidance={"images": 0})
    ea.Reload()
    images = ea.Images("samples")  # per batch: a row per sample, original | counterfactual | difference
    assert [i.step for i in images] == [1, 2] and (images[0].width, images[0].height) == (96, 64)
    assert images[1].height == 32  # the second batch has one sample
    keys = set()
    for content in ea.PluginTagToContent("hparams").values():
        info = plugin_data_pb2.HParamsPluginData.FromString(content)
        if info.HasField("session_start_info"):
            keys |= set(info.session_start_info.hparams)
            values = info.session_start_info.hparams
    assert {"method", "classifier", "seed", "config/model/method/init_args/num_steps"} <= keys
    assert values["seed"].number_value == 5 and values["method"].string_value == "classifier_guidance"


@pytest.mark.slow
def test_wandb_offline_gets_the_hyperparameters_and_sample_images(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = _env(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path / "wandb"))
    proc = subprocess.run(
        _cli(
            "--data.num_samples",
            "2",
            "--writer.output_dir",
            str(out),
            "--trainer.logger",
            "lightning.pytorch.loggers.WandbLogger",
            "--trainer.logger.offline",
            "true",
            "--trainer.logger.project",
            "lit-vce-test",
            "--trainer.logger.save_dir",
            str(tmp_path / "wandb"),
        ),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )  # a process of its own: W&B writes its offline log out when the process ends
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list((tmp_path / "wandb").rglob("offline-run-*"))
    assert list((run_dir / "files" / "media" / "images").glob("samples_*.png"))
    record = next(run_dir.glob("*.wandb")).read_bytes()  # the offline run's log: the config is in it
    for text in (b"classifier_guidance", b"method_settings", b"metric_settings", b"final/flip_rate"):
        assert text in record, text
