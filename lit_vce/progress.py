"""Progress bars on long loops outside the Trainer's own bar (DiG-IN's inversion,
search and outer steps, evaluate's feature passes, zero-shot heads).

Bars go to stderr and are off when stderr is not a terminal (logs stay clean), under
``lit-vce ... --quiet`` or with ``LIT_VCE_QUIET=1``, and on every rank but 0.
"""

from __future__ import annotations

import os
import sys

__all__ = ["progress", "progress_enabled", "set_quiet", "env_rank"]


def env_rank() -> int:
    """This process's rank as its launcher's environment gives it (usable before the
    process group exists): ``RANK``, else ``LOCAL_RANK``, else ``SLURM_PROCID``, else 0."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def set_quiet(quiet: bool = True) -> None:
    """Turn the bars off (or back on) for this process and the processes it starts."""
    os.environ["LIT_VCE_QUIET"] = "1" if quiet else "0"


def progress_enabled() -> bool:
    if os.environ.get("LIT_VCE_QUIET", "0") not in ("", "0"):
        return False
    if env_rank() != 0:
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(iterable=None, desc: str | None = None, total: int | None = None, leave: bool = False, **kwargs):
    """``tqdm(iterable, ...)`` when bars are enabled, else a bar that shows nothing
    (same interface: ``update``, ``set_postfix``, iteration)."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable, desc=desc, total=total, leave=leave, disable=not progress_enabled(), dynamic_ncols=True, **kwargs
    )
