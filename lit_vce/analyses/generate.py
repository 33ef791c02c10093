"""Generation analyses as a prediction stage: ``lit-vce disagree`` and ``lit-vce neurons``.

Both optimise a DiG-IN trajectory (:class:`lit_vce.methods.DiGIN`) against an
objective other than a VCE's:

- ``disagree``: images of class y on which the explained classifier is confident
  and ``second_classifier`` is not (:class:`lit_vce.objectives.Disagreement`;
  score variants ``confidence``, ``log_confidence``, ``logit_margin``), started
  from random initial latents with the class as conditioning (scaled by the
  method's ``guidance_scale``; the world's config uses 0, the unconditional
  prediction, since a prior pulled towards the class's shape works against
  finding images without it);
- ``neurons``: maximise (or minimise) one unit of a layer
  (:class:`lit_vce.objectives.NeuronActivation`; default: a penultimate unit),
  optionally with a class term; from random latents, or on real images with the
  object frozen (``freeze_object``: the foreground of the original trajectory is
  blended back at every step, so only the rest of the image changes).

Images, per-sample rows (``samples.csv``) and ``results.json`` land in the
writer's folder, as for VCE runs; on the embedded world the oracle audits what
the generated images show.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..classifiers import load_classifier
from ..data.datamodule import collate
from ..lightning.stage import StageModule
from ..rngs import sample_rngs
from ..methods.base import VCEBatch
from ..methods.digin import DiGIN, InversionSettings, OptimisationSettings, SearchSettings
from ..objectives import SCORE_VARIANTS, Disagreement, NeuronActivation

ANALYSIS_FIELDS = [
    "sample_id",
    "class",
    "pred",
    "conf",
    "class_conf",
    "pred_second",
    "class_conf_second",
    "disagrees",
    "unit",
    "activation",
    "activation_before",
    "oracle_shape",
    "oracle_background",
    "loss",
    "failure",
    "seconds",
]


class _Requests(Dataset):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class GenerationDataModule(L.LightningDataModule):
    """What to generate: ``per_class`` images for each class in ``classes`` from random
    latents (``source="random"``), or the first ``num_samples`` world test images
    (``source="world"``, for neurons on real images; masks included).

    Args:
        classes: class ids (default: all of the world's 4).
        per_class: images per class.
        image_size: the size of the (blank) originals of random starts.
        source: ``"random"`` or ``"world"``.
        num_samples: world images (``source="world"``).
        batch_size, num_workers: loader settings.
    """

    def __init__(
        self,
        classes: list[int] | None = None,
        per_class: int = 8,
        image_size: int = 32,
        source: str = "random",
        num_samples: int = 16,
        batch_size: int = 16,
        num_workers: int = 0,
    ):
        super().__init__()
        if source not in ("random", "world"):
            raise ValueError("source must be 'random' or 'world'")
        self.save_hyperparameters()
        self._data: _Requests | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._data is not None:
            return
        h = self.hparams
        items = []
        if h.source == "random":
            for y in h.classes if h.classes is not None else range(4):
                for k in range(h.per_class):
                    items.append(
                        {
                            "image": torch.zeros(3, h.image_size, h.image_size),
                            "label": int(y),
                            "sample_id": f"class{int(y)}-{k:04d}",
                        }
                    )
        else:
            from ..data.world import ShapesWorld

            world = ShapesWorld("balanced", "test", h.num_samples)
            for i in range(len(world)):
                it = world[i]
                if h.classes is None or it["label"] in h.classes:
                    items.append(
                        {
                            "image": it["image"],
                            "label": int(it["label"]),
                            "sample_id": it["sample_id"],
                            "mask": it["mask"],
                        }
                    )
        if not items:
            raise ValueError("nothing to generate (check classes / num_samples)")
        self._data = _Requests(items)

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self._data,
            batch_size=self.hparams.batch_size,
            shuffle=False,
            num_workers=self.hparams.num_workers,
            collate_fn=collate,
        )


class AnalysisModule(StageModule):
    """A DiG-IN generation analysis as ``predict_step``.

    Args:
        analysis: ``"disagree"`` or ``"neurons"``.
        classifier: the explained classifier (classifier 1).
        method: the DiG-IN sampler settings (its objective is replaced by the analysis').
        second_classifier: classifier 2 (``disagree``).
        variant: the disagreement score (``confidence``, ``log_confidence``, ``logit_margin``).
        unit, layer, sign, act_weight, class_weight: the neuron objective (``neurons``).
        freeze_object: on real images, keep the object (mask) of the original fixed.
        world_audit: read generated images with the world's oracle.
        seed: each sample's randomness depends only on (seed, sample id).
        run_name: label stored in the results.
        fetch_per_node: see :class:`~lit_vce.lightning.module.VCEModule`.
    """

    def __init__(
        self,
        analysis: str = "disagree",
        classifier: str = "biased",
        method: DiGIN | None = None,
        second_classifier: str | None = "robust",
        variant: str = "confidence",
        unit: int = 0,
        layer: str | None = None,
        sign: float = 1.0,
        act_weight: float = 1.0,
        class_weight: float = 0.0,
        freeze_object: bool = True,
        world_audit: bool = True,
        seed: int = 0,
        run_name: str | None = None,
        fetch_per_node: bool = True,
    ):
        super().__init__(fetch_per_node)
        if analysis not in ("disagree", "neurons"):
            raise ValueError("analysis must be 'disagree' or 'neurons'")
        if variant not in SCORE_VARIANTS:
            raise ValueError(f"variant must be one of {SCORE_VARIANTS}")
        if analysis == "disagree" and not second_classifier:
            raise ValueError("disagree needs second_classifier")
        from ..classifiers.loaders import check_classifier_spec

        for spec in (classifier, second_classifier if analysis == "disagree" else None):
            if spec is not None:
                check_classifier_spec(spec)
        self.analysis = analysis
        self._specs = (classifier, second_classifier if analysis == "disagree" else None)
        self.classifier_spec = classifier if isinstance(classifier, str) else classifier.name
        self.method = method
        self.method_factory = None  # the CLI's deferred method (see VCEModule.method_factory)
        self._objective_args = (layer, sign, act_weight, class_weight)
        self.variant, self.unit, self.freeze_object = variant, int(unit), freeze_object
        self.world_audit = bool(world_audit)
        self.seed = int(seed)
        self._run_name = run_name
        self._rows: list[dict[str, Any]] = []
        self._t0 = 0.0
        self.final_results: dict[str, Any] | None = None
        self._build_unless_deferred()

    def build(self) -> None:
        """The classifiers, the DiG-IN sampler with the analysis' objective, the world's oracle."""
        self.classifier = load_classifier(self._specs[0])
        self.second = load_classifier(self._specs[1]) if self._specs[1] else None
        if self.method_factory is not None:
            self.method = self.method_factory()
        if self.method is None:
            self.method = DiGIN(
                inversion=InversionSettings(method="none"),
                optimisation=OptimisationSettings(outer_steps=10),
                search=SearchSettings(blend_fractions=(0.0,), injection_fractions=()),
            )
        if self.analysis == "disagree":
            self.method.objective = Disagreement(self.second, self.variant)
        else:
            self.method.objective = NeuronActivation(self.classifier, self.unit, *self._objective_args)
        self.run_name = self._run_name or f"{self.analysis}-{self.classifier.name}" + (
            f"-vs-{self.second.name}" if self.second is not None else ""
        )
        if self.world_audit:
            from ..world.models import load_world_network

            self.oracle = load_world_network("oracle").eval().requires_grad_(False)
        else:
            self.oracle = None

    stage = "analysis"

    def fingerprint(self) -> dict[str, Any]:
        """What decides a sample's output (see :meth:`VCEModule.fingerprint`)."""
        dm = getattr(self.trainer, "datamodule", None)
        data = dict(dm.hparams) if dm is not None and hasattr(dm, "hparams") else {}
        for k in ("batch_size", "num_workers", "num_samples"):
            data.pop(k, None)
        return {
            "seed": self.seed,
            "analysis": self.analysis,
            "classifiers": [str(s) for s in self._specs],
            "method": self.method.describe(),
            "objective": self.method.objective.describe(),
            "data": data,
        }

    def on_predict_start(self) -> None:
        self.require_autograd("the analyses")
        self._rows, self._t0 = [], time.perf_counter()
        self.method.setup(self.device)
        real = self.trainer.datamodule.hparams.source != "random"
        m = self.method
        m.inversion.method = "null_text" if real else "none"
        m.search.injection_fractions = ()
        m.search.blend_fractions = (1.0,) if (real and self.freeze_object) else (0.0,)
        m.masks.paste_outside = real and self.freeze_object  # the object exactly as it was, not only blended

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        t0 = time.perf_counter()
        ids, y = list(batch["sample_id"]), batch["label"]
        writer = self.writer()
        done = writer.done_ids() if writer is not None else set()
        todo = [i for i, s in enumerate(ids) if s not in done]
        if not todo:
            return {"new_rows": [], "counterfactuals": None, "originals": None}
        idx = torch.tensor(todo, device=y.device)
        images, labels = batch["image"][idx], y[idx]
        sub = [ids[i] for i in todo]
        mask = None
        if "mask" in batch and self.freeze_object:
            mask = 1 - batch["mask"][idx]  # blending keeps what is outside the mask: here, the object
        vb = VCEBatch(images, labels, labels, sub, sample_rngs(self.seed, sub, device=images.device), mask)
        with torch.enable_grad():
            result = self.method.generate(vb, self.classifier)
        from ..io import quantize

        out = quantize(result.images.detach())
        rows = self._rows_for(out, images, labels, sub, result, (time.perf_counter() - t0) / len(sub))
        self._rows.extend(rows)
        return {"new_rows": rows, "counterfactuals": out, "originals": quantize(images)}

    @torch.no_grad()
    def _rows_for(self, out, originals, labels, ids, result, seconds) -> list[dict[str, Any]]:
        p1 = self.classifier(out).softmax(1)
        rows = []
        p2 = self.second(out).softmax(1) if self.second is not None else None
        act = act0 = None
        if self.analysis == "neurons":
            from ..objectives import ObjectiveContext

            obj = self.method.objective
            ctx = ObjectiveContext(originals, labels, labels, self.classifier)
            act = obj.activation(out, ctx)[0][:, 0]
            act0 = obj.activation(originals, ctx)[0][:, 0]
        shape = bg = None
        if self.oracle is not None:
            s_logits, b_logits = self.oracle.both(out)
            shape, bg = s_logits.argmax(1), b_logits.argmax(1)
        for i, sid in enumerate(ids):
            y = int(labels[i])
            row = {
                "sample_id": sid,
                "class": y,
                "pred": int(p1[i].argmax()),
                "conf": round(float(p1[i].max()), 6),
                "class_conf": round(float(p1[i, y]), 6),
                "failure": result.failure[i] or "",
                "seconds": round(seconds, 4),
                "loss": round(float(result.diagnostics["loss"][i]), 6),
            }
            if p2 is not None:
                row.update(
                    pred_second=int(p2[i].argmax()),
                    class_conf_second=round(float(p2[i, y]), 6),
                    disagrees=bool(int(p1[i].argmax()) == y and int(p2[i].argmax()) != y),
                )
            if act is not None:
                row.update(
                    unit=self.unit, activation=round(float(act[i]), 6), activation_before=round(float(act0[i]), 6)
                )
            if shape is not None:
                row.update(oracle_shape=int(shape[i]), oracle_background=int(bg[i]))
            rows.append(row)
        return rows

    def on_predict_epoch_end(self) -> None:
        from ..lightning.collectives import gather_rows, gather_run_rows

        writer = self.writer()
        self.trainer.strategy.barrier()  # every rank's rows are on disk before they are read
        # with a writer, the run folders hold the whole run (resumed samples included); else gather the ranks' rows
        rows = gather_run_rows(writer, self.trainer) if writer is not None else gather_rows(self._rows)
        if rows is None:  # not global rank 0: the summary is rank 0's
            self.final_results = None
            return
        metrics = summarise(self.analysis, rows)
        intervals = summary_intervals(self.analysis, rows, self.seed)
        wall = time.perf_counter() - self._t0
        self.final_results = {"metrics": metrics, "n": len(rows), "wall_time_s": wall}
        if writer is not None and self.trainer.is_global_zero:
            results = self.results(
                rows,
                metrics,
                len(rows),
                f"digin-{self.analysis}",
                wall_time_s=wall,
                n_success=sum(
                    1 for r in rows if not r["failure"] and (r.get("disagrees") or self.analysis == "neurons")
                ),
                config={
                    "analysis": self.analysis,
                    "objective": self.method.objective.describe(),
                    "method": self.method.describe(),
                    "second_classifier": getattr(self.second, "name", None),
                    "variant": self.variant,
                    "unit": self.unit,
                    "data": dict(self.trainer.datamodule.hparams),
                },
                intervals=intervals,
            )
            self.finalize(writer.output_dir, rows, results)
            print(
                f"{self.run_name}: {len(rows)} images; "
                + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
            )


def summarise(analysis: str, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Aggregates of the per-sample rows (every rank computes the same from the gathered rows);
    the rates are the means of :func:`_indicators` (a per-class rate over that class's images)."""
    ok = [r for r in rows if not r.get("failure")]

    def mean(key):
        vals = [float(r[key]) for r in ok if r.get(key) not in (None, "")]
        return sum(vals) / len(vals) if vals else float("nan")

    m: dict[str, float] = {"class_confidence": mean("class_conf")}
    if analysis == "disagree":
        m["class_confidence_second"] = mean("class_conf_second")
    else:
        m["activation"] = mean("activation")
        if any(r.get("activation_before") not in (None, "") for r in ok):
            m["activation_before"] = mean("activation_before")
    for key, vals in _indicators(analysis, rows).items():
        kept = [v for v in vals if v == v]  # a per-class indicator is NaN on the other classes
        m[key] = sum(kept) / max(len(kept), 1)
    return m


def _indicators(analysis: str, rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-sample 0/1 values behind :func:`summarise`'s rates (rows without a failure)."""
    ok = [r for r in rows if not r.get("failure")]
    out: dict[str, list[float]] = {}
    if analysis == "disagree":
        out["disagreement_rate"] = [float(str(r.get("disagrees")) == "True") for r in ok]
    if ok and ok[0].get("oracle_shape") not in (None, ""):
        bg = [int(r["oracle_background"]) == int(r["class"]) for r in ok]
        sh = [int(r["oracle_shape"]) == int(r["class"]) for r in ok]
        out["background_is_class"] = [float(b) for b in bg]
        out["shape_is_class"] = [float(s) for s in sh]
        # the systematic error the planted bias causes: the class's background without its shape
        out["background_without_shape"] = [float(b and not s) for b, s in zip(bg, sh)]
        for y in sorted({int(r["class"]) for r in ok}):
            out[f"background_without_shape_class{y}"] = [
                float(b and not s) if int(r["class"]) == y else float("nan") for b, s, r in zip(bg, sh, ok)
            ]
    return out


def summary_intervals(analysis: str, rows: list[dict[str, Any]], seed: int = 0) -> dict[str, list[float]]:
    """95 % bootstrap intervals over images of :func:`summarise`'s rates (a per-class rate
    resamples all images and divides by that class's count); rows are ordered by sample id
    first, so any number of processes gives the same intervals."""
    from ..metrics.uncertainty import RESAMPLES, mean_interval

    rows = sorted(rows, key=lambda r: str(r["sample_id"]))
    out = {}
    for key, vals in _indicators(analysis, rows).items():
        v = torch.tensor(vals, dtype=torch.float64)
        has = torch.isfinite(v)
        lo, hi = mean_interval(torch.nan_to_num(v), RESAMPLES, seed, weights=has.double())
        out[key] = [round(lo, 6), round(hi, 6)]
    return out
