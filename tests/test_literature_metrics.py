"""The literature's metrics (issue 25, part 1), each pinned by hand-built cases against
the official formula: MNAC and CD as ACE's compute_MNAC.py / compute_CD.py compute them,
COUT over correctly classified originals (compute_COUT.py), per-value L1 (ACE's and
DiME's main.py), and MNAC/CD on the world's ground truth."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lit_vce.metrics.literature import (
    MNAC,
    CorrelationDifference,
    attribute_changes,
    correlation_difference,
    world_changes,
    world_readings,
    world_target_deltas,
)


def _ace_cd(cl_pred: np.ndarray, cf_pred: np.ndarray, query: int, corrs: np.ndarray) -> float:
    """ACE's compute_CorrMetric (diff=True, remove_unchanged_oracle=False) and its final sum, restated."""
    delta_query = cf_pred[:, query] - cl_pred[:, query]
    deltas = cf_pred - cl_pred
    ours = np.zeros(deltas.shape[1])
    for i in range(deltas.shape[1]):
        with np.errstate(invalid="ignore", divide="ignore"):
            cc = np.corrcoef(deltas[:, i], delta_query)
        ours[i] = 0 if np.any(np.isnan(cc)) else cc[0, 1]
    return float(np.sum(np.abs(ours - corrs)))


def test_mnac_counts_changed_decisions_over_successful_counterfactuals():
    before = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.1, 0.1], [0.7, 0.8, 0.4], [0.2, 0.9, 0.9]]) > 0.5
    after = torch.tensor([[0.1, 0.2, 0.6], [0.9, 0.9, 0.9], [0.7, 0.8, 0.4], [0.8, 0.1, 0.1]]) > 0.5
    changes = attribute_changes(before, after)
    assert changes.tolist() == [1, 3, 0, 3]
    m = MNAC()
    m.update(changes, torch.tensor([True, True, True, False]))  # ACE reads the successful counterfactuals only
    assert float(m.compute()) == pytest.approx((1 + 3 + 0) / 3)
    # a one-hot block (a categorical attribute) counts once
    assert attribute_changes(before, after, groups=[[0, 1], [2]]).tolist() == [1, 2, 0, 2]


def test_cd_equals_aces_formula_and_is_exact_when_split_across_processes():
    rng = np.random.default_rng(0)
    cl = (rng.random((40, 6)) > 0.5).astype(float)
    cf = cl.copy()
    flip = rng.random((40, 6)) > 0.7
    cf[flip] = 1 - cf[flip]
    cf[:, 5] = cl[:, 5]  # an attribute that never changes: ACE's NaN -> 0
    corrs = rng.uniform(-1, 1, 6)
    corrs[2] = 1.0  # the query's correlation with itself
    expected = _ace_cd(cl, cf, 2, corrs)
    d = torch.tensor(cf - cl)
    assert float(correlation_difference(d, d[:, 2], torch.tensor(corrs))) == pytest.approx(expected, abs=1e-12)
    whole = CorrelationDifference(torch.tensor(corrs))
    whole.update(d, d[:, 2], torch.ones(40, dtype=torch.bool))
    a, b = CorrelationDifference(torch.tensor(corrs)), CorrelationDifference(torch.tensor(corrs))
    a.update(d[:17], d[:17, 2], torch.ones(17, dtype=torch.bool))
    b.update(d[17:], d[17:, 2], torch.ones(23, dtype=torch.bool))
    a.merge_state(b)  # what the DDP sum of states does
    assert float(a.compute()) == pytest.approx(expected, abs=1e-12) and float(whole.compute()) == pytest.approx(
        expected, abs=1e-12
    )
    # only successful counterfactuals count
    ok = torch.tensor(rng.random(40) > 0.3)
    part = CorrelationDifference(torch.tensor(corrs))
    part.update(d, d[:, 2], ok)
    keep = ok.numpy()
    assert float(part.compute()) == pytest.approx(_ace_cd(cl[keep], cf[keep], 2, corrs), abs=1e-12)


@pytest.fixture(scope="module")
def oracle():
    from lit_vce.world.models import load_world_network

    return load_world_network("oracle").eval()


def _render(shape, bg, seed=3):
    from lit_vce.data.world import render

    s = render(shape, bg, np.random.default_rng(seed))
    return torch.from_numpy(s.image).permute(2, 0, 1)[None].float()


def test_on_the_world_a_background_only_edit_changes_exactly_one_attribute(oracle):
    """Ground truth: the same shape (same colour, size and place) on another background."""
    orig = _render(0, 0)
    cases = {
        "background only": (_render(0, 2), 1, [0, 1, 0]),
        "shape only": (_render(2, 0), 1, [1, 0, 0]),
        "both": (_render(2, 2), 2, [1, 1, 0]),
        "none": (orig.clone(), 0, [0, 0, 0]),
    }
    before = world_readings(oracle, orig)
    assert before.tolist() == [[0, 0, -1]]
    for name, (cf, n_changed, deltas) in cases.items():
        after = world_readings(oracle, cf)
        assert world_changes(before, after).tolist() == [n_changed], name
        assert world_target_deltas(before, after, torch.tensor([2])).tolist() == [deltas], name


