"""The Trainer settings every stage shares: ``predict`` (LightningCLI's
``trainer_defaults``), ``evaluate`` and the analyses build their Trainers from
:data:`TRAINER_DEFAULTS`, so they differ only where a stage says so."""

from __future__ import annotations

from typing import Any

TRAINER_DEFAULTS: dict[str, Any] = {
    "inference_mode": False,  # guidance needs autograd inside predict_step
    "logger": None,  # None: a CSVLogger in the run folder (<output_dir>/logs/metrics.csv); false: none
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "accelerator": "auto",
    "devices": 1,
}


def build_trainer(**overrides: Any):
    """A ``lightning.Trainer`` from :data:`TRAINER_DEFAULTS` updated by ``overrides``; several
    devices or nodes get DDP unless ``strategy`` is given; the progress bar shows on a
    terminal unless ``--quiet`` (:func:`lit_vce.progress.progress_enabled`)."""
    import lightning as L

    from ..progress import progress_enabled

    kwargs = {**TRAINER_DEFAULTS, "enable_progress_bar": progress_enabled(), **overrides}
    if "strategy" not in kwargs:
        multi = int(kwargs.get("devices", 1) or 1) > 1 or int(kwargs.get("num_nodes", 1) or 1) > 1
        kwargs["strategy"] = "ddp" if multi else "auto"
    return L.Trainer(**kwargs)
