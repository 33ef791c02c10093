"""FastDiME against the official recipe (``get_FastDiME_iterative_sampling``), on tiny models."""

import torch
import torch.nn.functional as F

from lit_vce.methods.fastdime import FastDiME
from lit_vce.methods.guided import Step


def _step(x_t, x0, index=0, t=5, next_t=4, state=None):
    return Step(index, t, next_t, x_t, x0, torch.tensor(0.5), 10, {} if state is None else state)


def test_guidance_is_the_official_gradient_at_the_previous_x0(tiny_diffusion, tiny_classifier, tiny_batch):
    m = FastDiME(diffusion=tiny_diffusion("adm", 10), scales=(8.0,), l1_weight=0.05)
    b = tiny_batch
    torch.manual_seed(0)
    x_t = torch.randn(4, 3, 16, 16)
    prev = torch.rand(4, 3, 16, 16)
    g = m.guidance(None, b, tiny_classifier, None, None, _step(x_t, torch.rand(4, 3, 16, 16), state={"x0": prev}))
    # official: grads = d(-8 * logit_y)/dx at the previous x0 in [-1, 1] + 0.05 * d||z_t - x||_1/dz_t;
    # mean -= var * grads
    x_m = (prev * 2 - 1).requires_grad_(True)
    logit = tiny_classifier((x_m.clamp(-1, 1) + 1) / 2).gather(1, b.target[:, None]).sum()
    (d,) = torch.autograd.grad(-8.0 * logit, x_m)
    grads = d + 0.05 * torch.sign(x_t - (b.images * 2 - 1))
    torch.testing.assert_close(g, -grads, rtol=1e-4, atol=1e-6)
    # the first step uses the input image itself
    g0 = m.guidance(None, b, tiny_classifier, None, None, _step(x_t, prev))
    assert not torch.allclose(g0, g)


def test_the_self_optimised_mask_puts_the_original_back_where_the_edit_is_small(tiny_diffusion, tiny_batch):
    m = FastDiME(diffusion=tiny_diffusion("adm", 10), warmup=2, dilation=3, threshold=0.15)
    b = tiny_batch
    x0 = b.images.clone()
    x0[:, :, 4:8, 4:8] = 1 - x0[:, :, 4:8, 4:8]  # the edit: a 4x4 patch
    x0 += 0.01  # and a faint change everywhere
    x_t = torch.randn(4, 3, 16, 16)
    state = {}
    before = m.post_step(x_t.clone(), _step(x_t, x0, index=1), b, state)  # warm-up: untouched
    assert torch.equal(before, x_t) and torch.equal(state["x0"], x0)
    after = m.post_step(x_t.clone(), _step(x_t, x0, index=2), b, state)
    diff = (x0 - b.images).abs().sum(1, keepdim=True)
    keep = (F.max_pool2d(diff / diff.amax((1, 2, 3), keepdim=True), 3, 1, 1) < 0.15).float()
    assert keep[:, :, 4:8, 4:8].sum() == 0 and keep[:, :, 12:, 12:].all()
    torch.testing.assert_close(state["x0"][:, :, 12:, 12:], b.images[:, :, 12:, 12:])  # x0 masked
    torch.testing.assert_close(after[:, :, 4:8, 4:8], x_t[:, :, 4:8, 4:8])  # inside the mask: the new sample
    assert not torch.allclose(after[:, :, 12:, 12:], x_t[:, :, 12:, 12:])  # outside: the noised original
    last = m.post_step(x_t.clone(), _step(x_t, x0, index=3, next_t=None), b, {})
    torch.testing.assert_close(
        last[:, :, 12:, 12:], b.images[:, :, 12:, 12:] * 2 - 1
    )  # the final sample: the clean original


def test_failed_samples_are_retried_with_the_next_scale(tiny_diffusion, tiny_classifier, tiny_batch):
    from lit_vce.testing import tiny_batch as fresh_batch  # the same samples with fresh generators

    m = FastDiME(diffusion=tiny_diffusion("adm", 10), scales=(0.0, 1e4), warmup=100)
    unguided = FastDiME(diffusion=tiny_diffusion("adm", 10), scales=(0.0,), warmup=100).generate(
        fresh_batch(), tiny_classifier
    )
    retried = tiny_classifier(unguided.images).argmax(1) != tiny_batch.target  # what scale 0 did not flip
    assert retried.any()
    out = m.generate(tiny_batch, tiny_classifier)
    flipped = tiny_classifier(out.images).argmax(1) == tiny_batch.target
    scales = out.diagnostics["scale"]
    # exactly the samples scale 0 left unflipped were retried at the next scale; the others kept scale 0's image
    assert torch.equal(scales == 1e4, retried) and set(scales.tolist()) <= {0.0, 1e4}
    assert torch.equal(out.images[~retried], unguided.images[~retried])
    assert flipped.float().mean() > 0