def test_the_suite_reports_mnac_cd_per_value_l1_and_cout_over_correct_originals(oracle):
    from lit_vce.classifiers import load_classifier
    from lit_vce.metrics.literature import world_dataset_correlations
    from lit_vce.metrics.build import build_suite

    clf = load_classifier("biased")
    suite = build_suite(clf, fid_features="none", world_audit=True, interval_resamples=200)
    origs = torch.cat([_render(0, 0, s) for s in range(6)])
    # background-only edits towards class 2 (biased reads backgrounds: they flip it)
    cfs = torch.cat([_render(0, 2, s) for s in range(6)])
    src, tgt = torch.zeros(6, dtype=torch.long), torch.full((6,), 2)
    rows = suite.update(origs, cfs, src, tgt, [f"s{i}" for i in range(6)])
    m, audit, n = suite.compute()
    ok = [r for r in rows if r["success"]]
    assert ok and all(r["attributes_changed"] == 1 for r in ok)
    assert m["mnac"] == pytest.approx(1.0)
    # CD against biased's training correlations: the background always changed with... nothing (the shape stayed)
    corr = torch.tensor(world_dataset_correlations("biased"))
    assert corr[1] > 0.9  # the planted shortcut, in the data
    d = torch.tensor([[0.0, 1.0, 0.0]] * len(ok))
    assert m["cd"] == pytest.approx(float(correlation_difference(d, d[:, 0], corr)))
    # ACE's per-value L1 and COUT over correctly classified originals
    l1 = [(o - c).abs().view(-1).mean().item() for o, c in zip(origs, cfs)]
    assert [r["l1_per_value"] for r in rows] == pytest.approx(l1, abs=1e-6)
    assert m["l1_per_value"] == pytest.approx(np.mean(l1))
    correct = [r for r in rows if r["pred_before"] == r["source"]]
    if correct:
        assert m["cout_source_correct"] == pytest.approx(np.mean([r["cout"] for r in correct]), abs=1e-6)
    else:
        assert np.isnan(m["cout_source_correct"])
    assert "mnac" in suite.last_intervals and "cd" in suite.last_intervals


# --- S3 and FVA / FS -------------------------------------------------------------------
class _AceSimSiam(torch.nn.Module):
    """ACE's eval_utils/simsiam.py SimSiam, restated: encoder = ResNet-50 with the 3-layer projector."""

    def __init__(self):
        super().__init__()
        import torchvision
        from torch import nn

        self.encoder = torchvision.models.resnet50(num_classes=2048, zero_init_residual=True)
        prev = self.encoder.fc.weight.shape[1]
        self.encoder.fc = nn.Sequential(
            nn.Linear(prev, prev, bias=False),
            nn.BatchNorm1d(prev),
            nn.ReLU(inplace=True),
            nn.Linear(prev, prev, bias=False),
            nn.BatchNorm1d(prev),
            nn.ReLU(inplace=True),
            self.encoder.fc,
            nn.BatchNorm1d(2048, affine=False),
        )
        self.predictor = nn.Sequential(
            nn.Linear(2048, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, 2048)
        )

    def forward(self, x1, x2):  # as ACE's: the cosine of the encoder's outputs
        return torch.nn.functional.cosine_similarity(self.encoder(x1), self.encoder(x2), dim=1)


