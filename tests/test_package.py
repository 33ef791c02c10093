"""The installable package: the wheel carries configs and world assets, and an
installed wheel runs the demo from another directory (no checkout needed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the source tree (no build isolation: the
    installed setuptools builds it offline)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(ROOT, src, ignore=ignore, symlinks=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("lit_vce-*.whl")
    return whl


def test_the_wheel_ships_configs_and_world_assets(wheel):
    from lit_vce.config_files import shipped_configs

    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in shipped_configs():
        assert f"lit_vce/configs/{cfg}.yaml" in names
    assert "lit_vce/configs/world/dvce.yaml" in names and "lit_vce/configs/imagenet/base.yaml" in names
    assert any(n.startswith("lit_vce/assets/world/") and n.endswith(".safetensors") for n in names)
    assert any(n.startswith("lit_vce/assets/imagenet/") for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_an_installed_wheel_runs_the_demo_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    # reuse this environment's dependencies (a path entry: its .pth files, among them
    # this checkout's editable install, are not processed)
    site = Path(subprocess.check_output([str(env_dir / "bin" / "python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = env_dir / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(LIT_VCE_OFFLINE="1", LIT_VCE_QUIET="1")
    where = subprocess.check_output([str(py), "-c", "import lit_vce; print(lit_vce.__file__)"], cwd=work, env=env, text=True)
    assert Path(where.strip()).is_relative_to(env_dir), where  # the wheel's copy, not the checkout
    listed = subprocess.run([str(env_dir / "bin" / "lit-vce"), "configs"], cwd=work, env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and "world/dvce" in listed.stdout and str(env_dir) in listed.stdout
    demo = subprocess.run([str(env_dir / "bin" / "lit-vce"), "demo", "--num-samples", "2", "--batch-size", "2", "--methods",
                           "classifier_guidance", "--classifiers", "biased", "--no-analyses", "--out", "out"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    results = json.loads((work / "out" / "classifier_guidance-biased" / "results.json").read_text())
    assert results["n"] == 2 and (work / "out" / "leaderboard.md").is_file()
