"""Every classifier family, built offline with random weights saved where its loader looks."""

import pytest
import torch

from lit_vce.classifiers import ImageClassifier, load_classifier
from lit_vce.errors import MissingWeightsError
from lit_vce.world.models import SmallCNN


def _grad_reaches_input(clf, size):
    x = torch.rand(2, 3, size, size, requires_grad=True)
    logits = clf(x)
    logits[:, 0].sum().backward()
    return logits, x.grad


def test_wrapper_resizes_any_input_and_passes_gradients():
    clf = ImageClassifier(SmallCNN(width=8), 32, list("abcd"), mean=[0.5] * 3, std=[0.5] * 3, resize_size=36)
    x = torch.rand(2, 3, 50, 70, requires_grad=True)
    out = clf(x)
    assert out.shape == (2, 4)
    out.sum().backward()
    assert x.grad.abs().sum() > 0
    assert clf.preprocess(torch.rand(1, 3, 50, 70)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, H, W\), got \(2, 1, 32, 32\)"):
        clf(torch.rand(2, 1, 32, 32))


def test_world_models_load_by_name():
    for name in ("biased", "robust", "oracle", "watermarked"):
        clf = load_classifier(name)
        assert clf.num_classes == 4 and clf.input_size == 32
        logits, g = _grad_reaches_input(clf, 32)
        assert logits.shape == (2, 4) and g.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown classifier .nope."):
        load_classifier("world:nope")


def test_missing_world_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_VCE_WORLD_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="robust.safetensors"):
        load_classifier("robust")


def test_timm_loads_local_weights_offline(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path))
    name = "mobilenetv3_small_050"
    with pytest.raises(MissingWeightsError, match=f"timm/{name}.safetensors"):
        load_classifier(f"timm:{name}")
    ref = timm.create_model(name, pretrained=False).eval()
    (tmp_path / "timm").mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "timm" / f"{name}.safetensors"))
    clf = load_classifier(f"timm:{name}")
    assert clf.num_classes == 1000 and clf.input_size == 224
    logits, g = _grad_reaches_input(clf, 224)
    assert logits.shape == (2, 1000) and g.abs().sum() > 0
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(clf(x), ref(clf.preprocess(x)), atol=1e-5)


def test_robustbench_loads_local_checkpoint_offline(tmp_path):
    from lit_vce.classifiers.loaders import _import_robustbench

    _import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    name = "Salman2020Do_R18"
    with pytest.raises(MissingWeightsError, match=f"imagenet/Linf/{name}.pt"):
        load_classifier(f"robustbench:{name}", model_dir=str(tmp_path))
    arch = model_dicts[BenchmarkDataset.imagenet][ThreatModel.Linf][name]["model"]()
    # robustbench checkpoints hold the bare network; the loader adds the normaliser prefix
    state = {k[len("model.") :]: v for k, v in arch.state_dict().items() if k.startswith("model.")}
    path = tmp_path / "imagenet" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    clf = load_classifier(f"robustbench:{name}", model_dir=str(tmp_path))
    logits, g = _grad_reaches_input(clf, 96)
    assert logits.shape == (2, 1000) and g.abs().sum() > 0
    assert torch.equal(clf.model.model.conv1.weight, arch.model.conv1.weight)


def test_openclip_zero_shot_classifier_offline(tmp_path):
    import open_clip

    kw = dict(
        embed_dim=16,
        vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    model = open_clip.create_model("ViT-B-32", pretrained=None, **kw)
    path = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    clf = load_classifier(
        f"openclip:ViT-B-32/{path}",
        class_names=["cat", "dog", "zebra"],
        templates=[lambda c: f"a photo of a {c}."],
        model_kwargs=kw,
    )
    assert clf.num_classes == 3 and clf.input_size == 32
    logits, g = _grad_reaches_input(clf, 48)
    assert logits.shape == (2, 3) and g.abs().sum() > 0
    with pytest.raises(MissingWeightsError, match=r"checkpoint .*absent\.pt does not exist"):
        load_classifier(f"openclip:ViT-B-32/{tmp_path / 'absent.pt'}", model_kwargs=kw)


def test_local_checkpoint_file(tmp_path):
    net = SmallCNN(num_outputs=3, width=8).eval()
    path = tmp_path / "net.pt"
    torch.save(net, path)
    clf = load_classifier(str(path), input_size=32, class_names=["x", "y", "z"], mean=None, std=None)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(clf(x), net(x))
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_classifier(str(tmp_path / "missing.pt"))


def test_torchscript_checkpoint_loads_and_guides(tmp_path):
    net = SmallCNN(num_outputs=3, width=8).eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(net).save(str(path))
    clf = load_classifier(str(path), input_size=32, mean=None, std=None)  # no class names: counted from the output
    assert clf.class_names == ["0", "1", "2"]
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = clf(x)
    assert torch.allclose(out, net(x), atol=1e-5)
    out[:, 1].sum().backward()  # gradients reach the input (guidance works through a scripted model)
    assert x.grad.abs().sum() > 0


def test_a_classifier_given_as_a_mapping_with_arguments(tmp_path):
    from lit_vce.classifiers.loaders import classifier_class_names

    net = SmallCNN(num_outputs=3, width=8).eval()
    torch.save(net, tmp_path / "net.pt")
    spec = {
        "spec": str(tmp_path / "net.pt"),
        "input_size": 32,
        "class_names": ["x", "y", "z"],
        "mean": None,
        "std": None,
    }
    clf = load_classifier(spec)
    assert clf.class_names == ["x", "y", "z"] and clf.input_size == 32
    assert classifier_class_names(spec) == ["x", "y", "z"] and classifier_class_names("robust")[0] == "circle"
    assert classifier_class_names({"spec": "timm:resnet50"})[0].lower().startswith("tench")
    with pytest.raises(ValueError, match="needs a 'spec' key"):
        load_classifier({"input_size": 32})
