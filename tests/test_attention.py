"""Cross-attention control (prompt-to-prompt injection, class-token masks) and caption switching."""

import warnings

import pytest
import torch

from lit_vce.rngs import sample_rngs
from lit_vce.diffusion.attention import (
    AttentionInjection,
    AttentionRecorder,
    AttentionStore,
    find_tokens,
    token_alignment,
)
from lit_vce.diffusion import LatentDiffusion
from lit_vce.methods import DiGIN, VCEBatch
from lit_vce.methods.digin import switch_word

EOS, PAD = 2, 1


def _ids(*tokens, length=10):
    seq = [0, *tokens, EOS]
    return seq + [PAD] * (length - len(seq))


def test_token_alignment_maps_a_swapped_word_onto_the_source_word():
    src = _ids(5, 6, 7, 8)  # "a photograph of cat"
    tgt = _ids(5, 6, 7, 11, 12)  # "a photograph of <two-token word>"
    mapper, own = token_alignment(src, tgt)
    assert mapper.shape == (10, 10)
    for j in range(4):  # start token and the common prefix: one to one
        assert mapper[j, j] == 1 and mapper[:, j].sum() == 1
    assert mapper[4, 4] == 0.5 and mapper[4, 5] == 0.5  # both new tokens share the swapped token's attention
    two_to_one, _ = token_alignment(tgt, src)
    assert two_to_one[4, 4] == 1 and two_to_one[5, 4] == 1  # ... and two tokens -> one sums it
    assert torch.allclose(mapper.sum(1)[:9], torch.ones(9))  # attention mass is kept (the last pad falls off)
    assert mapper[5, 6] == 1  # end-of-text shifts by one
    assert mapper[6, 7] == 1 and mapper[8, 9] == 1  # and so does the padding
    assert not own[:10].any()  # every target token has a source here
    same, own_same = token_alignment(src, src)
    assert torch.equal(same, torch.eye(10)) and not own_same.any()
    # an inserted word has no source: it keeps its own attention
    _, own_ins = token_alignment(_ids(5, 6), _ids(5, 9, 6))
    assert own_ins.tolist().index(True) == 2 and own_ins.sum() == 1
    assert find_tokens(tgt, [11, 12]) == [4, 5] and find_tokens(tgt, [13]) == []


def test_switch_word_replaces_whole_words_in_any_case():
    assert (
        switch_word("A golf ball on the Golf Ball course", "golf ball", "baseball")
        == "A baseball on the baseball course"
    )
    assert switch_word("a catalogue", "cat", "dog") is None
    assert switch_word("a cat.", "cat", "dog") == "a dog."


def _batch(n=2, offset=1, captions=None):
    from lit_vce.data.world import ShapesWorld

    d = ShapesWorld("balanced", "test", n)
    items = [d[i] for i in range(n)]
    ids = [it["sample_id"] for it in items]
    y = torch.tensor([it["label"] for it in items])
    return VCEBatch(
        torch.stack([it["image"] for it in items]), y, (y + offset) % 4, ids, sample_rngs(0, ids), captions=captions
    )


def test_the_controlled_processor_is_exact_and_injection_replaces_only_the_conditional_half(tiny_sd):
    bb = LatentDiffusion(str(tiny_sd[0]), num_steps=4)
    torch.manual_seed(1)
    z = torch.randn(2, 4, 16, 16)
    c = bb.condition(["a photograph of a cat", "a photograph of a dog"])
    u = bb.null_condition(2)
    store = AttentionStore()
    rec = AttentionRecorder(2, store, 0, True)
    torch.testing.assert_close(
        bb.eps(z, bb.timesteps[0], c, u, control=rec), bb.eps(z, bb.timesteps[0], c, u), rtol=0, atol=1e-5
    )
    assert len(store.maps[0]) == 4  # the tiny UNet's 4 cross-attention layers
    maps = {r: store.token_maps(r) for r in store.token_sums}
    assert all(m.shape == (2, 77, r, r) for r, m in maps.items()) and sum(store.token_counts.values()) == 4
    torch.testing.assert_close(
        maps[min(maps)].sum(1), torch.ones(2, min(maps), min(maps))
    )  # head-averaged softmax rows
    assert store.token_maps(1000).shape[-1] == max(maps)  # the closest recorded resolution
    # inject the maps of the "cat/dog" prompts into "zebra" prompts for sample 0 only
    seen = {}

    class Spy(AttentionInjection):
        def __call__(self, layer, probs):
            out = super().__call__(layer, probs)
            seen.setdefault(layer, (probs.detach().clone(), out.detach().clone()))
            return out

    c2 = bb.condition(["a photograph of a zebra"] * 2)
    eye = torch.eye(77).expand(2, 77, 77)
    spy = Spy(store.maps[0], eye, torch.zeros(2, 77, dtype=torch.bool), torch.tensor([True, False]))
    bb.eps(z, bb.timesteps[0], c2, u, control=spy)
    for layer, (before, after) in seen.items():
        torch.testing.assert_close(after[0], store.maps[0][layer][0])  # injected: the recorded map
        torch.testing.assert_close(after[1], before[1])  # inactive sample: its own map
        torch.testing.assert_close(after[2:], before[2:])  # unconditional half untouched
        assert (before[0] - after[0]).abs().max() > 1e-4
    # sliced attention (installed before or after) still reaches the control
    sliced = LatentDiffusion(str(tiny_sd[0]), num_steps=4, attention_slicing=True)
    sliced.unet.set_attention_slice(1)
    store2 = AttentionStore()
    out = sliced.eps(z, sliced.timesteps[0], c, u, control=AttentionRecorder(2, store2, 0, True))
    torch.testing.assert_close(out, bb.eps(z, bb.timesteps[0], c, u), rtol=0, atol=1e-5)
    assert len(store2.maps[0]) == 4
    with pytest.raises(ValueError, match="no cross-attention"):
        from lit_vce.diffusion import PixelDiffusion

        PixelDiffusion("world", num_steps=4, guidance_scale=3.0).eps(
            torch.zeros(1, 3, 32, 32), 0, torch.zeros(1, 8), control=rec
        )


