"""The Python API: counterfactuals and their metrics without LightningCLI.

    from lit_vce import explain

    out = explain(images, targets=["square"] * len(images), classifier="robust", method="dvce")
    out.counterfactuals        # (N, 3, H, W) in [0, 1], as a PNG would store them
    out.metrics["flip_rate"]   # and l1, l2, target confidence, ... (FID with enough images)
    out.rows[0]                # per sample: success, confidences, distances, diagnostics

Each sample's randomness depends only on ``seed`` and its sample id (default: its
index), so a sample gives the same counterfactual in any batch and the same as
``lit-vce predict`` gives for that id (with ``deterministic=True``: the same bytes).
Runs on one device; for datasets, resuming and several processes use ``lit-vce predict``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .explanation import Explanation

__all__ = ["explain", "Explanation"]


def explain(
    images,
    targets,
    classifier="robust",
    method="classifier_guidance",
    *,
    sources=None,
    sample_ids: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    deterministic: bool = False,
    metrics: bool = True,
    fid_features: str | None = None,
    image_size: int | None = None,
    masks: torch.Tensor | None = None,
    captions: Sequence[str] | None = None,
    regions: torch.Tensor | str | None = None,
    **method_kwargs,
) -> Explanation:
    """Counterfactuals of ``images`` towards ``targets`` for ``classifier`` with ``method``.

    Args:
        images: a tensor (N, 3, H, W) or (3, H, W) in [0, 1] (used as it is), or a list of
            image files, PIL images or (3, H, W) tensors of any sizes (each with its shorter
            side resized to ``image_size``, default the classifier's input size, and
            centre-cropped, as ``lit-vce predict`` reads files).
        targets: one class per image (ids or class names), or one for all.
        classifier: a spec (``"robust"``, ``"timm:resnet50"``, ...; see
            :func:`lit_vce.classifiers.load_classifier`) or an :class:`ImageClassifier`.
        method: a registered name (``lit-vce methods``; its arguments as keywords,
            e.g. ``num_steps=50``), a predict config whose method to use (``"world/dvce"``,
            a YAML file; keywords override its arguments) or a :class:`VCEMethod` object.
        sources: the classes explained from (default: the classifier's predictions).
        sample_ids: one id per image, which seeds its randomness (default ``"0"``, ``"1"``, ...).
        seed: the global seed.
        batch_size: images per ``generate`` call.
        device: default CUDA when available, else CPU.
        deterministic: each sample on its own with one intra-op CPU thread: the same bytes
            in any batch (on CPU, methods that allow it run as many samples at once
            as there were threads; same bytes).
        metrics: compute the metric suite (flip rate, closeness, confidences; FID/sFID
            with ``fid_features``, default the world's features for world classifiers).
        masks: foreground masks (N, 1, H, W) in [0, 1] at the images' resolution (as the
            images are explained: after any resize), for methods that use them (DiG-IN's
            blending and background terms).
        captions: one caption per image, for text-conditioned methods (DiG-IN on Stable
            Diffusion replaces the source class name in it by the target's).
        regions: where the counterfactuals may change the images (:mod:`lit_vce.regions`):
            masks (N, 1, H, W) with 1 where the edit may go, ``"objects"`` (``masks`` as the
            regions) or ``"cells[:<cell px>:<area>]"`` (RCSB's attribution cells). The rows
            record each region's area and the share of the change outside it.

    Each batch goes through :func:`lit_vce.batches.explain_batch`, the path ``lit-vce
    predict`` takes: a sample gets the bytes predict gives it (``deterministic=True``)."""
    from .io import quantize

    t0 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clf, vce, x, ids, src, tgt = _checked_inputs(
        images, targets, classifier, method, method_kwargs, sources, sample_ids, batch_size, image_size, device
    )
    suite, metric_settings = _suite(clf, metrics, fid_features, seed, device)
    vce.to(device)
    vce.setup(device)
    masks, captions = _masks_captions(masks, captions, x)
    region_setting = regions if isinstance(regions, str) or regions is None else "masks"
    regions = _regions(regions, x)
    cfs, rows = _generate(vce, clf, suite, x, src, tgt, ids, seed, batch_size, deterministic, masks, captions, regions)
    scores, audit, intervals = _summary(suite, rows)
    success = torch.tensor([r["success"] for r in rows], dtype=torch.bool)
    return Explanation(
        quantize(x).cpu(),
        cfs.cpu(),
        src.cpu(),
        tgt.cpu(),
        success,
        rows,
        scores,
        audit,
        intervals=intervals,
        method=vce.describe(),
        seconds=time.perf_counter() - t0,
        classifier=classifier if isinstance(classifier, str) else clf.name,
        seed=seed,
        config={
            "metric_settings": metric_settings,
            "deterministic": deterministic,
            "batch_size": batch_size,
            "image_size": int(x.shape[-1]),
            "regions": region_setting,
        },
    )


def _checked_inputs(
    images, targets, classifier, method, method_kwargs, sources, sample_ids, batch_size, image_size, device
):
    """explain()'s inputs loaded and checked, each wrong one a clear error before any work:
    (classifier, method, images on ``device``, sample ids, source classes, target classes)."""
    from .classifiers import ImageClassifier, load_classifier
    from .io import quantize
    from .methods.base import VCEMethod, check_domain
    from .metrics.accounting import check_distinct_targets

    if isinstance(classifier, torch.nn.Module) and not isinstance(classifier, ImageClassifier):
        raise TypeError(
            "classifier: wrap a plain module as ImageClassifier(model, input_size, class_names, mean=..., std=...) "
            "or give a spec such as 'timm:resnet50'"
        )
    clf = load_classifier(classifier).to(device).eval()
    vce = _method(method, method_kwargs)
    if not isinstance(vce, VCEMethod):
        raise TypeError(f"method must be a registered name or a VCEMethod, got {type(vce).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    x = _images(images, image_size or clf.input_size).to(device)
    check_domain(vce, clf, tuple(x.shape[-2:]))  # a default model of another domain is refused, not run
    n = len(x)
    ids = [str(i) for i in range(n)] if sample_ids is None else [str(s) for s in sample_ids]
    if len(ids) != n or len(set(ids)) != n:
        raise ValueError(f"sample_ids: need {n} distinct ids, got {len(ids)} ({len(set(ids))} distinct)")
    tgt = _classes(targets, n, clf, "targets").to(device)
    with torch.no_grad():
        src = clf(quantize(x)).argmax(1) if sources is None else _classes(sources, n, clf, "sources").to(device)
    check_distinct_targets(src.tolist(), tgt.tolist(), [f"images[{i}]" for i in range(n)], what="images")
    return clf, vce, x, ids, src, tgt


def _summary(suite, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, list[float]]]:
    """(metrics, audit, intervals) of the suite, its counts checked against the rows
    (:mod:`lit_vce.metrics.accounting`); empty without a suite."""
    if suite is None:
        return {}, None, {}
    from .metrics.accounting import check_counts, count_rows

    scores, audit, n_metrics = suite.compute()
    intervals = {k: v for k, v in suite.last_intervals.items() if k in scores or k in (audit or {})}
    c = count_rows(rows)
    if n_metrics != c["n"]:
        raise RuntimeError(f"the metrics cover {n_metrics} samples, the rows {c['n']}")
    check_counts(c["n"], c["n_success"], c["n_failed"], scores.get("flip_rate"), where="explain()")
    return scores, audit, intervals


def _generate(
    vce,
    clf,
    suite,
    x,
    src,
    tgt,
    ids,
    seed: int,
    batch_size: int,
    deterministic: bool,
    masks=None,
    captions=None,
    regions=None,
):
    """The counterfactuals (quantised) and one row per sample, batch by batch, through the
    path ``lit-vce predict`` takes (:func:`lit_vce.batches.explain_batch`)."""
    from .batches import deterministic_kernels, explain_batch
    from .io import quantize
    from .methods.base import VCEBatch
    from .progress import progress
    from .rngs import sample_rngs

    cfs, rows = [], []
    with deterministic_kernels(deterministic) as threads:
        for lo in progress(range(0, len(x), batch_size), desc=vce.name, total=(len(x) + batch_size - 1) // batch_size):
            sl = slice(lo, lo + batch_size)
            batch = VCEBatch(
                x[sl],
                src[sl],
                tgt[sl],
                ids[sl],
                sample_rngs(seed, ids[sl], device=x.device),
                None if masks is None else masks[sl],
                None if captions is None else list(captions[sl]),
            )
            if isinstance(regions, torch.Tensor):
                batch.region = regions[sl]
            elif regions is not None:
                from .regions import resolve_regions

                batch.region = resolve_regions(regions, batch.images, batch.source, batch.rngs, clf, objects=batch.mask)
            result, batch_rows = explain_batch(vce, clf, batch, suite, deterministic, threads)
            rows += batch_rows
            cfs.append(torch.nan_to_num(quantize(result.images.detach()), nan=0.0))  # no NaN in a returned image
    return torch.cat(cfs), rows


def _regions(regions, x: torch.Tensor):
    """``regions`` as binary masks on ``x``'s device, a parsed rule, or None (see :func:`explain`)."""
    if isinstance(regions, torch.Tensor):
        return (_masks_captions(regions, None, x)[0] > 0.5).float()
    if regions is None:
        return None
    from .regions import parse_regions

    spec = parse_regions(regions)
    if spec.kind == "folder":
        raise ValueError("regions: give the masks as a tensor (a folder of masks is read by lit-vce predict)")
    return spec


def _masks_captions(masks, captions, x: torch.Tensor):
    """``masks`` as a float tensor on ``x``'s device and ``captions`` as a list, checked against the images."""
    n = len(x)
    if masks is not None:
        if not isinstance(masks, torch.Tensor) or masks.dim() != 4 or masks.shape[1] != 1:
            raise ValueError("masks: expected a tensor (N, 1, H, W) in [0, 1]")
        if masks.shape[0] != n or tuple(masks.shape[-2:]) != tuple(x.shape[-2:]):
            raise ValueError(
                f"masks: shape {tuple(masks.shape)} does not match the {n} images of {x.shape[-2]}x{x.shape[-1]} px"
            )
        masks = masks.float().to(x.device)
        if not bool(torch.isfinite(masks).all()) or float(masks.min()) < 0 or float(masks.max()) > 1:
            raise ValueError("masks: values must be finite and in [0, 1]")
    if captions is not None:
        if isinstance(captions, str):
            raise TypeError("captions: one caption per image (a list of strings), not one string")
        captions = [str(c) for c in captions]
        if len(captions) != n:
            raise ValueError(f"captions: one caption per image ({n}), got {len(captions)}")
    return masks, captions


def load_method(method: str, **kwargs):
    """The :class:`~lit_vce.methods.VCEMethod` that :func:`explain` would run for ``method``:
    a registered name (``"dvce"``, keywords are its arguments) or a predict config whose
    method to use (``"world/dvce"``, a YAML file; keywords override its ``init_args``)."""
    return _method(method, kwargs)


def _method(method, kwargs: dict):
    if isinstance(method, str) and ("/" in method or method.endswith(".yaml")):
        return _method_from_config(method, kwargs)
    if isinstance(method, str):
        from .registry import METHODS

        return METHODS.get(method)(**kwargs)
    if kwargs:
        raise TypeError(
            f"method arguments {sorted(kwargs)} go to the method's constructor; pass them there "
            "(or give the method by name)"
        )
    return method


def _method_from_config(name: str, kwargs: dict):
    """The method of a predict config (``world/dvce``, a YAML file): its ``model.method``
    with ``init_args`` updated by ``kwargs``."""
    import importlib

    import yaml

    from .config_files import find_config
    from .errors import ConfigError
    from .registry import METHODS

    path = find_config(name)
    spec = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("method")
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ConfigError(f"method={name!r}: {path} has no model.method")
    cls_name = spec["class_path"]
    if cls_name in METHODS:
        cls = METHODS.get(cls_name)
    else:
        module, _, attr = cls_name.rpartition(".")
        cls = getattr(importlib.import_module(module or "lit_vce.methods"), attr)
    return cls(**{**(spec.get("init_args") or {}), **kwargs})


def _images(images, size: int) -> torch.Tensor:
    from .data.imagenet import _load_image, resize_crop

    if isinstance(images, torch.Tensor):
        x = images[None] if images.dim() == 3 else images
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images: expected (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"images: nothing to explain (shape {tuple(images.shape)})")
        if x.dtype == torch.uint8:
            x = x.float() / 255
        if not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > 1:
            raise ValueError("images: values must be finite and in [0, 1]")
        return x.float()
    if isinstance(images, (str, Path)):
        images = [images]
    out = []
    for i, im in enumerate(images):
        if isinstance(
            im, torch.Tensor
        ):  # a list of tensors: each resized as a file would be (shorter side, centre crop)
            t = im.float() / 255 if im.dtype == torch.uint8 else im.float()
            if t.dim() != 3 or t.shape[0] != 3 or t.shape[1] == 0 or t.shape[2] == 0:
                raise ValueError(f"images[{i}]: expected (3, H, W) in [0, 1], got shape {tuple(im.shape)}")
            if not bool(torch.isfinite(t).all()) or float(t.min()) < 0 or float(t.max()) > 1:
                raise ValueError(f"images[{i}]: values must be finite and in [0, 1]")
            out.append(resize_crop(t, size))
        elif isinstance(im, (str, Path)):
            try:
                out.append(_load_image(Path(im), size))
            except (OSError, ValueError) as e:
                raise ValueError(f"images[{i}]: cannot read {im} ({e})") from e
        elif hasattr(im, "convert"):  # a PIL image: as a file of it would be read
            from torchvision.transforms.functional import pil_to_tensor

            out.append(resize_crop(pil_to_tensor(im.convert("RGB")).float() / 255.0, size))
        else:
            raise TypeError(
                f"images[{i}]: expected a file path, a PIL image or a (3, H, W) tensor, got {type(im).__name__}"
            )
    if not out:
        raise ValueError("images: nothing to explain")
    return torch.stack(out)


def _classes(values, n: int, clf, what: str) -> torch.Tensor:
    names = list(clf.class_names)
    if isinstance(values, (int, str)) or (isinstance(values, torch.Tensor) and values.dim() == 0):
        values = [values] * n
    values = list(values.tolist() if isinstance(values, torch.Tensor) else values)
    if len(values) != n:
        raise ValueError(f"{what}: one class per image ({n}), got {len(values)}")
    ids = []
    for v in values:
        if isinstance(v, str):
            if v not in names:
                from .errors import UnknownNameError, suggest

                raise UnknownNameError(f"{what}: {clf.name} has no class {v!r}{suggest(v, names)}")
            v = names.index(v)
        if not 0 <= int(v) < len(names):
            raise ValueError(f"{what}: class id {v} is unknown to {clf.name} (classes 0..{len(names) - 1})")
        ids.append(int(v))
    return torch.tensor(ids, dtype=torch.long)


def _suite(clf, metrics: bool, fid_features: str | None, seed: int, device):
    """(the metric suite or None, its settings as a run's ``config.metric_settings``)."""
    if not metrics:
        return None, {}
    from .metrics.build import build_suite

    from .world.models import WORLD_CLASSIFIERS

    world = getattr(clf, "name", "") in WORLD_CLASSIFIERS
    feats = fid_features or ("world" if world else "none")
    settings = {"fid_features": feats, "world_audit": world, "second_classifier": None}
    return build_suite(clf, fid_features=feats, world_audit=world, seed=seed).to(device), settings
