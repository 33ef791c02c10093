"""The accounting rule under random failures (issue 24): a property-based test that
injects method failures, non-finite outputs and corrupt files, and checks the
invariants through predict, evaluate, compare, the leaderboard and explain():

- n_success + n_failed <= n, and flip rate = n_success / n <= 1 - n_failed / n;
- the failed samples are exactly the injected ones (and the corrupted files);
- no measured figure comes from a failed or non-finite sample (L2 is the mean of
  the non-failed rows' L2, each finite);
- compare's N per metric is the number of pairs it used;
- the leaderboard states the counts and marks runs with failures.
"""

import csv
import json
import math
import shutil
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lit_vce import explain
from lit_vce.data import VCEDataModule
from lit_vce.data.world import ShapesWorld
from lit_vce.lightning import VCEModule, VCEPredictionWriter
from lit_vce.methods.base import CounterfactualResult, VCEMethod

N = 6
MODES = ("ok", "reason", "nan", "inf")
FILE_DAMAGE = ("none", "truncate", "bitflip", "delete")


def _templates() -> torch.Tensor:
    """One world image per class, on its class's background (the biased regime): blending
    towards it moves the ``biased`` classifier towards the class."""
    d = ShapesWorld("biased", "test", 64)
    out = {}
    for i in range(64):
        it = d[i]
        out.setdefault(int(it["label"]), it["image"])
    return torch.stack([out[k] for k in range(4)])


TEMPLATES = _templates()


class Injected(VCEMethod):
    """A stand-in method: blends each image towards a world image of its target class, and
    fails the samples named in ``plan`` (base sample id -> ``reason``, ``nan`` or ``inf``)."""

    name = "injected"

    def __init__(self, plan: dict | None = None, weight: float = 0.95):
        super().__init__()
        self.plan = dict(plan or {})
        self.weight = float(weight)

    def counterfactuals(self, batch, classifier):
        t = TEMPLATES.to(batch.images)[batch.target]
        images = (1 - self.weight) * batch.images + self.weight * t
        failure: list[str | None] = [None] * len(batch)
        for i, sid in enumerate(batch.sample_ids):
            mode = self.plan.get(sid.split("->")[0], "ok")
            if mode == "reason":
                failure[i] = "injected failure"
            elif mode == "nan":
                images[i, 0, 0, 0] = float("nan")
            elif mode == "inf":
                images[i] = float("inf")
        return CounterfactualResult(images, {"weight": torch.full((len(batch),), self.weight)}, failure)


