"""``StageModule``: what the three prediction stages share.

``lit-vce predict`` (:class:`~lit_vce.lightning.module.VCEModule`), ``lit-vce
evaluate`` (:class:`~lit_vce.lightning.evaluate.EvaluateModule`) and the DiG-IN
analyses (:class:`~lit_vce.analyses.generate.AnalysisModule`) each load a
classifier, run something per batch and end with the same finalisation: rows
sorted by sample id, the ids' hash, success/failure counts, one validated
``results.json`` (:func:`lit_vce.report.results.build_results`), the per-sample
table and, for run folders, the grid. This base holds that ending, the writer
lookup and the autograd check, so each stage only says what differs.

Models are built in :meth:`StageModule.build` from their specs. Constructed in
Python, a stage builds at once; constructed by the CLI (inside :func:`deferred_build`),
it builds in Lightning's ``prepare_data`` hook on the process that fetches weights
(one per node, or one in all with ``fetch_per_node=False``) and in ``setup`` on the
others, from the caches only (:mod:`lit_vce.weights`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ..io import write_json, write_rows_csv


_DEFERRED = 0  # > 0 inside deferred_build()


@contextlib.contextmanager
def deferred_build() -> Iterator[None]:
    """Stages constructed inside build their models in ``prepare_data``/``setup``, not in
    the constructor (the CLI: every process constructs the run before the process group exists)."""
    global _DEFERRED
    _DEFERRED += 1
    try:
        yield
    finally:
        _DEFERRED -= 1


def ids_hash(rows: list[dict[str, Any]]) -> str:
    """A short hash of the rows' sample ids, in order (which samples a result covers)."""
    return hashlib.sha256("\n".join(r["sample_id"] for r in rows).encode()).hexdigest()[:16]


