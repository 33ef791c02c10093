import math

import pytest
import torch

from lit_vce.rngs import sample_rngs
from lit_vce.methods import VCEBatch
from lit_vce.methods.parts import angle, cone_projection, random_affine_perspective
from lit_vce.registry import METHODS


def test_cone_projection_gives_exactly_alpha_around_the_axis_when_outside_and_is_identity_inside():
    torch.manual_seed(0)
    axis = torch.randn(64, 3, 8, 8)
    v = torch.randn(64, 3, 8, 8)  # random directions in high dimension: ~90 degrees apart
    out = cone_projection(axis, v, 30.0)
    assert torch.allclose(angle(out, axis), torch.full((64,), math.radians(30)), atol=1e-4)
    assert torch.allclose(out.flatten(1).norm(dim=1), v.flatten(1).norm(dim=1), rtol=1e-5)
    # the result stays in the plane of axis and v, on v's side
    basis = torch.stack([axis.flatten(1), v.flatten(1)], 2)  # (N, D, 2)
    q, _ = torch.linalg.qr(basis)
    resid = out.flatten(1) - (q @ (q.transpose(1, 2) @ out.flatten(1)[..., None]))[..., 0]
    assert resid.norm(dim=1).max() < 1e-3
    assert (angle(out, v) < angle(axis, v)).all()
    # inside the cone: unchanged
    inside = axis + 0.1 * v
    assert (angle(inside, axis) < math.radians(30)).all()
    assert torch.equal(cone_projection(axis, inside, 30.0), inside)


def test_augmentations_are_per_sample_deterministic_and_differentiable():
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    a = random_affine_perspective(x, sample_rngs(0, ["a", "b", "c"]), 4)
    b = random_affine_perspective(x[1:2], sample_rngs(0, ["b"]), 4)
    assert a.shape == (12, 3, 16, 16)
    assert torch.allclose(a[4:8], b, atol=1e-6)
    assert torch.allclose(a[0], x[0], atol=1e-5)  # the first view is clean
    a.sum().backward()
    assert x.grad.abs().sum() > 0


def _build(name, tiny_diffusion, tiny_classifier, stochastic=False):
    """A registered method on the tiny models, from its own ``test_kwargs`` (as check_method builds it)."""
    from lit_vce.testing.methods import build_for_test

    return build_for_test(METHODS.get(name), lambda s, k: tiny_diffusion(s, k), tiny_classifier, stochastic)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_keeps_the_method_contract(name):
    """lit_vce.testing.check_method: shapes, range, diagnostics, target_confidence, settings,
    same seeds -> same bytes, batch composition, inner_batch_size, resolution, concurrency."""
    from lit_vce.testing import check_method

    passed = check_method(METHODS.get(name))
    assert "a sample's output does not depend on the batch it came in" in passed
    assert METHODS.get(name).name == name


def test_the_contract_check_names_what_a_broken_method_breaks():
    from lit_vce.methods import CounterfactualResult, VCEMethod
    from lit_vce.testing import check_method

    class Unseeded(VCEMethod):
        """Adds noise from the global generator (not the batch's), and reports a diagnostic per batch."""

        def counterfactuals(self, batch, classifier):
            noisy = (batch.images + 0.3 * torch.rand(batch.images.shape)).clamp(0, 1)
            return CounterfactualResult(noisy, {"per_batch": torch.tensor(1.0)})

    with pytest.raises(ValueError, match="diagnostic 'per_batch' is not a tensor of shape"):
        check_method(Unseeded)

    class Unseeded2(Unseeded):
        """Adds noise from the global generator (not the batch's)."""

        def counterfactuals(self, batch, classifier):
            return CounterfactualResult((batch.images + 0.3 * torch.rand(batch.images.shape)).clamp(0, 1))

    with pytest.raises(AssertionError) as err:
        check_method(Unseeded2)
    assert "the same seeds give the same bytes" in str(err.value)
    assert "does not depend on the batch" in str(err.value)

    with pytest.raises(TypeError, match="overrides generate"):

        class Old(VCEMethod):  # noqa: F841  (the old interface is refused when the class is made)
            def generate(self, batch, classifier):
                return CounterfactualResult(batch.images)


