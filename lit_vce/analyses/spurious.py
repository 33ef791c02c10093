"""Spurious features: which penultimate units drive a class, and what they respond to.

For class y with final linear weights W (C x D) and penultimate activations a(x):

- **rank** units by their contribution to the class logit on images of class y,
  ``W[y, k] * mean_{x in y} a_k(x)``;
- **correlate** each top unit's activation, over a labelled set, with the
  indicator of every known factor taking value y (on the world: shape == y vs
  background == y; a spurious unit tracks the background);
- **ablate**: set the unit to 0 at the input of the final layer and measure the
  mean drop of p(y) on the images of class y the classifier gets right;
- **visualise** (optional): maximise the unit with DiG-IN from random latents
  conditioned on y (``lit-vce neurons`` does the same as a full run).

``lit-vce spurious --classifier biased`` runs it on the world's balanced test set
(``watermarked``: on watermark_balanced images, the watermark a third factor) and
writes ``spurious.json`` with 95 % bootstrap intervals of the mean correlations
(and ``units.png`` with ``--visualise``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..objectives import find_layer


@torch.no_grad()
def penultimate(
    classifier: nn.Module,
    images: torch.Tensor,
    layer: str | None = None,
    batch_size: int = 256,
    ablate: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations at the input of ``layer`` (default: the last linear), logits); with
    ``ablate=k`` unit k is set to 0 there."""
    module = find_layer(classifier, layer)
    acts, logits = [], []

    def hook(_m, inputs):
        x = inputs[0]
        acts.append(x.detach().flatten(2).mean(2) if x.dim() > 2 else x.detach())
        if ablate is not None:
            x = x.clone()
            x[:, ablate] = 0
            return (x,)
        return None

    handle = module.register_forward_pre_hook(hook)
    try:
        for i in range(0, len(images), batch_size):
            logits.append(classifier(images[i : i + batch_size]))
    finally:
        handle.remove()
    return torch.cat(acts), torch.cat(logits)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = a.norm() * b.norm()
    return float((a * b).sum() / den) if den > 0 else float("nan")


def _mean_corr_interval(acts: torch.Tensor, indicators: torch.Tensor, resamples: int, seed: int) -> list[float]:
    """95 % bootstrap interval over images of the mean (over units) Pearson correlation
    between ``acts`` (N, U) and ``indicators`` (N, U); the units stay those ranked on all images."""
    from ..metrics.uncertainty import LEVEL, percentile_interval, resample_indices

    n = acts.shape[0]
    if n < 2 or resamples <= 0:
        return [float("nan"), float("nan")]
    idx = resample_indices(n, resamples, seed)
    means = []
    for chunk in idx.split(100):  # (r, N, U) at a time
        a, b = acts.double()[chunk], indicators.double()[chunk]
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        den = a.norm(dim=1) * b.norm(dim=1)
        r = torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.nan)
        means.append(r.nanmean(1))
    lo, hi = percentile_interval(torch.cat(means), LEVEL)
    return [lo, hi]


