"""What :func:`lit_vce.explain` returns: :class:`Explanation`, the counterfactuals of a batch
with their per-sample rows and figures, and its ``save()`` into a run folder that ``lit-vce
evaluate``, ``leaderboard`` and ``report`` read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Explanation:
    """What :func:`lit_vce.explain` returns."""

    originals: torch.Tensor  # (N, 3, H, W) in [0, 1], quantised as the counterfactuals
    counterfactuals: torch.Tensor  # (N, 3, H, W) in [0, 1]
    source: torch.Tensor  # (N,) the classes explained from
    target: torch.Tensor  # (N,) the classes asked for
    success: torch.Tensor  # (N,) bool: the classifier predicts the target and the sample did not fail
    rows: list[dict[str, Any]] = field(default_factory=list)  # per-sample values, as in samples.csv
    # the suite's metrics (lit_vce.metrics.accounting: a failed sample counts as not flipped and is in no other figure)
    metrics: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] | None = None  # the world's shape/background audit (world classifiers)
    intervals: dict[str, list[float]] = field(default_factory=dict)  # 95 % bootstrap intervals of ``metrics``
    method: dict[str, Any] = field(default_factory=dict)  # the method's name and settings
    seconds: float = 0.0
    classifier: str = ""  # the classifier's spec (or name, for an object)
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # the call's settings (metrics, batch, determinism)

    def __len__(self) -> int:
        return len(self.counterfactuals)

    def __repr__(self) -> str:
        shape = "x".join(str(d) for d in self.counterfactuals.shape)
        fr = self.metrics.get("flip_rate")
        figure = f", flip_rate={fr:.3f}" if isinstance(fr, (int, float)) else ""
        return (
            f"Explanation(method={self.method.get('name', '?')!r}, classifier={self.classifier!r}, n={self.n}, "
            f"n_success={self.n_success}, n_failed={self.n_failed}{figure}, counterfactuals={shape}, "
            f"seconds={self.seconds:.1f})"
        )

    @property
    def n(self) -> int:
        """Attempted samples."""
        return len(self.rows)

    @property
    def n_success(self) -> int:
        """Samples the classifier reads as their target (never a failed one)."""
        return sum(1 for r in self.rows if r.get("success") and not r.get("failure"))

    @property
    def n_failed(self) -> int:
        """Samples without a usable counterfactual (their ``failure`` says why; their image is
        the method's fallback, usually the original, or zeros when it was not finite)."""
        return sum(1 for r in self.rows if r.get("failure"))

    @property
    def failed(self) -> torch.Tensor:
        """(N,) bool: which samples failed."""
        return torch.tensor([bool(r.get("failure")) for r in self.rows], dtype=torch.bool)

    def save(self, folder: str | Path) -> Path:
        """Write a run folder with the layout ``lit-vce predict`` writes (docs/clusters.md,
        "Output layout"): ``counterfactuals/`` and ``originals/`` PNGs, one record per sample
        under ``samples/`` (with the PNGs' sha256), ``samples.csv``, ``results.json`` (its
        schema, naming the table it belongs to) and ``grid.png``; so ``lit-vce evaluate``,
        ``leaderboard`` and ``report`` read it as a run. A folder that already holds a run
        is refused (choose another: samples of two calls must not mix). Needs the metrics
        (``explain(..., metrics=True)``, the default). Returns the folder."""
        from .io import file_sha256
        from .lightning.stage import ids_hash
        from .lightning.writer import VCEPredictionWriter
        from .metrics.accounting import count_rows, failure_note
        from .report.grids import save_grid
        from .report.results import build_results

        folder = Path(folder)
        if not self.metrics:
            raise ValueError("save() writes a run with its results: explain(..., metrics=True) (the default)")
        if (folder / "results.json").exists() or (folder / "samples").is_dir() and any((folder / "samples").iterdir()):
            raise FileExistsError(f"{folder} already holds a run; save into a new folder")
        for sub in ("counterfactuals", "originals", "samples"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        writer = VCEPredictionWriter(output_dir=str(folder))
        order = sorted(range(len(self.rows)), key=lambda i: str(self.rows[i]["sample_id"]))
        name = self.method.get("name", "method")
        # explain() times the whole call: each sample's generation seconds are its share of it
        share = round(self.seconds / max(len(self.rows), 1), 4)
        rows = [
            {
                "method": name,
                "seed": self.seed,
                "seconds": share,
                **self.rows[i],
                "sample_id": str(self.rows[i]["sample_id"]),
            }
            for i in order
        ]
        writer.write_samples(rows, self.counterfactuals[order], self.originals[order])
        table = writer.write_table(rows)
        counts = count_rows(rows)
        note = failure_note(counts["n"], counts["n_failed"])
        total = sum(float(r["seconds"]) for r in rows if isinstance(r.get("seconds"), (int, float)))
        results = build_results(
            run_name=f"{name}-{self.classifier}",
            method=name,
            classifier=self.classifier,
            n=counts["n"],
            n_success=counts["n_success"],
            n_failed=counts["n_failed"],
            metrics=self.metrics,
            audit=self.audit,
            intervals=self.intervals,
            seed=self.seed,
            wall_time_s=round(self.seconds, 3),
            wall_time_total_s=round(total, 3),
            s_per_img=round(total / max(len(rows), 1), 4),
            sample_ids_hash=ids_hash(rows),
            config={"api": "lit_vce.explain", "method": self.method, "classifier": self.classifier, **self.config},
            warnings=[note] if note else [],
            dataset="python",
            files={"samples.csv": file_sha256(table)},
        )
        from .io import write_json

        write_json(folder / "results.json", results)  # renamed last, as predict does
        save_grid(folder, rows[:16])
        return folder
