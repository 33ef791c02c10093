"""A lock on a run folder for the length of a run: one run writes into a folder at a time.

The first process of a run (global rank 0; the other ranks of the same DDP or
multi-node run share its lock) creates ``<run>/.lock`` exclusively, with its host,
process id, SLURM job id and start time, and keeps it fresh (a heartbeat thread
touches it every :data:`HEARTBEAT_S` seconds). A second process finds it and
refuses in one line, or waits for it with ``wait_s``. The lock is released when
the run ends (and at interpreter exit); a lock is stale, and taken over, when its
holder is dead: on the same host, its process no longer exists; on another host,
its heartbeat is older than :data:`STALE_S` seconds; in both cases a requeued SLURM
job (same job id) takes over its own earlier attempt's lock at once.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import LitVCEError

HEARTBEAT_S = 15.0
STALE_S = 120.0
LOCK_NAME = ".lock"


class RunFolderLocked(LitVCEError):
    """Another live process holds the run folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """The lock of one run folder (see the module docstring)."""

    def __init__(self, folder: str | Path, wait_s: float = 0.0):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.wait_s = float(wait_s)
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"

    def _record(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": self.token,
        }

    def holder(self) -> dict[str, Any] | None:
        """The current holder's record (None: no lock; ``{}``: a lock being written or unreadable)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {}

    def stale(self, rec: dict[str, Any]) -> bool:
        """Whether the lock described by ``rec`` belongs to a dead holder."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        job = os.environ.get("SLURM_JOB_ID")
        if job and rec.get("slurm_job_id") == job:
            return True  # our own job's earlier attempt (a requeue)
        if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
            return not _pid_alive(rec["pid"])
        return age > STALE_S

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunFolderLocked` naming the holder (after
        ``wait_s`` seconds of waiting, when given)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                rec = self.holder()
                if rec is not None and rec != {} and self.stale(rec):
                    self._take_over(rec)
                    continue
                if rec == {} and time.time() - self._mtime() > STALE_S:
                    self.path.unlink(missing_ok=True)  # an unreadable lock nobody refreshes
                    continue
                if time.monotonic() < deadline:
                    time.sleep(min(1.0, max(deadline - time.monotonic(), 0.05)))
                    continue
                who = (
                    f"process {rec.get('pid')} on {rec.get('host')} (since {rec.get('started')})"
                    if rec
                    else "another process"
                )
                raise RunFolderLocked(
                    f"{self.folder} is in use by {who}: one run writes into a folder at a time. Use another "
                    f"--writer.output_dir, wait for it (--writer.lock_wait SECONDS), or delete {self.path} if that "
                    "process is gone"
                )
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
            self.held = True
            break
        self._thread = threading.Thread(target=self._heartbeat, name="lit-vce-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _take_over(self, rec: dict[str, Any]) -> None:
        """Remove a dead holder's lock (only if it is still that holder's)."""
        if self.holder() == rec:
            self.path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Give the lock back (only our own; idempotent)."""
        if not self.held:
            return
        self._stop.set()
        rec = self.holder()
        if rec and rec.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.held = False
