#!/usr/bin/env python
"""Train the embedded world's models with Lightning and write them as package data.

    python scripts/train_world.py                       # all five models, then evaluate
    python scripts/train_world.py --models ddpm         # one model
    python scripts/train_world.py --evaluate-only       # re-measure the shipped models

Writes ``lit_vce/assets/world/{biased,robust,oracle,watermarked,ddpm}.safetensors`` (or into
``--out``) and ``metadata.json`` with the measured accuracies that the README
quotes (``training.ddpm_stages`` records every ddpm training stage). The default
settings reproduce the shipped classifiers and the ddpm's first stage; the
shipped ddpm continues that stage with Min-SNR weighting, a lower learning rate,
a slower EMA and new images (about 85 minutes on one core):

    python scripts/train_world.py --models ddpm --threads 1 --ddpm-init lit_vce/assets/world/ddpm.safetensors \
        --ddpm-steps 4000 --ddpm-lr 5e-4 --ddpm-ema 0.999 --ddpm-snr-gamma 5 --ddpm-data-seed 1

RCSB's world prior, an I2SB inpainting bridge started from the shipped ddpm, is
``--models bridge`` (``bridge.safetensors``; its quality is measured with the others).
It writes a Lightning checkpoint every ``--bridge-save-every`` steps into
``bridge-checkpoints/``; ``--bridge-resume`` continues an interrupted run from it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from lit_vce.data.world import ShapesWorld
from lit_vce.diffusion.bridge_training import WorldBridgeModule
from lit_vce.world.training import WorldClassifierModule, WorldDiffusionModule

CLASSIFIERS = {
    # name: (regime, kind, steps, batch size[, bias of the regime's shortcut, default 0.98])
    "oracle": ("balanced", "oracle", 1200, 128),
    "biased": ("biased", "standard", 300, 128),
    "robust": ("balanced", "robust", 1000, 64),
    # the watermark always goes with the class in its training data: with 2 % of
    # images against it, the CNN learns the patch first (by step 50) and then the
    # shape from those 2 % (shape accuracy 0.99 on watermark_balanced at step 300)
    "watermarked": ("watermark", "standard", 300, 128, 1.0),
}


def _loader(regime: str, steps: int, batch: int, seed: int, bias: float = 0.98) -> DataLoader:
    # the world is procedural: every training step sees new images
    data = ShapesWorld(regime, "train", size=steps * batch, seed=seed, bias=bias)
    return DataLoader(data, batch_size=batch, shuffle=False, num_workers=1, persistent_workers=True)


def _trainer(steps: int, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks or []),
        log_every_n_steps=50,
        enable_model_summary=False,
        callbacks=callbacks,
    )


class _EMASnapshots(L.Callback):
    """Writes the ddpm's EMA weights every ``every`` steps (to pick a step by its samples)."""

    def __init__(self, every: int, folder: Path):
        self.every, self.folder = every, folder

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0:
            save(module.ema, self.folder / f"ddpm-step{step:06d}.safetensors")


