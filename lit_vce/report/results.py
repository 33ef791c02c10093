"""Results as data: one ``results.json`` per run, validated by a dataclass schema."""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

TRACKED_PACKAGES = ("lit_vce", "torch", "lightning", "torchmetrics", "diffusers", "timm")


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_sha() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


@dataclass
class RunResults:
    """The schema of ``results.json``."""

    run_name: str
    method: str
    classifier: str
    n: int
    n_success: int
    n_failed: int
    metrics: dict[str, float]
    seed: int
    wall_time_s: float
    sample_ids_hash: str
    config: dict[str, Any]
    audit: dict[str, float] | None = None
    # 95 % intervals [lo, hi] of the figures in ``metrics`` and ``audit`` (bootstrap over samples; for
    # FID/sFID over the sample set; settings under config.metrics.intervals)
    intervals: dict[str, list[float]] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=package_versions)
    git_sha: str | None = field(default_factory=git_sha)
    hardware: dict[str, Any] = field(default_factory=hardware)
    world_size: int = 1
    resumed: int = 0
    wall_time_total_s: float | None = None  # generation time over every attempt into this folder (resumes)
    evaluation_time_s: float | None = None  # `lit-vce evaluate`: its own time (wall_time_s stays the generation's)
    attempts: int = 1
    stage: str = "predict"  # "predict" (in-line), "evaluate" (re-read from disk) or "analysis" (disagree/neurons)
    protocol: str | None = None
    dataset: str | None = None
    schema_version: int = 1

    def __post_init__(self):
        if self.n < 0 or self.n_success < 0 or self.n_failed < 0:
            raise ValueError("counts must be non-negative")
        if self.stage not in ("predict", "evaluate", "analysis"):
            raise ValueError(f"stage must be 'predict', 'evaluate' or 'analysis', got {self.stage!r}")
        for key in ("flip_rate", "target_confidence", "l1", "l2") if self.stage != "analysis" else ():
            if key not in self.metrics:
                raise ValueError(f"metrics.{key} is missing")

    @classmethod
    def load(cls, path: str | Path) -> RunResults:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown result fields {sorted(unknown)}")
        return cls(**data)


def build_results(**kwargs) -> dict[str, Any]:
    """A validated results dict (see :class:`RunResults`)."""
    return asdict(RunResults(**kwargs))
