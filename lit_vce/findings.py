"""The shortcut findings on the embedded world, with 95 % intervals (``lit-vce findings``).

The world plants two shortcuts whose truth is known: ``biased`` reads the
background (background k goes with class k in its training data) and
``watermarked`` reads a corner patch (pattern k goes with class k), while
``robust`` reads the shape. This job measures whether the package's tools expose
them:

- **VCEs**: each configuration of :data:`VCE_CONFIGS` explains ``biased`` and
  ``robust`` on balanced test images and ``watermarked`` on watermark_balanced
  test images (each image to a random other class). Read by the oracle and the
  pixels: the share of successful VCEs of ``biased`` that keep the shape and only
  move the background to the target's, of ``watermarked`` that keep the shape and
  the background and change the patch, and of ``robust`` that draw the target
  shape (over the VCEs of originals the classifier did not already read as the
  target; :class:`lit_vce.metrics.vce.WorldAudit`);
- **disagreement search** (DiG-IN, ``world/disagree``): the share of generated
  images that show a class's background without its shape, overall and per class;
- **spurious units** (``lit-vce spurious``): the mean correlation of the top
  units of ``biased`` with the background, of ``robust`` with the shape, of
  ``watermarked`` with the watermark.

Every run lands in its own folder under ``--out`` (finished samples are kept, so
an interrupted job resumes); ``findings.json`` and ``findings.md`` (docs/world.md's
table: figure, 95 % bootstrap interval over images, target, met or not) are
rendered from those files (``--render-only`` re-renders them).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

#: VCE configurations tested for the shortcuts: label -> (shipped world config, overrides)
VCE_CONFIGS: dict[str, tuple[str, list[str]]] = {
    # classifier guidance with the class-conditional prior held at the source class:
    # the prior keeps the shape, so what moves is what the classifier reads
    "classifier_guidance_source": ("classifier_guidance", ["--model.method.init_args.conditioning", "source"]),
    "fastdime": ("fastdime", []),
    "classifier_guidance": ("classifier_guidance", []),
    "svce": ("svce", []),
    "dvce": ("dvce", []),
    "ace": ("ace", []),
    "maskdime": ("maskdime", []),
    "rcsb": ("rcsb", []),
}
#: at most this many images per run of the slow configurations (about 8 s per image on 2 cores)
SAMPLE_CAPS = {"ace": 32, "rcsb": 32}
#: the classifiers each configuration explains, with the world regime of their test images
CLASSIFIER_REGIMES = {"biased": "balanced", "robust": "balanced", "watermarked": "watermark_balanced"}
#: the targets each figure is held to: figure -> the least value that meets it
TARGETS = {
    "disagree_background_without_shape": 0.8,
    "disagree_background_without_shape_per_class": 0.6,
    "vce_background_only_biased": 0.8,
    "vce_shape_changed_robust": 0.9,
    "vce_watermark_only_watermarked": 0.8,
    "units_background_biased": 0.8,
    "units_shape_robust": 0.9,
    "units_watermark_watermarked": 0.8,
}


def _vce_runs(out: Path, num_samples: int, batch_size: int, configs: list[str], extra: list[str]) -> None:
    from .lightning.cli import run_predict
    from .config_files import config_root

    for label in configs:
        cfg, overrides = VCE_CONFIGS[label]
        n = min(num_samples, SAMPLE_CAPS.get(label, num_samples))
        for clf, regime in CLASSIFIER_REGIMES.items():
            print(f"\n=== {label} on {clf} ({n} {regime} test images) ===", flush=True)
            run_predict(
                [
                    "--config",
                    str(config_root() / "world" / f"{cfg}.yaml"),
                    "--model.classifier",
                    clf,
                    "--data.regime",
                    regime,
                    "--data.num_samples",
                    str(n),
                    "--data.batch_size",
                    str(batch_size),
                    "--writer.output_dir",
                    str(out / "vce" / f"{label}-{clf}"),
                    *overrides,
                    *extra,
                ]
            )


def _disagree_run(out: Path, per_class: int | None) -> None:
    from .lightning.cli import run_analysis
    from .config_files import config_root

    print("\n=== DiG-IN disagreement search: biased vs robust ===", flush=True)
    args = ["--config", str(config_root() / "world" / "disagree.yaml"), "--writer.output_dir", str(out / "disagree")]
    if per_class:
        args += ["--data.per_class", str(per_class)]
    run_analysis("disagree", args)


def _spurious_runs(out: Path, images: int = 1024, resamples: int = 1000) -> None:
    from .analyses.spurious import main as spurious_main

    for clf in CLASSIFIER_REGIMES:
        spurious_main(
            [
                "--classifier",
                clf,
                "--out",
                str(out / "spurious" / clf),
                "--num-samples",
                str(images),
                "--resamples",
                str(resamples),
            ]
        )


def _figure(value, interval, n, target: float | None, source: str, label: str) -> dict[str, Any]:
    value = float(value) if value is not None else math.nan
    ci = [float(x) for x in interval] if interval else [math.nan, math.nan]
    return {
        "label": label,
        "value": value,
        "interval": ci,
        "n": n,
        "target": target,
        "met": None if target is None or not math.isfinite(value) else bool(value >= target),
        "source": source,
    }


def collect(out: str | Path) -> dict[str, Any]:
    """The findings from the run folders under ``out`` (whatever of them exists)."""
    from .data.world import SHAPES

    out = Path(out)
    figures: dict[str, Any] = {}
    dis = out / "disagree" / "results.json"
    if dis.is_file():
        r = json.loads(dis.read_text())
        m, ci = r["metrics"], r.get("intervals", {})
        figures["disagree_background_without_shape"] = _figure(
            m.get("background_without_shape"),
            ci.get("background_without_shape"),
            r["n"],
            TARGETS["disagree_background_without_shape"],
            str(dis),
            "disagreement search (DiG-IN, biased vs robust): images with the class's background without its shape",
        )
        for key in sorted(k for k in m if k.startswith("background_without_shape_class")):
            y = int(key.rsplit("class", 1)[1])
            figures[f"disagree_{key}"] = _figure(
                m[key],
                ci.get(key),
                None,
                TARGETS["disagree_background_without_shape_per_class"],
                str(dis),
                f"  of class {y} ({SHAPES[y]})",
            )
    for label in VCE_CONFIGS:
        for clf, key, what in (
            ("biased", "background_only", "VCEs of biased that keep the shape and only move the background"),
            ("robust", "shape_changed", "VCEs of robust that draw the target shape"),
            ("watermarked", "watermark_only", "VCEs of watermarked that keep the shape and only move the watermark"),
        ):
            p = out / "vce" / f"{label}-{clf}" / "results.json"
            if not p.is_file():
                continue
            r = json.loads(p.read_text())
            audit = r.get("audit") or {}
            fig = _figure(
                audit.get(key),
                r.get("intervals", {}).get(key),
                audit.get("n_success"),
                TARGETS[f"vce_{key}_{clf}"],
                str(p),
                f"{what} ({label}; flip rate {r['metrics']['flip_rate']:.3f} of {r['n']})",
            )
            fig.update(
                configuration=label,
                classifier=clf,
                flip_rate=r["metrics"]["flip_rate"],
                flip_rate_interval=r.get("intervals", {}).get("flip_rate"),
                images=r["n"],
            )
            figures[f"vce_{key}_{clf}_{label}"] = fig
    for clf, factor in (("biased", "background"), ("robust", "shape"), ("watermarked", "watermark")):
        p = out / "spurious" / clf / "spurious.json"
        if p.is_file():
            r = json.loads(p.read_text())
            figures[f"units_{factor}_{clf}"] = _figure(
                r[f"mean_corr_{factor}"],
                r.get("intervals", {}).get(f"mean_corr_{factor}"),
                r["n"],
                TARGETS[f"units_{factor}_{clf}"],
                str(p),
                f"spurious units: mean correlation of {clf}'s top units with the {factor}",
            )
    return {"figures": figures, "targets": TARGETS}


def markdown(findings: dict[str, Any]) -> str:
    """The findings table: figure, 95 % interval, images (successful VCEs), target, met."""
    lines = ["| finding | figure [95 % CI] | N | target | met |", "|---|---|---|---|---|"]
    for f in findings["figures"].values():
        v, (lo, hi) = f["value"], f["interval"]
        fig = "-" if not math.isfinite(v) else f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else "")
        met = {True: "yes", False: "**no**", None: "-"}[f["met"]]
        lines.append(
            f"| {f['label']} | {fig} | {f['n'] if f['n'] is not None else ''} | "
            f"{'>= ' + format(f['target'], 'g') if f['target'] is not None else ''} | {met} |"
        )
    return "\n".join(lines) + "\n"


def vce_markdown(findings: dict[str, Any]) -> str:
    """One row per VCE configuration: flip rate and the shortcut (or shape) figure, each with
    its interval, for biased, robust and watermarked."""
    cols = (("biased", "background only"), ("robust", "shape changed"), ("watermarked", "watermark only"))
    rows: dict[str, dict[str, dict]] = {}
    for f in findings["figures"].values():
        if "configuration" in f:
            rows.setdefault(f["configuration"], {})[f["classifier"]] = f

    def cell(f, key, ci_key):
        v, ci = f.get(key), f.get(ci_key) or [math.nan, math.nan]
        if v is None or not math.isfinite(v):
            return "-"
        return f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if all(math.isfinite(c) for c in ci) else "")

    head = ["configuration", "N"] + [f"{h} `{c}`" for c, what in cols for h in ("FR", what)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, by in rows.items():
        n = max(f["images"] for f in by.values())
        cells = [label, str(n)]
        for c, _ in cols:
            f = by.get(c, {})
            cells += [cell(f, "flip_rate", "flip_rate_interval"), cell(f, "value", "interval")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render(out: str | Path) -> str:
    """Write ``findings.json`` and ``findings.md`` from the run folders under ``out``; returns the table."""
    from .io import atomic_write_bytes

    out = Path(out)
    findings = collect(out)
    if not findings["figures"]:
        raise FileNotFoundError(f"no finding's results under {out} (run `lit-vce findings --out {out}` first)")
    atomic_write_bytes(out / "findings.json", (json.dumps(findings, indent=2) + "\n").encode())
    table = markdown(findings)
    if any("configuration" in f for f in findings["figures"].values()):
        table += (
            "\nVCE configurations (shortcut figures over the successful VCEs of originals the classifier did not "
            "already read as the target):\n\n" + vce_markdown(findings)
        )
    atomic_write_bytes(out / "findings.md", table.encode())
    return table


def run_findings(
    out: str | Path = "runs/findings",
    num_samples: int = 64,
    batch_size: int = 32,
    configs: list[str] | None = None,
    disagree: bool = True,
    per_class: int | None = None,
    extra: list[str] | None = None,
    spurious_images: int = 1024,
    spurious_resamples: int = 1000,
) -> str:
    """Run every finding's job (what is finished is kept) and render the table;
    ``spurious_images`` world test images and ``spurious_resamples`` bootstrap resamples
    for the spurious-units finding."""
    out = Path(out)
    configs = list(VCE_CONFIGS) if configs is None else configs
    unknown = [c for c in configs if c not in VCE_CONFIGS]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; choose from {list(VCE_CONFIGS)}")
    t0 = time.perf_counter()
    _spurious_runs(out, spurious_images, spurious_resamples)
    _vce_runs(out, num_samples, batch_size, configs, extra or [])
    if disagree:
        _disagree_run(out, per_class)
    table = render(out)
    print("\n" + table)
    print(f"findings wall time: {time.perf_counter() - t0:.0f} s; {out / 'findings.md'}, {out / 'findings.json'}")
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="lit-vce findings", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/findings")
    p.add_argument(
        "--num-samples",
        type=int,
        default=64,
        help="test images per VCE run (the slow configurations at most SAMPLE_CAPS)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--configs", nargs="+", default=list(VCE_CONFIGS), help="VCE configurations to test")
    p.add_argument("--no-disagree", action="store_true", help="skip the disagreement search")
    p.add_argument("--per-class", type=int, default=None, help="disagreement images per class (default: the config's)")
    p.add_argument("--render-only", action="store_true", help="re-render findings.{md,json} from the run folders")
    p.add_argument("--spurious-images", type=int, default=1024, help="world test images of the spurious-units finding")
    p.add_argument(
        "--spurious-resamples", type=int, default=1000, help="bootstrap resamples of its intervals (0: none)"
    )
    a = p.parse_args(argv)
    if a.render_only:
        print(render(a.out))
        return
    run_findings(
        a.out,
        a.num_samples,
        a.batch_size,
        a.configs,
        not a.no_disagree,
        a.per_class,
        spurious_images=a.spurious_images,
        spurious_resamples=a.spurious_resamples,
    )