def save(module: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def _train_bridge(args) -> None:
    """The world's I2SB bridge, from the world ddpm, resumable from its last checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from safetensors.torch import load_file

    folder = args.out / "bridge-checkpoints"
    last = folder / "last.ckpt"
    module = WorldBridgeModule(
        lr=args.bridge_lr,
        max_steps=args.bridge_steps,
        init=load_file(str(args.out / "ddpm.safetensors")),
        seed=args.seed,
    )
    ckpt = ModelCheckpoint(dirpath=folder, every_n_train_steps=args.bridge_save_every, save_last=True, save_top_k=0)
    resume = str(last) if args.bridge_resume and last.is_file() else None
    _trainer(args.bridge_steps, [ckpt]).fit(
        module, _loader("balanced", args.bridge_steps, args.bridge_batch, args.seed + 7), ckpt_path=resume
    )
    save(module.ema, args.out / "bridge.safetensors")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["oracle", "biased", "robust", "watermarked", "ddpm"])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "lit_vce" / "assets" / "world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ddpm-steps", type=int, default=3000)
    p.add_argument("--ddpm-batch", type=int, default=64)
    p.add_argument("--ddpm-lr", type=float, default=1e-3, help="peak learning rate of the ddpm's one-cycle schedule")
    p.add_argument("--ddpm-ema", type=float, default=0.995, help="EMA decay of the saved ddpm weights")
    p.add_argument(
        "--ddpm-snr-gamma", type=float, default=None, help="Min-SNR-gamma loss weighting (default: plain MSE)"
    )
    p.add_argument(
        "--ddpm-init",
        type=Path,
        default=None,
        help="continue training from these ddpm weights (a .safetensors file) instead of random ones",
    )
    p.add_argument(
        "--ddpm-data-seed",
        type=int,
        default=None,
        help="world seed of the ddpm's training images (default --seed; a continued run takes another "
        "seed so that it sees new images)",
    )
    p.add_argument(
        "--ddpm-save-every",
        type=int,
        default=0,
        help="also write the EMA weights every N steps to <out>/ddpm-checkpoints/ (0: only at the end)",
    )
    p.add_argument("--bridge-steps", type=int, default=2000)
    p.add_argument("--bridge-batch", type=int, default=32)
    p.add_argument("--bridge-lr", type=float, default=3e-4)
    p.add_argument("--bridge-save-every", type=int, default=250)
    p.add_argument("--bridge-resume", action="store_true", help="continue from bridge-checkpoints/last.ckpt")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: library default)")
    p.add_argument("--evaluate-only", action="store_true")
    p.add_argument("--no-evaluate", action="store_true", help="write the weights and timings, skip the measurements")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    timings = {}
    if not args.evaluate_only:
        for name in args.models:
            L.seed_everything(
                args.seed + 1000 * (1 + list(CLASSIFIERS).index(name) if name in CLASSIFIERS else 0), workers=True
            )
            t0 = time.time()
            if name in CLASSIFIERS:
                regime, kind, steps, batch, *bias = CLASSIFIERS[name]
                module = WorldClassifierModule(kind=kind, max_steps=steps)
                _trainer(steps).fit(module, _loader(regime, steps, batch, args.seed, *bias))
                save(module.net, args.out / f"{name}.safetensors")
            elif name == "ddpm":
                init = None
                if args.ddpm_init is not None:
                    from safetensors.torch import load_file

                    init = load_file(str(args.ddpm_init))
                module = WorldDiffusionModule(
                    lr=args.ddpm_lr,
                    ema_decay=args.ddpm_ema,
                    max_steps=args.ddpm_steps,
                    snr_gamma=args.ddpm_snr_gamma,
                    init=init,
                )
                data_seed = args.seed if args.ddpm_data_seed is None else args.ddpm_data_seed
                callbacks = (
                    [_EMASnapshots(args.ddpm_save_every, args.out / "ddpm-checkpoints")] if args.ddpm_save_every else []
                )
                _trainer(args.ddpm_steps, callbacks).fit(
                    module, _loader("balanced", args.ddpm_steps, args.ddpm_batch, data_seed)
                )
                save(module.ema, args.out / "ddpm.safetensors")
            elif name == "bridge":
                _train_bridge(args)
            else:
                raise SystemExit(f"unknown model {name!r}")
            timings[name] = round(time.time() - t0, 1)
            print(f"{name}: trained in {timings[name]} s")
    meta_path = args.out / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    training = meta.get("training", {})
    stages = training.pop("ddpm_stages", None) or (
        [
            {
                "steps": training.pop("ddpm_steps"),
                "batch": training.pop("ddpm_batch", None),
                "lr": 1e-3,
                "ema": 0.995,
                "snr_gamma": None,
                "init": None,
                "data_seed": training.get("seed", 0),
                "seconds": meta.get("training_seconds", {}).get("ddpm"),
            }
        ]
        if "ddpm_steps" in training
        else []
    )
    if "ddpm" in timings:  # a continued run adds a stage; a fresh one starts the list
        stage = {
            "steps": args.ddpm_steps,
            "batch": args.ddpm_batch,
            "lr": args.ddpm_lr,
            "ema": args.ddpm_ema,
            "snr_gamma": args.ddpm_snr_gamma,
            "init": args.ddpm_init.name if args.ddpm_init else None,
            "data_seed": args.seed if args.ddpm_data_seed is None else args.ddpm_data_seed,
            "seconds": timings["ddpm"],
            "threads": args.threads or torch.get_num_threads(),
        }
        stages = (stages if args.ddpm_init is not None else []) + [stage]
        timings["ddpm"] = round(sum(st.get("seconds") or 0 for st in stages), 1)  # all stages together
    meta.setdefault("training_seconds", {}).update(timings)
    meta["training"] = {**training, "classifiers": CLASSIFIERS, "seed": args.seed, "ddpm_stages": stages}
    if "bridge" in timings:
        meta["training"]["bridge"] = {
            "steps": args.bridge_steps,
            "batch": args.bridge_batch,
            "lr": args.bridge_lr,
            "init": "ddpm.safetensors",
            "threads": args.threads or torch.get_num_threads(),
            "resumed": bool(args.bridge_resume),
        }
    if args.no_evaluate:
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        return
    import os

    os.environ["LIT_VCE_WORLD_DIR"] = str(args.out)
    from lit_vce.diffusion.world_quality import evaluate_world_models  # after training: needs the weights

    meta["accuracy"] = evaluate_world_models(seed=args.seed)
    if (args.out / "bridge.safetensors").is_file():
        from lit_vce.diffusion.world_quality import bridge_quality

        meta["accuracy"].update(bridge_quality(seed=args.seed))
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["accuracy"], indent=2))


if __name__ == "__main__":
    main()
