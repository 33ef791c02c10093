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
    with pytest.raises(ZeroDivisionError):
        ce / 0
    with pytest.raises(TypeError):
        ce + 1.5
