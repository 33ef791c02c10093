"""The one per-batch path: ``lit-vce predict`` (:meth:`VCEModule.predict_step
<lit_vce.lightning.module.VCEModule.predict_step>`) and :func:`lit_vce.explain` both turn a
:class:`~lit_vce.methods.base.VCEBatch` into counterfactuals and per-sample rows here, so
the two give the same bytes and count the same way."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .methods.base import CounterfactualResult, VCEBatch, VCEMethod, generate_one_by_one


@contextlib.contextmanager
def deterministic_kernels(on: bool = True):
    """While active (``on``): one intra-op CPU thread and deterministic cuDNN without
    autotuning, so a sample's bytes depend neither on its batch nor on the thread count;
    the previous settings come back on exit. Yields the thread count before the pin (the
    number of samples :func:`explain_batch` may run concurrently)."""
    threads = torch.get_num_threads()
    if not on:
        yield threads
        return
    cudnn = torch.backends.cudnn
    before = (cudnn.deterministic, cudnn.benchmark)
    torch.set_num_threads(1)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)
        cudnn.deterministic, cudnn.benchmark = before


def explain_batch(
    method: VCEMethod, classifier: nn.Module, batch: VCEBatch, suite=None, deterministic: bool = False, workers: int = 1
) -> tuple[CounterfactualResult, list[dict[str, Any]]]:
    """(the method's result, one row per sample) for ``batch``.

    ``deterministic``: each sample on its own (:func:`~lit_vce.methods.base.generate_one_by_one`,
    ``workers`` at once where the method allows it), under :func:`deterministic_kernels`
    set by the caller for the whole run, and scored on its own (the metric networks'
    float rounding depends on the batch shape too: so a sample's figures are the same
    bytes in any batch and on any number of processes). The rows come from the metric suite
    (:func:`~lit_vce.metrics.accounting.score_batch`), or without one from the classifier
    alone (:func:`~lit_vce.metrics.accounting.plain_rows`): the same accounting rule, a
    failed or non-finite sample never a success."""
    from .io import quantize
    from .metrics.accounting import plain_rows, score_batch

    with torch.enable_grad():
        result = (
            generate_one_by_one(method, batch, classifier, workers)
            if deterministic
            else method.generate(batch, classifier)
        )
    if suite is not None:
        parts = [slice(i, i + 1) for i in range(len(batch))] if deterministic else [slice(None)]
        rows = []
        for sl in parts:
            rows += score_batch(
                suite,
                quantize(batch.images[sl]),
                result.images[sl],
                batch.source[sl],
                batch.target[sl],
                batch.sample_ids[sl],
                result.failure[sl],
                {k: v[sl] for k, v in result.diagnostics.items()},
            )
    else:
        rows = plain_rows(
            classifier,
            result.images.detach(),
            batch.source,
            batch.target,
            batch.sample_ids,
            result.failure,
            result.diagnostics,
        )
    return result, rows