def test_generate_resizes_fails_non_finite_images_and_retries_the_unflipped(tiny_classifier, tiny_batch):
    from lit_vce.methods import CounterfactualResult, VCEMethod

    calls = []

    class Fixed(VCEMethod):
        """Two attempts: the first returns NaN for sample 0 and a fixed grey elsewhere."""

        def __init__(self, level: float = 0.2):
            super().__init__()
            self.level = level

        def model_resolution(self):
            return 8

        def attempts(self):
            return [({"level": 0.2}, Fixed(0.2)), ({"level": 0.9}, Fixed(0.9))]

        def counterfactuals(self, batch, classifier):
            calls.append((self.level, tuple(batch.images.shape), list(batch.sample_ids)))
            out = torch.full_like(batch.images, self.level)
            if self.level == 0.2 and "s0" in batch.sample_ids:
                out[batch.sample_ids.index("s0")] = float("nan")
            return CounterfactualResult(out, {"mean": out.flatten(1).mean(1)})

    res = Fixed().generate(tiny_batch, tiny_classifier)
    assert calls[0][1] == (4, 3, 8, 8)  # resized to the model's resolution
    assert res.images.shape == tiny_batch.images.shape  # and back
    with torch.no_grad():
        flipped = tiny_classifier(torch.full_like(tiny_batch.images, 0.2)).argmax(1) == tiny_batch.target
    retried = [f"s{i}" for i in range(4) if i == 0 or not bool(flipped[i])]  # a failed sample is not flipped
    assert calls[1][2] == retried
    assert res.failure == [None] * 4  # sample 0's non-finite first attempt was retried
    assert list(res.diagnostics)[0] == "target_confidence"
    assert res.diagnostics["level"][0] == 0.9 and torch.isfinite(res.images).all()
    one = Fixed()
    one.attempts = lambda: [({}, Fixed(0.2))]
    res = one.generate(tiny_batch, tiny_classifier)
    assert res.failure[0] == "non-finite output" and torch.equal(res.images[0], tiny_batch.images[0])


def test_methods_with_hooked_objectives_are_generated_sequentially(tiny_classifier):
    from lit_vce.methods import ClassifierGuidance
    from lit_vce.objectives import L1Distance, NeuronActivation, TargetCE

    assert ClassifierGuidance(objective=2 * TargetCE() + L1Distance()).concurrent_samples
    # the neuron objective reads its unit through a forward hook on the shared classifier
    assert not ClassifierGuidance(objective=TargetCE() + 0.5 * NeuronActivation(tiny_classifier, 0)).concurrent_samples
    assert not METHODS.get("digin").supports_concurrency  # attention control and memory probes


