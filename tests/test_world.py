import numpy as np
import pytest
import torch

from lit_vce.data.world import BACKGROUNDS, SHAPES, ShapesWorld, sample_item


def test_items_are_a_pure_function_of_seed_regime_split_index():
    a = ShapesWorld("balanced", "test", 8)[3]
    b = ShapesWorld("balanced", "test", 8)[3]
    assert torch.equal(a["image"], b["image"]) and a["sample_id"] == b["sample_id"]
    assert not torch.equal(a["image"], ShapesWorld("balanced", "train", 8)[3]["image"])
    assert not torch.equal(a["image"], ShapesWorld("balanced", "test", 8, seed=1)[3]["image"])


def test_item_contents():
    it = ShapesWorld("balanced", "test", 4)[0]
    assert it["image"].shape == (3, 32, 32) and it["image"].min() >= 0 and it["image"].max() <= 1
    assert it["mask"].shape == (1, 32, 32) and 10 < it["mask"].sum() < 600
    assert it["label"] in range(len(SHAPES)) and it["background"] in range(len(BACKGROUNDS))
    # the shape is drawn in one flat colour over exactly the mask
    s = sample_item(0, "balanced", "test", 0)
    assert np.allclose(s.image[s.mask], np.asarray(s.colour, dtype=np.float32))


def test_sample_label_matches_rendered_label():
    d = ShapesWorld("biased", "val", 50)
    assert all(d.sample_label(i) == d[i]["label"] for i in range(50))


def test_regimes_plant_or_remove_the_background_shortcut():
    n = 2000
    biased = [sample_item(0, "biased", "train", i) for i in range(n)]
    balanced = [sample_item(0, "balanced", "train", i) for i in range(n)]
    agree_b = np.mean([s.shape == s.background for s in biased])
    agree_u = np.mean([s.shape == s.background for s in balanced])
    assert agree_b > 0.97  # 98% + the 1/4 chance of the random rest
    assert 0.2 < agree_u < 0.3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regime": "odd"}, r"regime must be one of \('biased', 'balanced', .*got 'odd'"),
        ({"split": "dev"}, r"split must be one of \('train', 'val', 'test'\), got 'dev'"),
        ({"size": -1}, "size must be non-negative"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesWorld(**kwargs)


def test_watermark_regimes_plant_a_readable_corner_patch():
    from lit_vce.data.world import WATERMARK_SIZE, WATERMARKS, read_watermark, watermark_pattern

    n = 1000
    marked = [sample_item(0, "watermark", "train", i) for i in range(n)]
    free = [sample_item(0, "watermark_balanced", "train", i) for i in range(n)]
    assert np.mean([s.watermark == s.shape for s in marked]) > 0.97
    assert 0.2 < np.mean([s.watermark == s.shape for s in free]) < 0.3
    # the background stays independent of the class in both
    assert 0.2 < np.mean([s.background == s.shape for s in marked]) < 0.3
    s = marked[0]
    assert np.array_equal(s.image[:WATERMARK_SIZE, :WATERMARK_SIZE, 0], watermark_pattern(s.watermark))
    assert not s.mask[:WATERMARK_SIZE, :WATERMARK_SIZE].any()  # the patch hides the shape there
    # read back exactly, also after resizing, and never on the regimes without a patch
    for regime in ("watermark", "watermark_balanced", "balanced", "biased"):
        d = ShapesWorld(regime, "test", 200)
        x = torch.stack([d[i]["image"] for i in range(200)])
        truth = torch.tensor([d[i]["watermark"] for i in range(200)])
        assert torch.equal(read_watermark(x), truth), regime
        big = torch.nn.functional.interpolate(x, size=(64, 64), mode="nearest")
        assert torch.equal(read_watermark(big), truth), regime
    assert len(WATERMARKS) == 4 and sample_item(0, "balanced", "test", 0).watermark == -1


def test_watermarked_classifier_follows_the_patch_and_the_oracle_does_not():
    from lit_vce.world.models import load_world_network

    d = ShapesWorld("watermark_balanced", "test", 256)
    x = torch.stack([d[i]["image"] for i in range(256)])
    shape = torch.tensor([d[i]["label"] for i in range(256)])
    mark = torch.tensor([d[i]["watermark"] for i in range(256)])
    with torch.no_grad():
        pred = load_world_network("watermarked")(x).argmax(1)
        oracle = load_world_network("oracle")(x).argmax(1)
    assert (pred == mark).float().mean() > 0.95 and (pred == shape).float().mean() < 0.4
    assert (oracle == shape).float().mean() > 0.97


def test_uniform_chisquare_matches_scipy():
    from scipy.stats import chisquare

    from lit_vce.world.evaluation import uniform_chisquare

    for counts in ([256, 256, 256, 256], [478, 198, 168, 180], [290, 240, 250, 244], [30, 10, 12]):
        chi2, p = uniform_chisquare(torch.tensor(counts))
        ref = chisquare(counts)
        assert chi2 == pytest.approx(ref.statistic, rel=1e-9) and p == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-300)
