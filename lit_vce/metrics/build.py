"""``build_suite``: the metric suite of a run from config values (specs, ``auto|on|off``),
loading what each metric needs; everything that can fail fails here, before any work."""

from __future__ import annotations

from torch import nn

from .suite import VCEMetrics, check_metrics
from .uncertainty import FID_RESAMPLES, RESAMPLES


def build_suite(
    classifier: nn.Module,
    fid_features: str | nn.Module | None = "world",
    inception_weights: str | None = None,
    second_classifier: str | nn.Module | None = None,
    lpips: str = "auto",
    world_audit: bool = False,
    resolution: int | None = None,
    autoencoder: str | nn.Module | None = None,
    seed: int = 0,
    lpips_weights: str | None = None,
    metrics=None,
    interval_resamples: int = RESAMPLES,
    fid_interval_resamples: int = FID_RESAMPLES,
    s3: str = "auto",
    face_verification: str = "off",
    lpips_net: str = "alex",
    attribute_oracle: str = "off",
    attributes: dict | None = None,
) -> VCEMetrics:
    """:class:`VCEMetrics` from config values (classifier specs, ``lpips`` as ``auto|on|off``).

    Everything that can fail (missing weights, unknown names) fails here, before any work.
    ``interval_resamples`` and ``fid_interval_resamples`` are the suite's ``resamples``
    and ``fid_resamples`` (the bootstrap of the 95 % intervals). ``s3``: SimSiam
    similarity (``auto``: when its weights are present; ``on``: required), ``face_verification``:
    FVA/FS with the VGGFace2 ResNet-50 (``on``: required; faces only, so off by default).
    ``lpips_net``: ``alex`` (default) or ``vgg`` (ACE's and DiME's LPIPS). ``attribute_oracle``:
    ``celeba`` or ``celebahq`` (ACE's ``oracle.pth``, required) for MNAC and CD on CelebA's 40
    attributes; ``attributes`` (``{"query": k, "correlations": [40 floats], "cd_dataset": ...}``)
    sets the query and CD's dataset correlations now, else the caller does (``suite.pending_oracle``:
    :class:`~lit_vce.lightning.module.VCEModule` reads them from the data at predict start).
    """
    from ..classifiers import load_classifier
    from ..weights import needed
    from .lpips import build_lpips, lpips_available

    if lpips not in ("auto", "on", "off"):
        raise ValueError("lpips must be 'auto', 'on' or 'off'")
    if s3 not in ("auto", "on", "off") or face_verification not in ("on", "off"):
        raise ValueError("s3 must be 'auto', 'on' or 'off' and face_verification 'on' or 'off'")
    from ..errors import MissingWeightsError
    from .embeddings import load_simsiam, load_vggface2

    s3_encoder = None
    if s3 != "off":
        try:
            s3_encoder = load_simsiam()
        except MissingWeightsError:
            if s3 == "on":
                raise
    face_encoder = needed(load_vggface2) if face_verification == "on" else None
    sel = check_metrics(metrics)  # what is not selected is not loaded either
    lpips = lpips if "lpips" in sel else "off"
    lp = (
        needed(build_lpips, lpips_weights, net=lpips_net)
        if lpips == "on" or (lpips == "auto" and lpips_available(lpips_weights, net=lpips_net))
        else None
    )
    if attribute_oracle not in ("off", "celeba", "celebahq"):
        raise ValueError(f"attribute_oracle must be 'off', 'celeba' or 'celebahq', got {attribute_oracle!r}")
    oracle = reader = None
    if attribute_oracle != "off":
        from .oracle import OracleAttributes, load_attribute_oracle

        oracle = needed(
            load_attribute_oracle, attribute_oracle
        )  # fails here, before any work, when oracle.pth is missing
        if attributes and oracle is not None:
            reader = OracleAttributes(
                oracle, attributes["query"], attributes.get("correlations"), attributes.get("cd_dataset")
            )
    second = second_classifier if "independent" in sel else None
    second = needed(load_classifier, second) if isinstance(second, str) else second
    features = fid_features if ("fid" in sel or "sfid" in sel) else None
    # CD compares with the attribute correlations of the data the classifier learned from
    # (ACE: CelebA's training partition)
    cd_regime = {"biased": "biased", "watermarked": "watermark"}.get(getattr(classifier, "name", ""), "balanced")
    suite = VCEMetrics(
        classifier,
        features=features,
        inception_weights=inception_weights,
        second_classifier=second,
        cd_regime=cd_regime,
        lpips=lp,
        audit=world_audit,
        resolution=resolution,
        autoencoder=autoencoder if "latent" in sel else None,
        seed=seed,
        metrics=sorted(sel),
        resamples=interval_resamples,
        fid_resamples=fid_interval_resamples,
        s3_encoder=s3_encoder,
        face_encoder=face_encoder,
        attribute_oracle=reader,
    )
    suite.pending_oracle = oracle if reader is None else None
    suite.lpips_net = lpips_net if lp is not None else None
    return suite
