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
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"
    )
    shutil.copytree(ROOT, src, ignore=ignore, symlinks=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
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
    site = Path(
        subprocess.check_output(
            [str(env_dir / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    py = env_dir / "bin" / "python"
    proc = subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(LIT_VCE_OFFLINE="1", LIT_VCE_QUIET="1")
    where = subprocess.check_output(
        [str(py), "-c", "import lit_vce; print(lit_vce.__file__)"], cwd=work, env=env, text=True
    )
    assert Path(where.strip()).is_relative_to(env_dir), where  # the wheel's copy, not the checkout
    listed = subprocess.run(
        [str(env_dir / "bin" / "lit-vce"), "configs"], cwd=work, env=env, capture_output=True, text=True
    )
    assert listed.returncode == 0 and "world/dvce" in listed.stdout and str(env_dir) in listed.stdout
    demo = subprocess.run(
        [
            str(env_dir / "bin" / "lit-vce"),
            "demo",
            "--num-samples",
            "2",
            "--batch-size",
            "2",
            "--methods",
            "classifier_guidance",
            "--classifiers",
            "biased",
            "--no-analyses",
            "--out",
            "out",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    results = json.loads((work / "out" / "classifier_guidance-biased" / "results.json").read_text())
    assert results["n"] == 2 and (work / "out" / "leaderboard.md").is_file()


def _import_graph():
    """lit_vce's modules and the lit_vce modules each imports anywhere in its body
    (module-level and deferred imports alike), read from the source with ast."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1] / "lit_vce"
    mods = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for mod, f in mods.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (
                    ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".")
                    if node.level
                    else node.module
                )
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod and t.startswith("lit_vce"):
                    edges.add(t)
        graph[mod] = edges
    return graph


def _cycles(graph):
    """The strongly connected components with more than one module (Tarjan)."""
    import sys

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    graph = _import_graph()
    assert {"lit_vce.cli", "lit_vce.demo", "lit_vce.methods.base", "lit_vce.lightning.cli"} <= set(graph)
    assert "lit_vce.lightning.cli" in graph["lit_vce.demo"]  # the graph sees deferred imports
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself


def test_lower_layers_do_not_import_higher_ones():
    graph = _import_graph()
    assert not [m for m in graph["lit_vce.provenance"] if m.startswith("lit_vce.objectives")]  # diffusion -> provenance
    world = [(a, b) for a, deps in graph.items() if a.startswith("lit_vce.world") for b in deps]
    assert not [e for e in world if e[1].startswith("lit_vce.diffusion")]  # the world is below the diffusion models
    assert not [m for m in graph["lit_vce.diffusion.base"] if m.startswith("lit_vce.methods")]


def test_the_commands_without_a_model_start_without_lightnings_cli_or_torch():
    import subprocess
    import sys

    probe = (
        "import sys\nfrom lit_vce.cli import main\nfor cmd in (['--help'], ['configs']):\n    try:\n        main(cmd)\n"
        "    except SystemExit:\n        pass\nprint('MODULES', 'torch' in sys.modules, 'lightning.pytorch.cli' in "
        "sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "MODULES False False"