def test_s3_loads_simsiams_checkpoint_and_equals_aces_similarity(tmp_path, monkeypatch):
    from lit_vce.errors import MissingWeightsError
    from lit_vce.metrics.embeddings import S3, cosine_similarity, load_simsiam

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match="checkpoint_0099.pth.tar"):
        load_simsiam()
    torch.manual_seed(0)
    ref = _AceSimSiam()
    for m in ref.modules():  # random running statistics, so eval-mode BatchNorm does something
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ref.eval()
    path = tmp_path / "simsiam" / "checkpoint_0099.pth.tar"
    path.parent.mkdir()
    torch.save({"epoch": 100, "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    enc = load_simsiam()
    x, y = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    norm = lambda t: (  # noqa: E731
        (t - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    )  # noqa: E731
    with torch.no_grad():
        expected = ref(norm(x), norm(y))
    got = cosine_similarity(enc, x, y)
    assert torch.allclose(got.float(), expected, atol=1e-5)
    assert torch.allclose(cosine_similarity(enc, x, x), torch.ones(3, dtype=torch.float64), atol=1e-6)
    s3 = S3()
    s3.update(got, torch.tensor([True, False, True]))  # ACE: the correctly classified originals
    assert float(s3.compute()) == pytest.approx(float(got[[0, 2]].mean()))


def test_fva_and_fs_follow_aces_preprocessing_threshold_and_successful_subset(tmp_path, monkeypatch):
    import pickle

    from lit_vce.errors import MissingWeightsError
    from lit_vce.metrics.embeddings import FaceVerification, VGGFace2ResNet50, load_vggface2

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path))
    net = VGGFace2ResNet50()
    # the Caffe layout of ACE's resnet50_facevgg2_FVA.py: stride in the first 1x1 convolution, ceil-mode max-pool
    assert net.net.layer2[0].conv1.stride == (2, 2) and net.net.layer2[0].conv2.stride == (1, 1)
    assert net.net.maxpool.ceil_mode and net.net.maxpool.padding == 0
    feats = {}
    net.net.layer4.register_forward_hook(lambda m, i, o: feats.update(layer4=o.shape))  # returns None: output kept
    assert net(torch.rand(1, 3, 128, 128)).shape == (1, 2048) and feats["layer4"][-2:] == (7, 7)  # 224 px -> 7x7
    # preprocessing: 0-255 BGR minus the mean, as ACE's CFDataset
    white = torch.ones(1, 3, 224, 224)
    assert net.preprocess(white)[0, :, 0, 0].tolist() == pytest.approx([255 - 91.4953, 255 - 103.8827, 255 - 131.0912])
    red = torch.zeros(1, 3, 224, 224)
    red[:, 0] = 1
    assert net.preprocess(red)[0, :, 0, 0].tolist() == pytest.approx([-91.4953, -103.8827, 255 - 131.0912])  # B, G, R
    # the weights pickle: numpy arrays under the state dict's names
    path = tmp_path / "vggface2" / "resnet50_ft_weight.pkl"
    path.parent.mkdir()
    torch.manual_seed(1)
    ref = VGGFace2ResNet50()
    arrays = {k: v.numpy() for k, v in ref.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    arrays["fc.weight"] = np.zeros((8631, 2048), np.float32)  # the classifier, dropped
    path.write_bytes(pickle.dumps(arrays))
    loaded = load_vggface2()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(loaded(x), ref.eval()(x), atol=1e-5)
    # a pickle that would run code is refused
    path.write_bytes(pickle.dumps({"x": print}))
    with pytest.raises(MissingWeightsError, match="refusing to load"):
        load_vggface2()
    fv = FaceVerification()
    fv.update(torch.tensor([0.9, 0.4, 0.6, 0.1], dtype=torch.float64), torch.tensor([True, True, True, False]))
    out = fv.compute()
    assert out["fva"] == pytest.approx(2 / 3) and out["fs"] == pytest.approx((0.9 + 0.4 + 0.6) / 3)


def test_the_suite_computes_s3_when_asked_and_refuses_it_without_weights(tmp_path, monkeypatch):
    from lit_vce.classifiers import load_classifier
    from lit_vce.errors import MissingWeightsError
    from lit_vce.metrics.build import build_suite

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    clf = load_classifier("biased")
    assert build_suite(clf, fid_features="none").s3 is None  # auto: no weights, no S3
    with pytest.raises(MissingWeightsError, match="simsiam"):
        build_suite(clf, fid_features="none", s3="on")
    path = tmp_path / "simsiam" / "checkpoint_0099.pth.tar"
    path.parent.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in _AceSimSiam().state_dict().items()}}, path)
    suite = build_suite(clf, fid_features="none", interval_resamples=100)
    origs = torch.cat([_render(s % 4, s % 4, s) for s in range(6)])
    rows = suite.update(
        origs,
        origs.flip(-1),
        torch.tensor([s % 4 for s in range(6)]),
        torch.tensor([(s + 1) % 4 for s in range(6)]),
        [f"s{i}" for i in range(6)],
    )
    m, _, _ = suite.compute()
    correct = [r["s3"] for r in rows if r["pred_before"] == r["source"]]
    assert correct and m["s3"] == pytest.approx(np.mean(correct), abs=1e-6) and "s3" in suite.last_intervals


