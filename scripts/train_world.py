#!/usr/bin/env python
"""Train the embedded world's models with Lightning and write them as package data.

    python scripts/train_world.py                       # all four models, then evaluate
    python scripts/train_world.py --models ddpm         # one model
    python scripts/train_world.py --evaluate-only       # re-measure the shipped models

Writes ``lit_vce/assets/world/{biased,robust,oracle,ddpm}.safetensors`` (or into
``--out``) and ``metadata.json`` with the measured accuracies that the README
quotes. The default settings reproduce the shipped weights on 2 CPU cores in
well under an hour.
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
from lit_vce.world.training import WorldClassifierModule, WorldDiffusionModule

CLASSIFIERS = {
    # name: (regime, kind, steps, batch size)
    "oracle": ("balanced", "oracle", 1200, 128),
    "biased": ("biased", "standard", 300, 128),
    "robust": ("balanced", "robust", 1000, 64),
}


def _loader(regime: str, steps: int, batch: int, seed: int) -> DataLoader:
    # the world is procedural: every training step sees new images
    data = ShapesWorld(regime, "train", size=steps * batch, seed=seed)
    return DataLoader(data, batch_size=batch, shuffle=False, num_workers=1, persistent_workers=True)


def _trainer(steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        log_every_n_steps=50, enable_model_summary=False,
    )


def save(module: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["oracle", "biased", "robust", "ddpm"])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "lit_vce" / "assets" / "world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ddpm-steps", type=int, default=3000)
    p.add_argument("--ddpm-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: library default)")
    p.add_argument("--evaluate-only", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    timings = {}
    if not args.evaluate_only:
        for name in args.models:
            L.seed_everything(args.seed + 1000 * (1 + list(CLASSIFIERS).index(name) if name in CLASSIFIERS else 0), workers=True)
            t0 = time.time()
            if name in CLASSIFIERS:
                regime, kind, steps, batch = CLASSIFIERS[name]
                module = WorldClassifierModule(kind=kind, max_steps=steps)
                _trainer(steps).fit(module, _loader(regime, steps, batch, args.seed))
                save(module.net, args.out / f"{name}.safetensors")
            elif name == "ddpm":
                module = WorldDiffusionModule(max_steps=args.ddpm_steps)
                _trainer(args.ddpm_steps).fit(module, _loader("balanced", args.ddpm_steps, args.ddpm_batch, args.seed))
                save(module.ema, args.out / "ddpm.safetensors")
            else:
                raise SystemExit(f"unknown model {name!r}")
            timings[name] = round(time.time() - t0, 1)
            print(f"{name}: trained in {timings[name]} s")
    meta_path = args.out / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.setdefault("training_seconds", {}).update(timings)
    meta["training"] = {"classifiers": CLASSIFIERS, "ddpm_steps": args.ddpm_steps, "ddpm_batch": args.ddpm_batch, "seed": args.seed}
    import os

    os.environ["LIT_VCE_WORLD_DIR"] = str(args.out)
    from lit_vce.world.evaluation import evaluate_world_models  # after training: needs the weights

    meta["accuracy"] = evaluate_world_models(seed=args.seed)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["accuracy"], indent=2))


if __name__ == "__main__":
    main()