def _check_counts(res: dict, expected_failed: set[str], rows: list[dict], where: str) -> None:
    n, ok, bad = res["n"], res["n_success"], res["n_failed"]
    assert ok + bad <= n, where
    fr = res["metrics"]["flip_rate"]
    assert fr <= 1 - bad / n + 1e-12 and fr == pytest.approx(ok / n), where
    failed = {r["sample_id"].split("->")[0] for r in rows if r["failure"]}
    assert failed == expected_failed, where
    assert all(r["success"] in ("False", False) for r in rows if r["failure"]), where
    measured = [float(r["l2"]) for r in rows if not r["failure"]]
    assert all(math.isfinite(v) for v in measured), where
    assert all(r.get("l2") in ("", None) for r in rows if r["failure"]), where
    if measured:
        assert res["metrics"]["l2"] == pytest.approx(sum(measured) / len(measured), rel=1e-5), where
    else:
        assert math.isnan(res["metrics"]["l2"]), where
    assert bool(res["warnings"]) == bool(bad), where


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:40])
    elif how == "bitflip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x04
        path.write_bytes(bytes(data))
    elif how == "delete":
        path.unlink()


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    modes=st.lists(st.sampled_from(MODES), min_size=N, max_size=N),
    damage=st.lists(st.sampled_from(FILE_DAMAGE), min_size=N, max_size=N),
)
def test_failures_never_move_a_figure_in_any_stage(modes, damage):
    from lit_vce.cli import main
    from lit_vce.report.compare import compare_runs
    from lit_vce.report.leaderboard import load_results, markdown_table

    d = ShapesWorld("balanced", "test", N)
    base = [d.base_id(i) for i in range(N)]
    plan = {b: m for b, m in zip(base, modes) if m != "ok"}
    root = Path(tempfile.mkdtemp(prefix="acct-"))
    try:
        # predict
        out = root / "runs" / "predict"
        module = VCEModule(
            classifier="biased",
            method=Injected(plan),
            world_audit=False,
            interval_resamples=50,
            fid_interval_resamples=0,
            lpips="off",
        )
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            inference_mode=False,
            enable_model_summary=False,
            callbacks=[VCEPredictionWriter(str(out))],
        )
        trainer.predict(module, VCEDataModule("world", num_samples=N, batch_size=4), return_predictions=False)
        res = json.loads((out / "results.json").read_text())
        rows = list(csv.DictReader((out / "samples.csv").open()))
        assert res["n"] == N
        _check_counts(res, set(plan), rows, "predict")

        # evaluate after damaging counterfactual files
        corrupted = set()
        for r in rows:
            b = r["sample_id"].split("->")[0]
            how = damage[base.index(b)]
            cf = out / "counterfactuals" / f"{_stem(r['sample_id'])}.png"
            if cf.is_file() and how != "none":
                _damage(cf, how)
                corrupted.add(b)
        ev = root / "runs" / "evaluate"
        main(["evaluate", str(out), "--out", str(ev), "--fid-interval-resamples", "0", "--interval-resamples", "50"])
        eres = json.loads((ev / "results.json").read_text())
        erows = list(csv.DictReader((ev / "samples.csv").open()))
        assert eres["n"] == N
        _check_counts(eres, set(plan) | corrupted, erows, "evaluate")

        # compare: the pairs each metric used
        cmp = compare_runs(out, ev, resamples=100)
        assert cmp["n_paired"] == N and cmp["metrics"]["flip_rate"]["n"] == N
        both = sum(1 for a, b in zip(rows, erows) if not a["failure"] and not b["failure"])
        assert cmp["metrics"]["l2"]["n"] == both
        assert cmp["metrics"]["flip_rate"]["mean_a"] == pytest.approx(res["metrics"]["flip_rate"])
        assert cmp["metrics"]["flip_rate"]["mean_b"] == pytest.approx(eres["metrics"]["flip_rate"])

        # the leaderboard: counts in every row, runs with failures marked
        table = markdown_table(load_results(root / "runs"))
        for r in (res, eres):
            cell = f"{r['n']} ({r['n_success']} ok" + (f", {r['n_failed']} failed) !" if r["n_failed"] else ")")
            assert cell in table

        # explain(): the same rule in memory
        x = torch.stack([d[i]["image"] for i in range(N)])
        src = [int(d[i]["label"]) for i in range(N)]
        tgt = [(s + 1) % 4 for s in src]
        e = explain(
            x,
            tgt,
            classifier="biased",
            method=Injected(plan),
            sources=src,
            sample_ids=[f"{b}->{t}" for b, t in zip(base, tgt)],
            batch_size=4,
        )
        assert e.n == N and e.n_success + e.n_failed <= N
        assert {r["sample_id"].split("->")[0] for r in e.rows if r["failure"]} == set(plan)
        assert (
            e.metrics["flip_rate"] == pytest.approx(e.n_success / N)
            and e.metrics["flip_rate"] <= 1 - e.n_failed / N + 1e-12
        )
        assert torch.isfinite(e.counterfactuals).all()
        measured = [r["l2"] for r in e.rows if not r["failure"]]
        if measured:
            assert e.metrics["l2"] == pytest.approx(sum(measured) / len(measured), rel=1e-5)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _stem(sample_id: str) -> str:
    from lit_vce.io import sample_key

    return sample_key(sample_id)