# --- sigma_L: diversity across seeds -------------------------------------------------------
def test_sigma_l_is_the_mean_pairwise_lpips_vgg_of_each_samples_counterfactuals(tmp_path, monkeypatch, capsys):
    """DiME's and ACE's compute_LPIPS.py: per sample the mean LPIPS-VGG over the pairs of runs,
    then the mean over samples; a sample that failed in one run is left out (and counted)."""
    import json

    from torchmetrics.functional.image.lpips import _LPIPS

    import lit_vce.metrics.lpips as lp
    from lit_vce.cli import main
    from lit_vce.errors import MissingWeightsError
    from lit_vce.io import load_png, sample_key

    monkeypatch.setenv("LIT_VCE_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not lp.lpips_available(net="vgg")
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth"):
        lp.build_lpips(net="vgg")
    torch.manual_seed(0)
    net = _LPIPS(
        pretrained=True, net="vgg", pnet_rand=True
    ).eval()  # the real heads on a random VGG-16 (no 528 MB file)
    monkeypatch.setattr(lp, "_lpips_net", lambda n="alex": lp.LPIPSDistance(net) if n == "vgg" else None)
    (tmp_path / "w" / "lpips" / "checkpoints").mkdir(parents=True)
    (tmp_path / "w" / "lpips" / "checkpoints" / "vgg16-397923af.pth").write_bytes(b"found")
    assert lp.lpips_available(net="vgg")
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "world" / "classifier_guidance.yaml")
    runs = []
    for seed in (0, 1, 2):
        out = tmp_path / f"seed{seed}"
        main(
            [
                "predict",
                "--config",
                cfg,
                "--model.method.init_args.num_steps",
                "4",
                "--data.num_samples",
                "4",
                "--data.batch_size",
                "4",
                "--model.seed",
                str(seed),
                "--model.second_classifier",
                "null",
                "--writer.output_dir",
                str(out),
            ]
        )
        runs.append(out)
    # one sample fails in the last run: left out of sigma_L
    rec = sorted((runs[2] / "samples").glob("*.json"))[0]
    row = json.loads(rec.read_text())
    row["failure"], row["success"] = "injected", False
    rec.write_text(json.dumps(row))
    main(["evaluate", str(runs[2]), "--fid-interval-resamples", "0"])
    capsys.readouterr()
    main(["diversity", *map(str, runs), "--json", str(tmp_path / "div.json")])
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "div.json").read_text())
    assert res["n_runs"] == 3 and res["n_samples"] == 3 and res["n_excluded"] == 1 and "sigma_L (vgg)" in printed
    expected = []
    for sid in sorted(res["per_sample"], key=sample_key):
        imgs = [load_png(r / "counterfactuals" / f"{sample_key(sid)}.png")[None] for r in runs]
        with torch.no_grad():
            pairs = [float(net(imgs[i] * 2 - 1, imgs[j] * 2 - 1).squeeze()) for i, j in ((0, 1), (0, 2), (1, 2))]
        expected.append(sum(pairs) / 3)
        assert res["per_sample"][sid] == pytest.approx(expected[-1], rel=1e-5)
    assert res["sigma_l"] == pytest.approx(np.mean(expected), rel=1e-5) and res["sigma_l"] > 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["diversity", str(runs[0])])
    assert e.value.code == 2 and "at least two runs" in capsys.readouterr().err


# --- fidelity: DiME's and FastDiME's start noise ------------------------------------------
@pytest.mark.parametrize("name, offset", [("dime", 1), ("fastdime", 1), ("classifier_guidance", 0)])
def test_dime_and_fastdime_noise_one_step_above_the_first_guided_step_as_their_code(name, offset, monkeypatch):
    """The official code: z = q_sample(x, start_step), then the loop guides start_step - 1 ... 0."""
    from lit_vce.api import load_method
    from lit_vce.classifiers import load_classifier
    from lit_vce.testing import world_batch

    kwargs = {"sampler": "adm"} if name == "classifier_guidance" else {}
    m = load_method(
        name, num_steps=10, skip=0.7, **({"scales": (8.0,)} if name != "classifier_guidance" else {}), **kwargs
    )
    d = m.diffusion
    seen = {}
    real_noise, real_pmv = d.add_noise, d.p_mean_variance
    monkeypatch.setattr(d, "add_noise", lambda z, n, t: (seen.setdefault("noise", int(t)), real_noise(z, n, t))[1])
    monkeypatch.setattr(
        d, "p_mean_variance", lambda out, z, t: (seen.setdefault("first", int(t)), real_pmv(out, z, t))[1]
    )
    m.generate(world_batch(1), load_classifier("robust"))
    first = int(d.timesteps[m.start_index()])
    assert seen["first"] == first and seen["noise"] == int(d.timesteps[m.start_index() - offset])
    assert m.describe()["noise_offset"] == offset
    if offset:
        assert (
            seen["noise"] == first + 1
        )  # the respaced index above: 'start_step' where the loop starts at start_step - 1


def test_cd_of_fewer_than_two_successes_has_no_interval():
    from lit_vce.metrics.literature import cd_interval

    d = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    ok = torch.tensor([1.0, 0.0, 0.0])
    assert all(np.isnan(cd_interval(d, ok, torch.tensor([1.0, 0.9, 0.0]), 50, 0, 0.95)))
    lo, hi = cd_interval(d, torch.ones(3), torch.tensor([1.0, 0.9, 0.0]), 50, 0, 0.95)
    assert np.isfinite(lo) and lo <= hi
