"""Regions (lit_vce.regions): RCSB's automated rule, the data's masks, and every method keeping to them."""

import dataclasses

import numpy as np
import pytest
import torch

from lit_vce.regions import (
    attribution_cells,
    change_outside,
    integrated_gradients,
    normalize_attributions,
    parse_regions,
    read_region,
    top_area,
)
from lit_vce.rngs import sample_rngs


def test_integrated_gradients_equal_captums(tiny_classifier, tiny_batch):
    from captum.attr import IntegratedGradients

    x, cls = tiny_batch.images, tiny_batch.source
    ours = integrated_gradients(tiny_classifier, x, cls, steps=50)
    theirs = IntegratedGradients(tiny_classifier).attribute(x, target=cls, n_steps=50, internal_batch_size=64)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_attribution_postprocessing_follows_rcsb_by_hand():
    # normalisation: |channel sum| over the value where the sorted cumulative sum passes 98 %
    attr = torch.zeros(1, 3, 4, 4)
    attr[0, 0, 0, 0], attr[0, 1, 1, 1], attr[0, 2, 2, 2] = -8.0, 1.0, 1.0
    norm = normalize_attributions(attr)
    assert norm[0, 0, 0] == 1.0 and norm[0, 1, 1] == pytest.approx(1 / 8) and norm.sum() == pytest.approx(1.25)
    # the area rule: 16 cells, values 1..16: at most 30 % keeps the top 4 (25 %)
    cells = torch.arange(1, 17, dtype=torch.float32).view(1, 4, 4)
    kept = top_area(cells, 0.3)
    assert int((kept > 0).sum()) == 4 and kept.flatten()[-4:].tolist() == [13, 14, 15, 16]
    sparse = torch.zeros(1, 4, 4)
    sparse[0, 0, 0] = 1.0
    assert torch.equal(top_area(sparse, 0.3), sparse)  # already within the area: kept whole


def test_attribution_cells_tile_the_image_and_cover_the_area(tiny_classifier, tiny_batch):
    rngs = sample_rngs(0, tiny_batch.sample_ids)
    r = attribution_cells(tiny_classifier, tiny_batch.images, tiny_batch.source, rngs, cell_size=4, area=0.3, steps=8)
    assert r.shape == (4, 1, 16, 16)
    area = r.flatten(1).mean(1)
    assert (area <= 0.3).all() and (area >= 0.25).all()  # whole 4x4 cells: 4 of 16
    blocks = r.view(4, 1, 4, 4, 4, 4)
    assert (blocks.amax((3, 5)) == blocks.amin((3, 5))).all()  # constant on every cell
    again = attribution_cells(
        tiny_classifier, tiny_batch.images, tiny_batch.source, sample_rngs(0, tiny_batch.sample_ids), 4, 0.3, steps=8
    )
    assert torch.equal(r, again)
    with pytest.raises(ValueError, match="does not divide"):
        attribution_cells(tiny_classifier, tiny_batch.images, tiny_batch.source, rngs, cell_size=5)


def test_parse_and_read_regions(tmp_path):
    from PIL import Image

    assert parse_regions(None) is None
    assert parse_regions("objects").kind == "objects"
    spec = parse_regions("cells:8:0.2")
    assert (spec.kind, spec.cell_size, spec.area) == ("cells", 8, 0.2)
    for bad in ("cells:8", "cells:0:0.2", "cells:8:1.5", "nowhere/at/all"):
        with pytest.raises(ValueError, match="regions"):
            parse_regions(bad)
    (tmp_path / "n01").mkdir()
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, :4] = 255
    Image.fromarray(mask).save(tmp_path / "n01" / "img1.png")
    assert parse_regions(str(tmp_path)).kind == "folder"
    r = read_region(tmp_path, "n01/img1.JPEG->3", (16, 16))
    assert r.shape == (1, 16, 16) and r[0, :, :8].all() and not r[0, :, 8:].any()
    with pytest.raises(FileNotFoundError, match="no region mask for sample"):
        read_region(tmp_path, "n01/img2.JPEG->3", (16, 16))


def test_change_outside_is_the_share_of_the_change():
    x = torch.zeros(1, 3, 4, 4)
    region = torch.zeros(1, 1, 4, 4)
    region[..., :2, :] = 1
    y = x.clone()
    y[..., 0, 0], y[..., 3, 3] = 0.3, 0.1  # 0.9 inside, 0.3 outside (over 3 channels)
    assert change_outside(x, y, region).item() == pytest.approx(0.25)
    assert change_outside(x, x, region).item() == 0.0


@pytest.mark.parametrize("name", ["classifier_guidance", "dvce", "fastdime", "maskdime", "dime", "ldce", "svce", "ace"])
def test_every_composing_or_projecting_method_changes_nothing_outside_the_region(name, tiny_classifier, tiny_batch):
    from lit_vce.registry import METHODS
    from lit_vce.testing.methods import build_for_test

    method = build_for_test(METHODS.get(name), classifier=tiny_classifier)
    region = torch.zeros(len(tiny_batch), 1, 16, 16)
    region[..., 2:10, 3:13] = 1
    out = method.generate(dataclasses.replace(tiny_batch, region=region), tiny_classifier)
    assert torch.equal(out.images * (1 - region), tiny_batch.images * (1 - region)), name
    assert ((out.images - tiny_batch.images).abs() * region).amax() > 0.01, name  # it did edit inside
    assert torch.equal(out.diagnostics["region_change_outside"], torch.zeros(len(tiny_batch)))
    free = method.generate(tiny_batch, tiny_classifier)
    assert "region_change_outside" not in free.diagnostics
    assert ((free.images - tiny_batch.images).abs() * (1 - region)).amax() > 0.01, name  # unconstrained: it would