@torch.no_grad()
def spurious_units(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    factors: dict[str, torch.Tensor] | None = None,
    top: int = 3,
    layer: str | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per class: the ``top`` units by logit contribution, their correlations with each
    factor's "== class" indicator, and the p(class) drop when each is ablated.

    ``mean_corr_<factor>``: the mean correlation over all classes' top units, with its
    95 % interval under ``intervals`` (a seeded bootstrap over images, ``resamples``
    times, the units held at those ranked on all images)."""
    module = find_layer(classifier, layer)
    if not isinstance(module, nn.Linear):
        raise ValueError("contributions need the weights of a linear layer; name one with layer=...")
    acts, logits = penultimate(classifier, images, layer)
    weight = module.weight.detach()
    probs = logits.softmax(1)
    out: dict[str, Any] = {"classes": {}}
    for y in sorted(set(labels.tolist())):
        of_y = labels == y
        contrib = weight[y] * acts[of_y].mean(0)
        units = contrib.argsort(descending=True)[:top].tolist()
        right = of_y & (logits.argmax(1) == y)
        entries = []
        for k in units:
            e: dict[str, Any] = {
                "unit": k,
                "contribution": float(contrib[k]),
                "share_of_logit": float(contrib[k] / contrib.clamp_min(0).sum().clamp_min(1e-12)),
            }
            for name, values in (factors or {}).items():
                e[f"corr_{name}"] = _corr(acts[:, k], (values == y).float())
            if right.any():
                _, ablated = penultimate(classifier, images[right], layer, ablate=k)
                e["confidence_drop"] = float((probs[right, y] - ablated.softmax(1)[:, y]).mean())
            entries.append(e)
        out["classes"][str(y)] = entries
    if factors:
        out["intervals"] = {}
        chosen = [(int(y), e["unit"]) for y, es in out["classes"].items() for e in es]
        unit_acts = torch.stack([acts[:, k] for _, k in chosen], 1)
        for name, values in factors.items():
            vals = [e[f"corr_{name}"] for es in out["classes"].values() for e in es]
            out[f"mean_corr_{name}"] = sum(vals) / len(vals)
            indicators = torch.stack([(values == y).float() for y, _ in chosen], 1)
            out["intervals"][f"mean_corr_{name}"] = _mean_corr_interval(unit_acts, indicators, resamples, seed)
    return out


def _visualise(classifier, result: dict[str, Any], out: Path, per_unit: int, outer_steps: int, seed: int) -> Path:
    import torchvision

    from ..rngs import sample_rngs
    from ..methods import VCEBatch
    from ..methods.digin import DiGIN, InversionSettings, OptimisationSettings, SearchSettings
    from ..objectives import NeuronActivation

    tiles = []
    for y, entries in result["classes"].items():
        unit = entries[0]["unit"]
        m = DiGIN(
            "world",
            inversion=InversionSettings(method="none"),
            search=SearchSettings(blend_fractions=(0.0,), injection_fractions=()),
            optimisation=OptimisationSettings(outer_steps=outer_steps, num_cutouts=4, lr=0.05),
            objective=NeuronActivation(classifier, unit, class_weight=0.0),
        )
        ids = [f"unit{unit}-class{y}-{i}" for i in range(per_unit)]
        labels = torch.full((per_unit,), int(y))
        batch = VCEBatch(torch.zeros(per_unit, 3, 32, 32), labels, labels, ids, sample_rngs(seed, ids))
        with torch.enable_grad():
            tiles.append(m.generate(batch, classifier).images)
    grid = torchvision.utils.make_grid(torch.cat(tiles), nrow=per_unit, padding=2, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=4, mode="nearest")[0]
    path = out / "units.png"
    torchvision.utils.save_image(grid, path)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``lit-vce spurious``: the analysis on the world's balanced test set."""
    from ..classifiers import load_classifier
    from ..data.world import ShapesWorld

    p = argparse.ArgumentParser(
        prog="lit-vce spurious", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--classifier", default="biased", help="a world classifier (biased, robust, oracle, watermarked) or any spec"
    )
    p.add_argument("--num-samples", type=int, default=1024, help="world test images")
    p.add_argument(
        "--regime",
        default=None,
        choices=["balanced", "watermark_balanced"],
        help="test images: balanced, or watermark_balanced (the watermark pattern independent of the class, "
        "a factor of its own); default: watermark_balanced for watermarked, else balanced",
    )
    p.add_argument("--top", type=int, default=3, help="units per class")
    p.add_argument("--layer", default=None, help="a named linear layer (default: the last)")
    p.add_argument("--visualise", type=int, default=0, help="DiG-IN images of each class's top unit (0: none)")
    p.add_argument("--outer-steps", type=int, default=10)
    p.add_argument("--out", default=None, help="output folder (default runs/spurious/<classifier>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the intervals (0: none)")
    a = p.parse_args(argv)
    clf = load_classifier(a.classifier)
    regime = a.regime or ("watermark_balanced" if a.classifier in ("watermarked", "world:watermarked") else "balanced")
    data = ShapesWorld(regime, "test", a.num_samples)
    items = [data[i] for i in range(len(data))]
    images = torch.stack([it["image"] for it in items])
    shape = torch.tensor([it["label"] for it in items])
    factors = {"shape": shape, "background": torch.tensor([it["background"] for it in items])}
    if regime == "watermark_balanced":
        factors["watermark"] = torch.tensor([it["watermark"] for it in items])
    result = spurious_units(clf, images, shape, factors, a.top, a.layer, a.resamples, a.seed)
    result.update(classifier=a.classifier, n=len(items), regime=regime)
    out = Path(a.out or f"runs/spurious/{clf.name}")
    out.mkdir(parents=True, exist_ok=True)
    if a.visualise:
        result["visualisation"] = str(_visualise(clf, result, out, a.visualise, a.outer_steps, a.seed))
    (out / "spurious.json").write_text(json.dumps(result, indent=2) + "\n")
    ci = result["intervals"]
    print(
        f"{a.classifier} on {regime} test images: top-{a.top} units per class; mean correlation with "
        + ", ".join(
            f"{f} == class {result[f'mean_corr_{f}']:.3f} [{ci[f'mean_corr_{f}'][0]:.3f}, "
            f"{ci[f'mean_corr_{f}'][1]:.3f}]"
            for f in factors
        )
    )
    for y, es in result["classes"].items():
        print(
            f"  class {y}: "
            + "; ".join(
                f"unit {e['unit']} (share {e['share_of_logit']:.2f}, "
                + ", ".join(f"corr {f} {e[f'corr_{f}']:.2f}" for f in factors)
                + f", drop {e.get('confidence_drop', float('nan')):.3f})"
                for e in es
            )
        )
    print(f"written to {out / 'spurious.json'}")
    return result
