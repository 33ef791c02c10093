"""The objective algebra: + - neg * / and sum([...]), values and generated descriptions."""

import pytest
import torch

from lit_vce.objectives import BackgroundL2, L1Distance, ObjectiveContext, TargetCE


def test_objective_algebra_values_and_descriptions():
    torch.manual_seed(0)
    x, y = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4))
    ctx = ObjectiveContext(y, torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long), clf)
    ce, l1, bg = TargetCE(), L1Distance(), BackgroundL2()
    v = {"ce": ce(x, ctx), "l1": l1(x, ctx), "bg": bg(x, ctx)}
    cases = [
        (ce + 25 * bg, v["ce"] + 25 * v["bg"], "TargetCE + 25*BackgroundL2(pixel)"),
        (ce - 2 * l1, v["ce"] - 2 * v["l1"], "TargetCE - 2*L1Distance"),
        (-(ce + l1), -(v["ce"] + v["l1"]), "-(TargetCE + L1Distance)"),
        (sum([ce, l1, bg]), v["ce"] + v["l1"] + v["bg"], "TargetCE + L1Distance + BackgroundL2(pixel)"),
        ((ce + l1) / 4, (v["ce"] + v["l1"]) / 4, "0.25*(TargetCE + L1Distance)"),
        (2 * (3 * ce), 6 * v["ce"], "6*TargetCE"),
    ]
    for obj, expected, text in cases:
        torch.testing.assert_close(obj(x, ctx), expected)
        assert obj.describe() == text
    with pytest.raises(ZeroDivisionError, match="an objective divided by 0"):
        ce / 0
    with pytest.raises(TypeError, match="unsupported operand type"):
        ce + 1.5


def test_weighted_terms_recover_the_objective_and_mark_classifier_terms():
    from lit_vce.objectives import L1Distance, L2Distance, ObjectiveContext, TargetCE

    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x, orig = torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)
    ctx = ObjectiveContext(orig, torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), clf)
    obj = 2 * (TargetCE() - 0.5 * L1Distance()) + L2Distance() / 4
    terms = obj.weighted_terms()
    assert [w for w, _ in terms] == [2.0, -1.0, 0.25]
    assert [t.uses_classifier for _, t in terms] == [True, False, False] and obj.uses_classifier
    torch.testing.assert_close(sum(w * t(x, ctx) for w, t in terms), obj(x, ctx))
    total = L1Distance(reduction="sum")
    assert total.describe() == "L1Distance(sum)"
    torch.testing.assert_close(total(x, ctx), (x - orig).abs().flatten(1).sum(1))


def test_classifier_guidance_and_dvce_descend_their_printed_objectives(tiny_diffusion, tiny_classifier, tiny_batch):
    from lit_vce.methods import DVCE, ClassifierGuidance
    from lit_vce.objectives import L1Distance
    from lit_vce.rngs import sample_rngs

    cg = ClassifierGuidance(diffusion=tiny_diffusion("ddim", 6), scale=3.0, l1_weight=0.5)
    assert cg.describe()["objective"] == "3*TargetCE + 0.5*L1Distance"
    assert DVCE(diffusion=tiny_diffusion("adm", 6)).describe()["objective"] == "0.1*TargetCE + 0.15*L1Distance(sum)"
    # a custom objective replaces the terms: distance alone keeps the image closer than the default
    default = cg.generate(tiny_batch, tiny_classifier).images
    tiny_batch.rngs = sample_rngs(0, tiny_batch.sample_ids)  # fresh per-sample generators for the second run
    closer = ClassifierGuidance(diffusion=tiny_diffusion("ddim", 6), objective=50.0 * L1Distance())
    assert closer.describe()["objective"] == "50*L1Distance"
    mine = closer.generate(tiny_batch, tiny_classifier).images
    assert (mine - tiny_batch.images).abs().mean() < (default - tiny_batch.images).abs().mean()
