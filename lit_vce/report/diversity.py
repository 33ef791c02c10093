"""σ_L, the diversity of counterfactuals across runs (DiME's and ACE's ``compute_LPIPS.py``).

    lit-vce diversity runs/dime-seed0 runs/dime-seed1 runs/dime-seed2 [--net vgg] [--json out.json]

The same method run several times with different seeds: for every sample that each
run explained (a failed sample, with no counterfactual, is left out, and counted),
the mean LPIPS over the pairs of runs of its counterfactuals; σ_L is the mean over
samples (higher: more diverse explanations). As the official scripts: LPIPS on VGG
(``lpips.LPIPS(net='vgg')``, torchmetrics' heads here), images in [-1, 1], every
counterfactual whether it flipped the classifier or not (their ``CCF`` and ``ICF``
folders). Needs torchvision's VGG-16 weights (``vgg16-397923af.pth``) in
``$LIT_VCE_WEIGHTS_DIR/lpips/checkpoints/`` or the torch hub folder.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import torch

from ..metrics.uncertainty import LEVEL, RESAMPLES, mean_interval


def sigma_l(
    runs: list[str | Path], net: str = "vgg", batch_size: int = 16, lpips_weights: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """σ_L of run folders (see the module docstring); returns ``sigma_l``, its 95 % interval,
    ``n_runs``, ``n_samples`` (explained by every run) and ``n_excluded`` (failed in a run,
    or missing from one), and per-sample values."""
    from ..io import sample_key
    from ..metrics.lpips import build_lpips
    from .html import Run

    if len(runs) < 2:
        raise ValueError("σ_L compares the counterfactuals of at least two runs (the same method, different seeds)")
    folders = [Run(Path(r)) for r in runs]
    ok = [{r["sample_id"] for r in f.rows if not r.get("failure")} for f in folders]
    every = set.union(*({r["sample_id"] for r in f.rows} for f in folders))
    ids = sorted(set.intersection(*ok), key=sample_key)
    if not ids:
        raise ValueError("no sample has a counterfactual in every run")
    lp = build_lpips(lpips_weights, net=net)
    values = []
    for lo in range(0, len(ids), batch_size):
        chunk = ids[lo : lo + batch_size]
        images = []
        for f in folders:
            loaded = [f.load(s, "counterfactual") for s in chunk]
            bad = next((p for _, p in loaded if p), None)
            if bad:
                raise ValueError(f"{f.folder}: {bad}")
            images.append(torch.stack([img for img, _ in loaded]))
        pairs = [lp.per_sample(images[i], images[j]) for i, j in itertools.combinations(range(len(folders)), 2)]
        values.append(torch.stack(pairs).double().mean(0))
    v = torch.cat(values)
    return {
        "sigma_l": float(v.mean()),
        "interval": mean_interval(v, RESAMPLES, seed, LEVEL),
        "n_runs": len(folders),
        "n_samples": len(ids),
        "n_excluded": len(every) - len(ids),
        "net": net,
        "runs": [str(f.folder) for f in folders],
        "per_sample": dict(zip(ids, v.tolist())),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="lit-vce diversity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", help="run folders of one method with different seeds")
    p.add_argument("--net", default="vgg", choices=["vgg", "alex"], help="LPIPS network (vgg: DiME's and ACE's)")
    p.add_argument("--lpips-weights", default=None, help="the backbone's torchvision checkpoint (else looked up)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the result to this file")
    a = p.parse_args(argv)
    from ..errors import LitVCEError

    try:
        out = sigma_l(a.runs, a.net, a.batch_size, a.lpips_weights)
    except (FileNotFoundError, ValueError, LitVCEError) as e:
        p.exit(2, f"lit-vce diversity: {e}\n")
    lo, hi = out["interval"]
    print(
        f"sigma_L ({out['net']}) {out['sigma_l']:.4f} [{lo:.4f}, {hi:.4f}] over {out['n_samples']} samples explained "
        "by "
        f"all {out['n_runs']} runs ({out['n_excluded']} left out: failed or missing in a run)"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
