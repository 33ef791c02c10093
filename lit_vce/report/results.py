"""Results as data: one ``results.json`` per run, validated by a dataclass schema."""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..errors import LitVCEError

#: every library whose version can change a figure: the stack and every model library a run may load through
TRACKED_PACKAGES = (
    "lit_vce",
    "torch",
    "torchvision",
    "lightning",
    "torchmetrics",
    "torch-fidelity",
    "diffusers",
    "transformers",
    "timm",
    "open_clip_torch",
    "robustbench",
    "numpy",
    "pillow",
)


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
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS), else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """Where the figures were computed: float results of long guided trajectories differ
    between CPU and GPU models (docs/clusters.md, Determinism), so both are recorded."""
    import torch  # here, not at the top: reading results (the leaderboard) needs no torch

    info: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
        try:
            info["cudnn"] = torch.backends.cudnn.version()
        except Exception:  # no cuDNN in this build
            pass
    return info


class InvalidResultsError(LitVCEError, ValueError):
    """A ``results.json`` that cannot be read, does not follow the schema, or does not
    belong to the table beside it; the message names the file."""


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
    attempts: int = 1  # attempts into this folder (a killed one included)
    s_per_img: float | None = None  # wall_time_total_s / n: generation seconds per attempted sample
    # notes a reader must see beside the figures (failures, forced resumes); the leaderboard marks such runs
    warnings: list[str] = field(default_factory=list)
    # sha256 of the files this result belongs to (samples.csv), checked by every reader
    files: dict[str, str] = field(default_factory=dict)
    stage: str = "predict"  # "predict" (in-line), "evaluate" (re-read from disk) or "analysis" (disagree/neurons)
    protocol: str | None = None
    dataset: str | None = None
    schema_version: int = 1

    def __post_init__(self):
        from ..metrics.accounting import check_counts

        for name in ("n", "n_success", "n_failed"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if not isinstance(self.metrics, dict):
            raise ValueError(f"metrics must be a mapping, got {type(self.metrics).__name__}")
        if self.stage != "analysis":
            fr = self.metrics.get("flip_rate")
            check_counts(self.n, self.n_success, self.n_failed, fr if isinstance(fr, (int, float)) else None)
        elif self.n < 0 or self.n_success < 0 or self.n_failed < 0:
            raise ValueError("counts must be non-negative")
        if self.stage not in ("predict", "evaluate", "analysis"):
            raise ValueError(f"stage must be 'predict', 'evaluate' or 'analysis', got {self.stage!r}")
        for key in ("flip_rate", "target_confidence", "l1", "l2") if self.stage != "analysis" else ():
            if key not in self.metrics:
                raise ValueError(f"metrics.{key} is missing")

    @property
    def marked(self) -> bool:
        """Whether a reader must look twice: failed samples or a warning."""
        return bool(self.n_failed or self.warnings)

    @classmethod
    def load(cls, path: str | Path, check_files: bool = True) -> RunResults:
        """Read and validate a ``results.json``; with ``check_files``, the table beside it must
        be the one it was written with. Raises :class:`InvalidResultsError` naming the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidResultsError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict):
            raise InvalidResultsError(f"{path}: not a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidResultsError(f"{path}: unknown result fields {sorted(unknown)}")
        try:
            res = cls(**data)
        except (TypeError, ValueError, AttributeError) as e:
            raise InvalidResultsError(f"{path}: {e}") from None
        if check_files:
            from ..io import verify_file

            for name, sha in (res.files or {}).items():
                problem = verify_file(path.parent / name, sha)
                if problem:
                    raise InvalidResultsError(
                        f"{path}: {problem}; the results and the table beside them are not from "
                        "the same run (an interrupted write): run it again"
                    )
        return res


def build_results(**kwargs) -> dict[str, Any]:
    """A validated results dict (see :class:`RunResults`)."""
    return asdict(RunResults(**kwargs))