class _NaNOnFirst(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.num_classes = inner.num_classes

    def forward(self, x):
        out = self.inner(x)
        bad = torch.zeros_like(out)
        bad[0] = float("nan")
        return out + bad


def test_non_finite_gradient_marks_only_that_sample_failed(tiny_diffusion, tiny_classifier, tiny_batch):
    method = METHODS.get("classifier_guidance")(diffusion=tiny_diffusion("ddim", 10))
    out = method.generate(tiny_batch, _NaNOnFirst(tiny_classifier))
    assert out.failure[0] and "non-finite" in out.failure[0]
    assert out.failure[1:] == [None, None, None]
    assert torch.equal(out.images[0], tiny_batch.images[0])  # a failed sample returns its original


def test_classifier_guidance_raises_target_confidence_on_the_world():
    """With the shipped models: guided edits reach the target far more often than unguided ones."""
    from lit_vce.classifiers import load_classifier
    from lit_vce.data.world import ShapesWorld
    from lit_vce.methods import ClassifierGuidance

    clf = load_classifier("robust")
    d = ShapesWorld("balanced", "test", 8)
    items = [d[i] for i in range(8)]
    x = torch.stack([it["image"] for it in items])
    src = torch.tensor([it["label"] for it in items])
    tgt = (src + 1) % 4
    ids = [it["sample_id"] for it in items]
    conf = {}
    for scale in (0.0, 2.0):
        m = ClassifierGuidance(scale=scale, l1_weight=0.6, normalize=True, sampler="ddpm", num_steps=50, skip=0.6)
        out = m.generate(VCEBatch(x, src, tgt, ids, sample_rngs(0, ids)), clf)
        conf[scale] = out.diagnostics["target_confidence"].mean().item()
    assert conf[2.0] > conf[0.0] + 0.5, conf


def test_describe_records_every_constructor_argument_without_a_hand_kept_list(tiny_diffusion):
    import inspect

    from lit_vce.methods import DVCE, DiGIN
    from lit_vce.methods.fastdime import FastDiME

    m = FastDiME(diffusion=tiny_diffusion("adm", 10), warmup=3)
    d = m.describe()
    own = [p for p in inspect.signature(FastDiME.__init__).parameters if p not in ("self", "kwargs")]
    inherited = [p for p in inspect.signature(FastDiME.__mro__[1].__init__).parameters if p not in ("self",)]
    assert set(own) | set(inherited) <= set(d)  # FastDiME's and PerStepGuidance's arguments, defaults included
    assert d["warmup"] == 3 and d["conditioning"] == "none"
    assert d["diffusion"]["class"] == "PixelDiffusion" and d["diffusion"]["sampler"] == "adm"
    assert d["sampler"] == "adm" and d["num_steps"] == 10  # what the built model runs, not the unused defaults
    assert DVCE(diffusion=tiny_diffusion("adm", 10), robust_classifier=None).describe()["robust_classifier"] is None
    g = DiGIN(diffusion=tiny_diffusion("ddim", 5), num_steps=5, l1_weight=0.5)
    assert (
        g.describe()["objective"] == "1*TargetCE + 25*BackgroundL2(latent) + 250*BackgroundL2(pixel) + 0.5*L1Distance"
    )
    assert g.describe()["injection"] == "conditioning"  # "auto" resolved
    g.inversion.method = "none"  # changed after construction (as the analyses do): recorded as it runs
    assert g.describe()["inversion"] == "none" and g.describe()["diffusion"]["guidance_scale"] == 3.0


def test_source_conditioning_holds_the_original_class_in_the_prior():
    """Unguided (scale 0), the world ddpm conditioned on the source class keeps the source
    shape more often than conditioned on the target; the model calls get the source embedding."""
    from lit_vce.classifiers import load_classifier
    from lit_vce.data.world import ShapesWorld
    from lit_vce.methods import ClassifierGuidance

    items = [ShapesWorld("balanced", "test", 16)[i] for i in range(16)]
    x = torch.stack([it["image"] for it in items])
    src = torch.tensor([it["label"] for it in items])
    tgt = (src + 1) % 4
    ids = [it["sample_id"] for it in items]
    oracle = load_classifier("oracle")
    kept = {}
    for cond in ("source", "target"):
        m = ClassifierGuidance(scale=0.0, sampler="ddpm", num_steps=50, skip=0.2, conditioning=cond)
        batch = VCEBatch(x, src, tgt, ids, sample_rngs(0, ids))
        c, u = m._conditions(batch)
        assert torch.equal(c, m.diffusion.condition(src if cond == "source" else tgt)) and u is None
        with torch.no_grad():
            out = m.generate(batch, oracle).images
            kept[cond] = (oracle(out).argmax(1) == src).float().mean().item()
    assert kept["source"] > kept["target"] + 0.3, kept
    with pytest.raises(ValueError, match="'source'"):
        ClassifierGuidance(conditioning="nope")
