"""The prediction writer: per sample a counterfactual PNG, the original PNG and a
metadata row, written atomically and keyed by sample id, so that a re-run skips
what is finished (resume) and a crash never leaves half-written files.

Layout of ``output_dir``::

    counterfactuals/<key>.png   originals/<key>.png   samples/<key>.json
    samples.csv                 results.json          grid.png

A sample is finished when its ``samples/<key>.json`` exists (it is written last);
the record holds the sha256 of each image written for it and the hash of the run's
configuration (its fingerprint), so a resume regenerates a sample whose files are
missing or changed and never mixes samples of two configurations. The run's
fingerprint is in ``run.json`` before the first sample is written, and the folder
is locked for the length of the run (:mod:`lit_vce.lightning.lock`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ..errors import ConfigError, LitVCEError
from .collectives import gather_rows, gather_run_rows  # noqa: F401  (imported from here too)
from .resume import canonical_fingerprint, check_resume, fingerprint_hash  # noqa: F401  (imported from here too)
from ..io import (
    atomic_write_bytes,
    load_png,
    remove_stray_temporaries,
    sample_key,
    save_png,
    to_uint8,  # noqa: F401
    verify_file,
    write_json,
    write_rows_csv,
)

ROW_FIELDS = [
    "sample_id",
    "source",
    "target",
    "pred_before",
    "conf_before",
    "pred_after",
    "conf_after",
    "target_conf_before",
    "target_conf_after",
    "success",
    "success_independent",
    "l1",
    "l2",
    "l1_per_value",
    "lpips",
    "latent_l1",
    "latent_l2",
    "cout",
    "attributes_changed",
    "s3",
    "face_similarity",
    "failure",
    "method",
    "seed",
    "seconds",
]


class VCEPredictionWriter(BasePredictionWriter):
    """Writes each batch's outputs as they come (``write_interval="batch"``).

    Args:
        output_dir: the run folder. On the command line ``auto`` (the default) names it
            ``runs/{dataset}/{method}-{classifier}-{protocol}``, and a path may use those
            fields (:func:`lit_vce.lightning.cli_args.default_output_dir`); in Python give a folder.
        save_originals: also save the (preprocessed) original as PNG.
        fields: the per-sample columns (default: the VCE ones, :data:`ROW_FIELDS`).
        resume: finished samples in ``output_dir`` are skipped; ``"auto"`` refuses a
            folder whose samples were made under another configuration (``run.json``
            and each sample's record: seed, method, classifier, data) and names the
            differing keys, ``"force"`` resumes anyway (the results then say so).
        lock_wait: seconds to wait for another process that holds the folder's lock
            (0: refuse at once).
    """

    def __init__(
        self,
        output_dir: str = "auto",
        save_originals: bool = True,
        fields: list[str] | None = None,
        resume: str = "auto",
        lock_wait: float = 0.0,
    ):
        super().__init__(write_interval="batch")
        if resume not in ("auto", "force"):
            raise ValueError("resume must be 'auto' (only into a run of the same configuration) or 'force'")
        if lock_wait < 0:
            raise ValueError(f"lock_wait must be >= 0 seconds, got {lock_wait}")
        if output_dir == "auto" or "{" in str(output_dir):
            raise ValueError(
                f"output_dir {output_dir!r} is resolved by lit-vce predict from the run's settings; give a folder"
            )
        self.resume = resume
        self.lock_wait = float(lock_wait)
        self.output_dir = Path(output_dir)
        self.save_originals = save_originals
        self.fields = list(fields) if fields else ROW_FIELDS
        self._done: set[str] | None = None
        self._lock = None
        self._claimed = False
        #: the hash of the run's fingerprint, stored in every sample record
        self.fingerprint_hash: str | None = None
        #: run.json as this attempt wrote it (fingerprint, attempts)
        self.run_record: dict[str, Any] | None = None

    # --- resume ----------------------------------------------------------------
    def done_ids(self) -> set[str]:
        """Sample ids finished by earlier runs in this folder."""
        if self._done is None:
            self._done = set()
            for row in self._records():
                self._done.add(row["sample_id"])
        return self._done

    def _records(self):
        for p in (self.output_dir / "samples").glob("*.json"):
            try:
                row = json.loads(p.read_text())
                row["sample_id"]
            except (json.JSONDecodeError, KeyError, TypeError, OSError, UnicodeDecodeError):
                continue  # an unreadable row is redone
            yield row

    def forget(self, sample_id: str) -> None:
        """Treat a finished sample as not done (it is generated again)."""
        self.done_ids().discard(sample_id)

    def load_done(self, sample_id: str) -> tuple[dict[str, Any], torch.Tensor | None, str]:
        """A finished sample: ``(record, counterfactual or None, problem)``. ``problem`` names a
        missing, unreadable or changed file (checked against the record's sha256): the
        sample is then to be generated again."""
        key = sample_key(sample_id)
        path = self.output_dir / "samples" / f"{key}.json"
        try:
            row = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            return {}, None, f"unreadable record {path}: {e}"
        files = row.get("files") or {}
        for side in ("original", "counterfactual"):
            f = self.output_dir / f"{side}s" / f"{key}.png"
            if side in files:
                problem = verify_file(f, files[side])
                if problem:
                    return row, None, problem
        if row.get("failure"):
            return row, None, ""
        png = self.output_dir / "counterfactuals" / f"{key}.png"
        if not png.is_file():
            return row, None, f"counterfactual {png} is missing"
        try:
            return row, load_png(png), ""
        except Exception as e:  # PIL raises many types for truncated or corrupt files
            return row, None, f"counterfactual {png} is unreadable ({type(e).__name__}: {e})"

    # --- the run's claim on its folder: lock, configuration, run.json -----------
    def claim(self, trainer, pl_module) -> None:
        """Before anything is written: lock the folder (global rank 0, for the whole run),
        refuse a folder of another configuration, and record this attempt's fingerprint
        in ``run.json``. A refusal touches nothing and is raised on every rank as a
        one-line :class:`~lit_vce.errors.ConfigError`. Idempotent."""
        if self._claimed:
            return
        zero = trainer is None or trainer.is_global_zero
        message, fp_hash = "", None
        if zero:
            from .lock import RunLock

            try:
                self._lock = RunLock(self.output_dir, self.lock_wait)
                self._lock.acquire()
                fingerprint = pl_module.fingerprint() if hasattr(pl_module, "fingerprint") else None
                record = check_resume(self, fingerprint)
                record["attempts"] = int(record.get("attempts", 0)) + 1
                write_json(self.output_dir / "run.json", record)
                self.run_record = record
                fp_hash = record.get("fingerprint_hash")
            except LitVCEError as e:
                message = str(e)
                self.release()
        if trainer is not None and trainer.world_size > 1:
            message, fp_hash = trainer.strategy.broadcast((message, fp_hash))
        if message:
            raise ConfigError(message)
        self.fingerprint_hash = fp_hash
        self._claimed = True

    def release(self) -> None:
        """Give the folder's lock back (end of the run)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.claim(trainer, pl_module)
        for sub in ("counterfactuals", "originals", "samples"):
            (self.output_dir / sub).mkdir(parents=True, exist_ok=True)
        if trainer is None or trainer.is_global_zero:
            remove_stray_temporaries(self.output_dir)
        self._done = None
        self.done_ids()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.release()
        self._claimed = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.release()
        self._claimed = False

    # --- writing ---------------------------------------------------------------
    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not prediction:
            return
        self.write_samples(prediction["new_rows"], prediction["counterfactuals"], prediction["originals"])

    def write_samples(
        self, rows: list[dict[str, Any]], counterfactuals: torch.Tensor | None, originals: torch.Tensor | None
    ) -> None:
        """Per row: the counterfactual and original PNGs (when the row has them), then the
        record with their sha256 and the run's fingerprint hash (written last)."""
        cf = to_uint8(counterfactuals) if counterfactuals is not None and len(rows) else None
        orig = to_uint8(originals) if originals is not None and self.save_originals and len(rows) else None
        for i, row in enumerate(rows):
            key = sample_key(row["sample_id"])
            files = {}
            if row.get("has_image", True):
                if cf is not None and row.get("has_counterfactual", True):
                    files["counterfactual"] = save_png(self.output_dir / "counterfactuals" / f"{key}.png", cf[i])
                if orig is not None:
                    files["original"] = save_png(self.output_dir / "originals" / f"{key}.png", orig[i])
            clean = {k: row.get(k) for k in self.fields}
            if row.get("diagnostics"):
                clean["diagnostics"] = row["diagnostics"]
            clean["files"] = files
            if self.fingerprint_hash:
                clean["run_fingerprint"] = self.fingerprint_hash
            atomic_write_bytes(self.output_dir / "samples" / f"{key}.json", json.dumps(clean).encode())
            self.done_ids().add(row["sample_id"])

    def collect_rows(self) -> list[dict[str, Any]]:
        """All finished rows in this folder (every rank's), sorted by sample id."""
        return sorted(self._records(), key=lambda r: r["sample_id"])

    def write_table(self, rows: list[dict[str, Any]]) -> Path:
        """``samples.csv``: the fields, then one ``diag_<name>`` column per method diagnostic."""
        names = sorted({k for r in rows for k in (r.get("diagnostics") or {})})
        flat = [{**r, **{f"diag_{k}": (r.get("diagnostics") or {}).get(k) for k in names}} for r in rows]
        return write_rows_csv(self.output_dir / "samples.csv", flat, self.fields + [f"diag_{k}" for k in names])

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        return write_json(self.output_dir / name, data)
