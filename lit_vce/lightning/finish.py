"""The end of a ``predict`` run: the synced metrics (a collective on every rank) and, on
rank 0, ``samples.csv``, ``results.json`` and ``grid.png`` (a mixin of :class:`VCEModule`)."""

from __future__ import annotations

import time
from typing import Any

import torch


class FinishMixin:
    """``on_predict_epoch_end`` and what rank 0 writes."""

    @staticmethod
    def _cli_config(writer) -> dict[str, Any] | None:
        """The resolved LightningCLI config as run (``config.yaml`` in the run folder), when there is one."""
        path = writer.output_dir / "config.yaml"
        if not path.is_file():
            return None
        import yaml

        try:
            return yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            return None

    def on_predict_epoch_end(self) -> None:
        # compute() is a collective: every rank calls it, in the same order
        metrics, audit, n = self.metrics.compute()
        counts = torch.tensor(
            [self._counts[k] for k in ("skipped", "failed", "new", "not_selected")], device=self.device
        )
        counts = self.trainer.strategy.reduce(counts.float(), reduce_op="sum").long().tolist()
        self.trainer.strategy.barrier()
        wall = time.perf_counter() - self._t0
        self.final_results = {"metrics": metrics, "audit": audit, "n": n, "counts": counts, "wall_time_s": wall}
        writer = self.writer()
        if writer is not None:
            from .collectives import gather_run_rows

            # the rows of the samples this run covers (a folder may hold more: a larger earlier run)
            rows = gather_run_rows(writer, self.trainer, self._seen)  # a collective: every rank
            if self.trainer.is_global_zero:
                self._finalize(writer, rows, metrics, audit, n, counts, wall)
        self.log_values(
            {
                f"final/{k}": v
                for k, v in {
                    **metrics,
                    **(audit or {}),
                    "s_per_img": wall / max(counts[2], 1),
                    "wall_time_s": wall,
                }.items()
            },
            step=self._batches + 1,
        )
        self.close_loggers()
        self.metrics.reset()

    def _finalize(self, writer, rows, metrics, audit, n, counts, wall) -> None:
        dm = self.trainer.datamodule
        results = self.results(
            rows,
            metrics,
            n,
            self.method.name,
            wall_time_s=wall,
            audit=audit,
            resumed=counts[0],
            config={
                "method": self.method.describe(),
                "metrics": self.metrics.describe(),
                "metric_settings": self.metric_settings,
                "classifier": self.classifier_config,
                "deterministic": self.deterministic,
                "data": dict(dm.hparams) if dm is not None else {},
                "cli": self._cli_config(writer),
                "precision": str(self.trainer.precision),
                "dtype": str(next(self.classifier.parameters(), torch.empty(0)).dtype),
                "not_selected": counts[3],
            },
            protocol=dm.hparams.get("protocol") if dm is not None else None,
            dataset=dm.hparams.get("dataset") if dm is not None else None,
        )
        record = writer.run_record or {}
        results["attempts"] = int(record.get("attempts", 1))
        if record.get("forced"):
            results["warnings"].append("samples of more than one configuration (--writer.resume force)")
        outside = len(writer.done_ids()) - len(rows)
        if outside > 0:
            self.print(
                f"{outside} other finished samples in {writer.output_dir} are not part of this run (not counted)"
            )
        self.finalize(writer.output_dir, rows, results)
        skipped = f", {counts[0]} skipped (already done)" if counts[0] else ""
        if self._selects:
            skipped += f", {counts[3]} not selected by the protocol"
        self.print(
            f"{self.run_name}: {counts[2]} new samples{skipped}, {counts[1]} failed; flip rate "
            f"{metrics['flip_rate']:.3f}; "
            f"results in {writer.output_dir / 'results.json'}"
        )