class StageModule(L.LightningModule):
    """Base of the prediction stages; subclasses set ``stage``, ``run_name``, ``seed``
    and ``classifier_spec`` and call :meth:`finalize` once, on global rank 0."""

    stage = "predict"
    run_name: str = "run"
    seed: int = 0
    classifier_spec: str = ""

    def __init__(self, fetch_per_node: bool = True):
        super().__init__()
        self.prepare_data_per_node = bool(fetch_per_node)  # Lightning: prepare_data on local rank 0 of every node
        self._deferred = _DEFERRED > 0
        self._built = False

    # --- models: built once, from their specs --------------------------------
    def build(self) -> None:
        """Construct the stage's models from their specs (subclasses; called once)."""

    def build_models(self) -> None:
        """Run :meth:`build` once, with the global RNG seeded by the stage's seed and restored
        afterwards, so every process builds the same (randomly initialised) parts."""
        if self._built:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.build()
        self._built = True

    def _build_unless_deferred(self) -> None:
        if not self._deferred:
            self.build_models()

    def prepare_data(self) -> None:
        """Lightning calls this on one process per node (``fetch_per_node=False``: one in
        all) while the others wait: build the models there, downloading what is missing."""
        from ..weights import fetching

        with fetching():
            self.build_models()

    def setup(self, stage: str) -> None:
        """Every process: build the models the fetching process did not build here, from the caches only."""
        if self._built:
            return
        from ..weights import cache_only

        many = self._trainer is not None and self.trainer.world_size > 1
        with cache_only() if many else contextlib.nullcontext():
            self.build_models()

    def writer(self):
        """The run folder's :class:`~lit_vce.lightning.writer.VCEPredictionWriter`, if one is attached."""
        from .writer import VCEPredictionWriter

        if self._trainer is None:
            return None
        return next((c for c in self.trainer.callbacks if isinstance(c, VCEPredictionWriter)), None)

    # --- preemption: Lightning's SLURM auto-requeue saves an "hpc" checkpoint on SIGUSR1
    # and restores it when the requeued job starts. A stage has nothing to train: its
    # weights come from their specs and its progress is the run folder's finished
    # samples, so the checkpoint carries no weights (seconds to write, not gigabytes)
    # and restoring it keeps the weights just loaded.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {}
        checkpoint["lit_vce_stage"] = self.stage

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.state_dict()

    # --- loggers: ``self.log`` is not allowed in predict hooks; the stage's loggers
    # (``--trainer.logger``; CSVLogger in the run folder by default) get values directly
    def log_values(self, values: dict[str, float], step: int | None = None) -> None:
        """Send finite scalar ``values`` to every logger of the Trainer (rank 0 only)."""
        import math

        if self._trainer is None or not self.trainer.loggers or not self.trainer.is_global_zero:
            return
        clean = {
            k: float(v)
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        }
        for logger in self.trainer.loggers:
            logger.log_metrics(clean, step=step)

    def log_hparams(self, params: dict[str, Any]) -> None:
        """Send ``params`` to every logger as hyperparameters (rank 0 only); Lightning
        itself logs only the data module's."""
        if self._trainer is None or not self.trainer.loggers or not self.trainer.is_global_zero:
            return
        for logger in self.trainer.loggers:
            logger.log_hyperparams(params)

    def log_samples(self, originals: torch.Tensor, counterfactuals: torch.Tensor, ids: list[str], step: int) -> None:
        """One image per batch, a row per sample: original | counterfactual | difference
        (summed over channels, as ``grid.png``), to the loggers that take images (rank 0)."""
        if not len(originals) or self._trainer is None or not self.trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        takers = [lg for lg in self.trainer.loggers if isinstance(lg, TensorBoardLogger) or hasattr(lg, "log_image")]
        if not takers:
            return
        from ..report.grids import triples

        t = triples(originals.detach().cpu(), counterfactuals.detach().cpu())  # (n, 3 tiles, 3, H, W)
        rows = torch.cat(list(t.unbind(1)), dim=3)  # (n, 3, H, 3W)
        image = torch.cat(list(rows), dim=1)  # (3, nH, 3W)
        caption = "original | counterfactual | difference: " + ", ".join(ids)
        for lg in takers:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_image("samples", image, global_step=step)
                lg.experiment.add_text("samples/ids", caption, global_step=step)
            else:
                lg.log_image(key="samples", images=[image], step=step, caption=[caption])

    def close_loggers(self) -> None:
        if self._trainer is not None and self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.save()

    @staticmethod
    def require_autograd(what: str) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{what} needs autograd: build the Trainer with inference_mode=False")

    def results(
        self,
        rows: list[dict[str, Any]],
        metrics: dict[str, Any],
        n: int,
        method: str,
        config: dict[str, Any],
        wall_time_s: float,
        n_success: int | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """The validated ``results.json`` of ``rows`` (sorted by sample id); ``fields`` are
        further :class:`~lit_vce.report.results.RunResults` fields (audit, protocol, ...).
        The metric suite's intervals (``self.metrics.last_intervals``) of the metrics and the
        audit figures go in by default.

        Counts follow :mod:`lit_vce.metrics.accounting`: ``n`` (the metrics' N) must be the
        number of rows, and a run with failures carries a warning that says how many."""
        from ..metrics.accounting import count_rows, failure_note
        from ..report.results import build_results

        suite = getattr(self, "metrics", None)
        if "intervals" not in fields and hasattr(suite, "last_intervals"):
            shown = set(metrics) | set(fields.get("audit") or {})
            fields["intervals"] = {k: v for k, v in suite.last_intervals.items() if k in shown}
        counts = count_rows(rows)
        if self.stage != "analysis" and n != counts["n"]:
            raise RuntimeError(
                f"{self.run_name}: the metrics cover {n} samples but the run has {counts['n']} rows; "
                "refusing to write results that mix two sample sets"
            )
        warnings = list(fields.pop("warnings", []))
        note = failure_note(counts["n"], counts["n_failed"])
        if note:
            warnings.insert(0, note)
        seconds = [
            float(r["seconds"])
            for r in rows
            if isinstance(r.get("seconds"), (int, float, str)) and str(r["seconds"]) != ""
        ]
        if seconds and "wall_time_total_s" not in fields:
            # generation time summed per sample as written (a killed attempt's samples included)
            fields["wall_time_total_s"] = round(sum(seconds), 3)
            fields["s_per_img"] = round(sum(seconds) / max(len(rows), 1), 4)
        return build_results(
            run_name=self.run_name,
            method=method,
            classifier=self.classifier_spec,
            n=n,
            n_success=counts["n_success"] if n_success is None else n_success,
            n_failed=counts["n_failed"],
            metrics=metrics,
            seed=self.seed,
            wall_time_s=wall_time_s,
            sample_ids_hash=ids_hash(rows),
            config=config,
            world_size=self.trainer.world_size,
            stage=self.stage,
            warnings=warnings,
            **fields,
        )

    def finalize(
        self,
        out_dir: str | Path,
        rows: list[dict[str, Any]],
        results: dict[str, Any],
        fields: list[str] | None = None,
        grid: bool = True,
    ) -> Path:
        """Write ``samples.csv`` (through the writer, with its diagnostics columns, when the
        rows are the writer's; else with ``fields``), ``results.json`` and, with ``grid``,
        ``grid.png``; atomically, each file whole or not at all. Returns the results' path."""
        from ..io import file_sha256

        out = Path(out_dir)
        writer = self.writer()
        if writer is not None and writer.output_dir == out:
            table = writer.write_table(rows)
        else:
            out.mkdir(parents=True, exist_ok=True)
            table = write_rows_csv(out / "samples.csv", rows, fields)
        # results.json is renamed last and names the table it belongs to: a reader that finds
        # a table of another evaluation beside it (a kill between the two renames) knows
        results = dict(results, files={"samples.csv": file_sha256(table)})
        path = write_json(out / "results.json", results)
        if grid:
            from ..report.grids import save_grid

            save_grid(out, rows[:16])
        return path