def test_digin_takes_the_region_as_its_foreground_and_reports_the_change_outside(tiny_classifier, tiny_batch):
    from lit_vce.registry import METHODS
    from lit_vce.rngs import sample_rngs
    from lit_vce.testing.methods import build_for_test

    method = build_for_test(METHODS.get("digin"), classifier=tiny_classifier)
    region = torch.zeros(len(tiny_batch), 1, 16, 16)
    region[..., 2:10, 3:13] = 1

    def fresh(**kw):
        return dataclasses.replace(tiny_batch, rngs=sample_rngs(0, tiny_batch.sample_ids), **kw)

    seen = []
    original = method.prepare_edit

    def spy(batch, *a, **k):
        edit = original(batch, *a, **k)
        seen.append(edit.pixel_mask)
        return edit

    method.prepare_edit = spy
    out = method.generate(fresh(region=region), tiny_classifier)
    assert seen and torch.equal(seen[-1], region)  # the region is the loss's foreground mask
    share = out.diagnostics["region_change_outside"]
    assert share.shape == (4,) and bool(((share >= 0) & (share <= 1)).all())  # soft: reported, not forced to 0
    free = method.generate(fresh(), tiny_classifier)
    assert seen[-1] is None and not torch.equal(free.images, out.images)


def test_a_method_without_a_region_mode_refuses_regions(tiny_classifier, tiny_batch):
    from lit_vce.methods.base import CounterfactualResult, VCEMethod

    class Copy(VCEMethod):
        """Returns the input."""

        name = "copy"

        def counterfactuals(self, batch, classifier):
            return CounterfactualResult(batch.images.clone())

    batch = dataclasses.replace(tiny_batch, region=torch.ones(4, 1, 16, 16))
    with pytest.raises(ValueError, match="cannot keep its edit to a region"):
        Copy().generate(batch, tiny_classifier)


def test_regions_reach_the_metrics_and_rows_through_explain():
    import lit_vce
    from lit_vce.data.world import ShapesWorld

    data = ShapesWorld("balanced", "test", size=4, seed=0)
    x = torch.stack([data[i]["image"] for i in range(4)])
    masks = torch.stack([data[i]["mask"] for i in range(4)])
    targets = [(data.sample_label(i) + 1) % 4 for i in range(4)]
    ex = lit_vce.explain(x, targets, "robust", "classifier_guidance", num_steps=6, regions=masks, masks=masks)
    assert ex.metrics["region_n"] == 4 and ex.metrics["region_change_outside"] == 0.0
    assert ex.metrics["region_area"] == pytest.approx(float(masks.mean()))
    assert all(r["diagnostics"]["region_change_outside"] == 0.0 for r in ex.rows)
    assert torch.equal(ex.counterfactuals * (1 - masks), ex.originals * (1 - masks))
    by_rule = lit_vce.explain(x, targets, "robust", "classifier_guidance", num_steps=6, regions="objects", masks=masks)
    assert torch.equal(by_rule.counterfactuals, ex.counterfactuals)


def test_predict_reads_regions_from_a_folder_and_the_cells_rule(tmp_path, capsys):
    """`--data.regions`: a folder of masks (one missing: refused before any work) and RCSB's cells."""
    import json

    from PIL import Image

    from lit_vce.cli import main

    masks = tmp_path / "masks"
    masks.mkdir()
    half = np.zeros((32, 32), dtype=np.uint8)
    half[:, 16:] = 255
    Image.fromarray(half).save(masks / "world-balanced-test-000000.png")
    base = ["predict", "--config", "world/classifier_guidance", "--model.classifier", "robust"]
    base += [
        "--data.num_samples",
        "2",
        "--model.method.init_args.num_steps",
        "4",
        "--trainer.enable_progress_bar",
        "false",
    ]
    with pytest.raises(SystemExit) as e:
        main(base + ["--data.regions", str(masks), "--writer.output_dir", str(tmp_path / "missing")])
    assert e.value.code == 2 and "images have no mask in" in capsys.readouterr().err
    assert not (tmp_path / "missing" / "samples.csv").exists()
    Image.fromarray(half).save(masks / "world-balanced-test-000001.png")
    for name, regions in (("folder", str(masks)), ("cells", "cells:4:0.25")):
        main(base + ["--data.regions", regions, "--writer.output_dir", str(tmp_path / name)])
        res = json.loads((tmp_path / name / "results.json").read_text())
        m = res.get("metrics", res)
        assert m["region_n"] == 2 and m["region_change_outside"] == 0.0
        assert m["region_area"] == (0.5 if name == "folder" else 0.25)
