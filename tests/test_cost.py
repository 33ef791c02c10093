"""`lit-vce cost`: call counts from stand-ins, FLOPs of the real architectures on the meta device."""

from __future__ import annotations

import json

import pytest
import torch

from lit_vce.cli import main
from lit_vce.cost import estimate
from lit_vce.cost.counting import _Counter, _SavedTracker, _StandIns


def test_activations_held_at_once_follow_autograds_saved_tensors():
    """k evaluations in one graph hold k evaluations' activations until the backward pass;
    evaluations whose graph is freed in between hold one; the outputs do not change."""
    tracker = _SavedTracker()
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)).requires_grad_(False)
    counter = _Counter(net, tracker)
    x = torch.randn(2, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        y = x
        for _ in range(5):  # a chain of 5 evaluations, one backward: all 5 alive at its start
            y = net(y)
        (g_hooked,) = torch.autograd.grad(y.sum(), x)
        for _ in range(3):  # 3 separate graphs, each freed by its backward: 1 alive at a time
            torch.autograd.grad(net(x).sum(), x)
    assert counter.calls == 16 and counter.grad_calls == 16
    assert counter.peak_live == pytest.approx(2 * 5)  # 2 images x 5 evaluations
    assert counter.live_bytes == 0  # everything released
    y = x
    for _ in range(5):
        y = net(y)
    (g_plain,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g_hooked, g_plain)


def test_stand_ins_count_what_the_method_runs_and_leave_its_output_alone():
    from lit_vce.classifiers import load_classifier
    from lit_vce.methods import DVCE
    from lit_vce.testing import world_batch

    clf = load_classifier("robust")
    m = DVCE(num_steps=10, skip=0.5, robust_classifier=None)
    plain = m.generate(world_batch(2), clf).images
    st = _StandIns()
    st._add(clf, "classifier", "classifier", "robust")
    st._add(m.diffusion.unet, "unet", "unet", None)
    with torch.autograd.graph.saved_tensors_hooks(st.tracker.pack, st.tracker.unpack):
        hooked = m.generate(world_batch(2), clf).images
    assert torch.equal(plain, hooked)
    unet, classifier = st.roles[1].counter, st.roles[0].counter
    assert (unet.calls, unet.grad_calls) == (10, 10)  # 5 guided steps x 2 images, each differentiated
    assert classifier.grad_calls == 10 and unet.peak_live == pytest.approx(2)  # one step's graph per image at a time


def test_cost_of_a_preset_run_counts_the_methods_steps_and_the_real_architectures(tmp_path, capsys):
    report = estimate(
        [
            "--config",
            "presets/ace-imagenet-zs",
            "--config",
            "imagenet/methods/dvce",
            "--model.method.init_args.num_steps",
            "20",
        ],
        tflops=100.0,
    )
    nets = {n.network: n for n in report.networks}
    unet = nets["diffusion UNet adm:imagenet256_uncond"]
    explained, partner = nets["classifier timm:resnet50.tv_in1k"], nets["classifier robustbench:Salman2020Do_R50"]
    # 20 respaced steps, the first half skipped: 10 guided steps, each with two backward passes through
    # the UNet (the explained classifier's gradient and the partner's, separately: the cone needs both)
    assert (unet.calls, unet.grad_calls, unet.live) == (10, 20, 1)
    assert partner.grad_calls == 10 and explained.grad_calls == 10
    # the real architectures: OpenAI's 256 px unconditional ADM (552.8M parameters); ResNet-50 at 224 px
    # (8.2 GFLOP = 2 x 4.1 GMAC) and, under the ACE preset's preprocessing "none", at the whole 256 px image
    assert unet.params_m == pytest.approx(552.8, abs=0.1) and unet.gflops_forward == pytest.approx(2239.7, rel=1e-3)
    assert partner.gflops_forward == pytest.approx(8.18, rel=0.01)
    assert explained.gflops_forward == pytest.approx(8.18 * (256 / 224) ** 2, rel=0.01)
    assert report.num_vces == 100  # zebra <-> sorrel, 50 val images each
    per_vce = sum(n.calls * n.gflops_forward + n.grad_calls * n.gflops_backward for n in report.networks) / 1e3
    assert report.tflop_per_vce == pytest.approx(per_vce) and report.seconds_per_vce == pytest.approx(per_vce / 100)
    assert report.memory_gib > report.weights_gib > 2.0
    capsys.readouterr()
    main(
        [
            "cost",
            "--tflops",
            "100",
            "--json",
            str(tmp_path / "cost.json"),
            "--config",
            "presets/ace-imagenet-zs",
            "--config",
            "imagenet/methods/svce",
            "--model.method.init_args.steps",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert "svce at 256 px" in out and "GPU hours" in out and "classifier timm:resnet50.tv_in1k" in out
    data = json.loads((tmp_path / "cost.json").read_text())
    assert data["num_vces"] == 100 and data["seconds_per_vce"] > 0 and data["networks"][0]["calls"] >= 3
    with pytest.raises(SystemExit) as e:
        main(["cost"])
    assert e.value.code == 2
