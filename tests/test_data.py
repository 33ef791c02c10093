import json

import pytest
import torch

from lit_vce.data import VCEDataModule
from lit_vce.data.imagenet import closest_classes, imagenet_class_names
from lit_vce.data.protocols import assign_target
from lit_vce.lightning.writer import VCEPredictionWriter, sample_key
from lit_vce.registry import METHODS, Registry


def test_random_targets_never_equal_the_source_and_are_stable():
    seen = set()
    for i in range(400):
        src = i % 4
        (t,) = assign_target("random", src, f"id{i}", 4, seed=0)
        assert t != src and 0 <= t < 4
        assert assign_target("random", src, f"id{i}", 4, seed=0) == [t]
        seen.add(t)
    assert seen == {0, 1, 2, 3}


def test_imagenet_metadata_and_closest_protocol():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[340] == "zebra" and names[339] == "sorrel"
    assert closest_classes()[340][0] == 339
    assert assign_target("wordnet_closest", 340, "x", 1000) == [339]
    with pytest.raises(ValueError, match="1000 ImageNet classes"):
        VCEDataModule(protocol="wordnet_closest").setup()


def test_datamodule_batches_and_sample_ids_are_stable():
    dm = VCEDataModule(num_samples=5, batch_size=2, protocol="next")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask"].shape == (2, 1, 32, 32)
    assert torch.equal(batch["target"], (batch["source"] + 1) % 4)
    assert batch["sample_id"][0] == f"world-balanced-test-000000->{int(batch['target'][0])}"
    dm2 = VCEDataModule(num_samples=5, batch_size=5, protocol="next")
    assert next(iter(dm2.predict_dataloader()))["sample_id"][:2] == batch["sample_id"]


def test_fixed_protocol_leaves_out_images_of_the_target_class():
    dm = VCEDataModule(num_samples=40, protocol="fixed", target=2)
    assert all(s != 2 and t == 2 for _, s, t in dm.dataset.entries)


def test_an_unreadable_sample_row_is_redone(tmp_path):
    w = VCEPredictionWriter(str(tmp_path))
    w.setup(None, None, "predict")
    w.write_samples([{"sample_id": "a", "source": 0, "target": 1, "success": True, "failure": ""}], None, None)
    (tmp_path / "samples" / f"{sample_key('b')}.json").write_text("{truncated")
    fresh = VCEPredictionWriter(str(tmp_path))
    assert fresh.done_ids() == {"a"}
    assert json.loads((tmp_path / "samples" / f"{sample_key('a')}.json").read_text())["target"] == 1
    assert sample_key("x/y->1") != sample_key("x_y->1")


def test_registry_refuses_silent_overwrites_and_lists_names():
    reg = Registry("thing", "lit_vce.tests_none")
    reg.register("a")(int)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(float)
    with pytest.raises(KeyError, match="registered: a"):
        reg.get("b")
    assert {"classifier_guidance", "dvce"} <= set(METHODS.names())


def test_the_data_owns_classifier_dependent_selection():
    """misclassified: keep what the classifier gets wrong, its prediction as the source; the
    LightningModule only asks the datamodule (no protocol names in it)."""
    import inspect

    import lit_vce.lightning.module as module_src
    from lit_vce.data.protocols import select_by_classifier

    class Fixed(torch.nn.Module):
        def forward(self, x):  # predicts class 2 for every image
            return torch.nn.functional.one_hot(torch.full((len(x),), 2), 4).float()

    images, source = torch.rand(3, 3, 8, 8), torch.tensor([2, 0, 1])
    keep, new = select_by_classifier("misclassified", images, source, Fixed())
    assert keep.tolist() == [False, True, True] and new.tolist() == [2, 2, 2]
    keep, new = select_by_classifier("random", images, source, Fixed())
    assert keep.all() and torch.equal(new, source)
    dm = VCEDataModule(dataset="world", num_samples=4, protocol="misclassified")
    assert dm.selects_by_classifier and not VCEDataModule(dataset="world", num_samples=4).selects_by_classifier
    assert "misclassified" not in inspect.getsource(module_src)
