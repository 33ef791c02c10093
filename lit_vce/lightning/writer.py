"""The prediction writer: per sample a counterfactual PNG, the original PNG and a
metadata row, written atomically and keyed by sample id, so that a re-run skips
what is finished (resume) and a crash never leaves half-written files.

Layout of ``output_dir``::

    counterfactuals/<key>.png   originals/<key>.png   samples/<key>.json
    samples.csv                 results.json          grid.png

A sample is finished when its ``samples/<key>.json`` exists (it is written last).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ..io import (atomic_write_bytes, load_png, quantize, remove_stray_temporaries, sample_key, save_png, to_uint8,  # noqa: F401
                  write_json, write_rows_csv)

ROW_FIELDS = [
    "sample_id", "source", "target", "pred_before", "conf_before", "pred_after", "conf_after", "target_conf_before",
    "target_conf_after", "success", "success_independent", "l1", "l2", "lpips", "latent_l1", "latent_l2", "cout",
    "failure", "method", "seed", "seconds",
]


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows on every rank (a collective under DDP; the rows themselves otherwise)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(rows)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in part]


def gather_run_rows(writer: "VCEPredictionWriter", trainer) -> list[dict[str, Any]] | None:
    """The whole run's rows on global rank 0 (``None`` on the other ranks), sorted by
    sample id: a collective, so no shared filesystem is needed for them.

    The first process of each node reads its node's run folder (every rank's rows, the
    resumed ones included) and sends it to rank 0, which merges them by sample id; on
    a shared filesystem the nodes send the same rows and the merge drops the copies.
    Images stay where they were written (on each node's disk without a shared one).
    Call after a barrier, on every rank."""
    rows = writer.collect_rows() if trainer.local_rank == 0 else []
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(rows, parts, dst=0)
        if dist.get_rank() != 0:
            return None
        rows = [r for part in parts for r in part]
    merged = {r["sample_id"]: r for r in rows}
    return [merged[k] for k in sorted(merged)]


class VCEPredictionWriter(BasePredictionWriter):
    """Writes each batch's outputs as they come (``write_interval="batch"``).

    Args:
        output_dir: the run folder.
        save_originals: also save the (preprocessed) original as PNG.
        fields: the per-sample columns (default: the VCE ones, :data:`ROW_FIELDS`).
        resume: finished samples in ``output_dir`` are skipped; ``"auto"`` refuses a
            folder whose recorded configuration (``run.json``: seed, method, classifier,
            data) differs and names the differing keys, ``"force"`` resumes anyway.
    """

    def __init__(self, output_dir: str = "runs/vce", save_originals: bool = True, fields: list[str] | None = None,
                 resume: str = "auto"):
        super().__init__(write_interval="batch")
        if resume not in ("auto", "force"):
            raise ValueError("resume must be 'auto' (only into a run of the same configuration) or 'force'")
        self.resume = resume
        self.output_dir = Path(output_dir)
        self.save_originals = save_originals
        self.fields = list(fields) if fields else ROW_FIELDS
        self._done: set[str] | None = None

    # --- resume ----------------------------------------------------------------
    def done_ids(self) -> set[str]:
        """Sample ids finished by earlier runs in this folder."""
        if self._done is None:
            self._done = set()
            for p in (self.output_dir / "samples").glob("*.json"):
                try:
                    self._done.add(json.loads(p.read_text())["sample_id"])
                except (json.JSONDecodeError, KeyError, OSError):
                    continue  # an unreadable row is redone
        return self._done

    def load_done(self, sample_id: str) -> tuple[dict[str, Any], torch.Tensor | None]:
        key = sample_key(sample_id)
        row = json.loads((self.output_dir / "samples" / f"{key}.json").read_text())
        png = self.output_dir / "counterfactuals" / f"{key}.png"
        return row, (load_png(png) if png.is_file() else None)

    def setup(self, trainer, pl_module, stage: str) -> None:
        for sub in ("counterfactuals", "originals", "samples"):
            (self.output_dir / sub).mkdir(parents=True, exist_ok=True)
        if trainer is None or trainer.is_global_zero:
            remove_stray_temporaries(self.output_dir)
        self._done = None
        self.done_ids()

    # --- writing ---------------------------------------------------------------
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        if not prediction:
            return
        self.write_samples(prediction["new_rows"], prediction["counterfactuals"], prediction["originals"])

    def write_samples(self, rows: list[dict[str, Any]], counterfactuals: torch.Tensor | None, originals: torch.Tensor | None) -> None:
        cf = to_uint8(counterfactuals) if counterfactuals is not None and len(rows) else None
        orig = to_uint8(originals) if originals is not None and self.save_originals and len(rows) else None
        for i, row in enumerate(rows):
            key = sample_key(row["sample_id"])
            if cf is not None and row.get("has_image", True):
                save_png(self.output_dir / "counterfactuals" / f"{key}.png", cf[i])
                if orig is not None:
                    save_png(self.output_dir / "originals" / f"{key}.png", orig[i])
            clean = {k: row.get(k) for k in self.fields}
            if row.get("diagnostics"):
                clean["diagnostics"] = row["diagnostics"]
            atomic_write_bytes(self.output_dir / "samples" / f"{key}.json", json.dumps(clean).encode())
            self.done_ids().add(row["sample_id"])

    def collect_rows(self) -> list[dict[str, Any]]:
        """All finished rows in this folder (every rank's), sorted by sample id."""
        rows = []
        for p in (self.output_dir / "samples").glob("*.json"):
            rows.append(json.loads(p.read_text()))
        return sorted(rows, key=lambda r: r["sample_id"])

    def write_table(self, rows: list[dict[str, Any]]) -> Path:
        """``samples.csv``: the fields, then one ``diag_<name>`` column per method diagnostic."""
        names = sorted({k for r in rows for k in (r.get("diagnostics") or {})})
        flat = [{**r, **{f"diag_{k}": (r.get("diagnostics") or {}).get(k) for k in names}} for r in rows]
        return write_rows_csv(self.output_dir / "samples.csv", flat, self.fields + [f"diag_{k}" for k in names])

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        return write_json(self.output_dir / name, data)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume(writer: VCEPredictionWriter, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Compare ``fingerprint`` (what decides a sample's output) with the folder's ``run.json``.

    Returns the record to keep (the fingerprint and the generation time of earlier
    attempts). Raises ``ValueError`` naming the differing keys when finished samples
    exist under another configuration and ``writer.resume`` is not ``"force"``.
    """
    fp = json.loads(json.dumps(fingerprint, default=str))  # tuples -> lists, as stored
    path = writer.output_dir / "run.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old and writer.done_ids():
        a, b = _flatten(old.get("fingerprint", {})), _flatten(fp)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff and writer.resume != "force":
            shown = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in diff[:6])
            raise ValueError(f"{writer.output_dir} holds {len(writer.done_ids())} samples of a run with another configuration: "
                             f"{shown}{' ...' if len(diff) > 6 else ''}. Use another --writer.output_dir, or "
                             f"--writer.resume force to mix them anyway")
    attempts = list(old.get("generation_seconds", [])) if writer.done_ids() else []
    return {"fingerprint": fp, "generation_seconds": attempts}
