"""The run's rows across processes: every rank's rows on every rank (:func:`gather_rows`),
and the whole run's rows on global rank 0 read from each node's run folder
(:func:`gather_run_rows`). Both are collectives under DDP: call them on every rank."""

from __future__ import annotations

from typing import Any

import torch


def gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows on every rank (a collective under DDP; the rows themselves otherwise)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(rows)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in part]


def gather_run_rows(writer, trainer, keep: set[str] | None = None) -> list[dict[str, Any]] | None:
    """The whole run's rows on global rank 0 (``None`` on the other ranks), sorted by
    sample id: a collective, so no shared filesystem is needed for them.

    The first process of each node reads its node's run folder (every rank's rows, the
    resumed ones included) and sends it to rank 0, which merges them by sample id; on
    a shared filesystem the nodes send the same rows and the merge drops the copies.
    With ``keep`` (each rank's ids of the samples this run covers), only the rows of
    the union of every rank's ``keep`` remain. Images stay where they were written (on
    each node's disk without a shared one). Call after a barrier, on every rank."""
    rows = writer.collect_rows() if trainer.local_rank == 0 else []
    ids = sorted(keep) if keep is not None else None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((rows, ids), parts, dst=0)
        if dist.get_rank() != 0:
            return None
        rows = [r for part in parts for r in part[0]]
        ids = None if keep is None else [s for part in parts for s in part[1]]
    merged = {r["sample_id"]: r for r in rows}
    wanted = sorted(merged) if ids is None else sorted(set(ids) & set(merged))
    return [merged[k] for k in wanted]
