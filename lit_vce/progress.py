"""Progress bars on long loops outside the Trainer's own bar (DiG-IN's inversion,
search and outer steps, evaluate's feature passes, zero-shot heads).

Bars go to stderr and are off when stderr is not a terminal (logs stay clean), under
``lit-vce ... --quiet`` or with ``LIT_VCE_QUIET=1``, and on every rank but 0.
"""

from __future__ import annotations

import os
import sys

__all__ = ["progress", "progress_enabled", "set_quiet", "env_rank", "steps"]


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


def steps(iterable, desc: str, images: int, total: int | None = None, unit: str = "step"):
    """A method's steps inside one batch (sampler steps, outer steps, attempts) as a bar,
    drawn as :func:`progress` draws (terminal, rank 0, not quiet), whose postfix is the
    time per image: the batch's time so far, projected to all ``total`` steps, over its
    ``images``. Without a bar the iterable is returned as it is (no overhead)."""
    if not progress_enabled():
        return iterable
    import time

    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)

    def run():
        bar = progress(iterable, desc=desc, total=total, unit=unit)
        t0 = time.perf_counter()
        try:
            for done, item in enumerate(bar, 1):
                yield item
                if total:
                    per_image = (time.perf_counter() - t0) / done * total / max(images, 1)
                    bar.set_postfix_str(f"{per_image:.2f} s/img", refresh=False)
        finally:
            bar.close()

    return run()