def _reconstruction(m, b, clf):
    bb = m.diffusion
    src, _, _ = m.prompts(b, clf)
    cond = bb.condition(src)
    _, inv = m.invert(b.images, cond)
    with torch.no_grad():
        z = inv.latents[0]
        for i in range(bb.num_steps):
            z, x0 = bb.step(bb.eps(z, bb.timesteps[i], cond, inv.uncond[i]), bb.timesteps[i], z)
    return bb.decode(x0)


def test_attention_injection_keeps_what_it_should(tiny_sd):
    folder, clf = tiny_sd
    bb = LatentDiffusion(str(folder), num_steps=4)
    kw = dict(num_steps=4, outer_steps=0, null_text_steps=2, num_cutouts=1, blend_fractions=(0.0,), mask_source="none")
    # the same prompt, maps injected at every step: exactly the reconstruction (a step misaligned would show)
    same = DiGIN(bb, injection_fractions=(1.0,), **kw)
    b = _batch(offset=0)
    out = same.generate(b, clf).images
    torch.testing.assert_close(out, _reconstruction(same, _batch(offset=0), clf), rtol=0, atol=1e-5)
    # a switched prompt: the injected maps carry the layout, so the edit stays closer to the
    # reconstruction. Random init gives near-uniform attention (maps that carry nothing):
    # sharper keys make the tiny model's cross-attention informative, as a trained model's is.
    for name, mod in bb.unet.named_modules():
        if name.endswith("attn2"):
            mod.to_k.weight.data *= 20
    rec = _reconstruction(same, _batch(), clf)
    dist = {}
    for frac in (0.0, 0.5, 1.0):
        img = DiGIN(bb, injection_fractions=(frac,), **kw).generate(_batch(), clf).images
        dist[frac] = float((img - rec).abs().mean())
    assert dist[1.0] < 0.7 * dist[0.0] and dist[0.5] < 0.7 * dist[0.0], dist


def test_digin_on_a_text_model_uses_captions_and_attention_masks(tiny_sd):
    folder, clf = tiny_sd
    bb = LatentDiffusion(str(folder), num_steps=4)
    m = DiGIN(
        bb,
        num_steps=4,
        outer_steps=1,
        null_text_steps=1,
        num_cutouts=1,
        injection_fractions=(0.5,),
        blend_fractions=(0.0, 0.5),
        mask_threshold=0.9,
    )
    names = clf.class_names
    b = _batch()
    s_name, t_name = names[int(b.source[0])], names[int(b.target[0])]
    b.captions = [f"a zebra and the {s_name.upper()}", "a cat"]
    src, tgt, used = m.prompts(b, clf)
    assert src[0] == f"a zebra and the {s_name.upper()}" and tgt[0] == f"a zebra and the {t_name}"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = m.generate(b, clf)
    assert any("do not name their class" in str(x.message) for x in w)
    assert r.diagnostics["caption_used"].tolist() == [1.0, 0.0]
    frac = r.diagnostics["mask_fraction"]
    assert ((frac > 0) & (frac < 1)).all(), frac  # a thresholded attention mask, neither empty nor everything
    assert torch.isfinite(r.images).all()
    with pytest.raises(ValueError, match="no foreground masks"):
        DiGIN(bb, num_steps=4, outer_steps=0, mask_source="batch").generate(_batch(), clf)
    with pytest.raises(ValueError, match="cross-attention"):
        DiGIN("world", num_steps=4, injection="attention")


def test_image_folder_captions_reach_the_batch(tmp_path):
    from PIL import Image

    from lit_vce.data import VCEDataModule
    from lit_vce.data.datamodule import collate

    for cls in ("cat", "dog"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "img" / cls / "a.png")
    (tmp_path / "captions.csv").write_text("file,caption\ncat/a.png,a red cat on a mat\n")
    (tmp_path / "masks" / "cat").mkdir(parents=True)
    m = Image.new("L", (40, 40), 0)
    m.paste(255, (0, 0, 20, 40))  # left half is the object
    m.save(tmp_path / "masks" / "cat" / "a.png")
    dm = VCEDataModule(
        "imagefolder",
        root=str(tmp_path / "img"),
        image_size=32,
        protocol="next",
        captions=str(tmp_path / "captions.csv"),
        masks=str(tmp_path / "masks"),
    )
    dm.setup()
    batch = collate([dm.dataset[i] for i in range(len(dm.dataset))])
    assert batch["caption"] == ["a red cat on a mat", ""]
    mask = batch["mask"][0, 0]
    assert mask.shape == (32, 32) and mask[:, :16].all() and mask[:, 16:].sum() == 0
    assert (
        batch["error"][0] == "" and "no usable foreground mask" in batch["error"][1]
    )  # dog has none: that sample fails
    (tmp_path / "masks" / "dog").mkdir()
    Image.new("L", (20, 20), 255).save(tmp_path / "masks" / "dog" / "a.png")
    assert "differs from the image" in dm.dataset[1]["error"]
    (tmp_path / "bad.csv").write_text("path,text\ncat/a.png,x\n")
    with pytest.raises(ValueError, match="lacks column"):
        VCEDataModule("imagefolder", root=str(tmp_path / "img"), captions=str(tmp_path / "bad.csv")).setup()
    with pytest.raises(ValueError, match="imagefolder. only"):
        VCEDataModule("world", captions=str(tmp_path / "captions.csv"))
