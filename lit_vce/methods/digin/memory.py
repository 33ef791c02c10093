"""DiG-IN's memory: gradient checkpointing planned from measured activations, mixed
precision, and the checkpointed classifier."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from ...objectives import ObjectiveContext
from .optimise import fit


def saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the tensors autograd saves while ``fn()`` runs (each storage once;
    ``exclude``: storages not counted, e.g. the frozen weights)."""
    seen: set[int] = set()
    total = 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen and ptr not in exclude:
            seen.add(ptr)
            total += storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def checkpointed(classifier: nn.Module, on: bool):
    """``classifier``, or a callable that checkpoints each of its calls under autograd."""
    if not on:
        return classifier

    def clf(x, _c=classifier):
        return _checkpoint(_c, x, use_reentrant=False) if torch.is_grad_enabled() else _c(x)

    clf.num_classes = getattr(classifier, "num_classes", None)
    return clf


class MemoryMixin:
    """:class:`~lit_vce.methods.digin.DiGIN`'s checkpoint planning and precision (a mixin of the method)."""

    def budget_bytes(self, device: torch.device) -> float:
        """The activation memory ``"auto"`` checkpointing may use."""
        if self.memory.budget_gb is not None:
            return float(self.memory.budget_gb) * 2**30
        if device.type == "cuda":
            return 0.9 * torch.cuda.mem_get_info(device)[0]
        try:
            return 0.5 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return float("inf")

    def checkpoint_plan(
        self, z: torch.Tensor, cond_tgt, uncond, ctx: ObjectiveContext, classifier: nn.Module
    ) -> tuple[int | None, bool]:
        """(UNet calls to checkpoint (``None``: every one, by the diffusion model's setting),
        whether to checkpoint the loss) for the optimised trajectory. ``"auto"``: the
        activations of one UNet call (``u``) and one loss evaluation (``d``) are measured
        once per batch shape; with ``S`` steps and ``k`` loss steps nothing is
        checkpointed when ``S*u + k*d`` fits the budget, else the loss (one x0-prediction
        at a time) and the first ``S - floor((budget - d) / u)`` UNet calls. ``ctx`` must
        draw its views from copies of the batch's generators (the probe draws views)."""
        mode = self.memory.gradient_checkpointing
        if mode is True:
            return None, True
        if mode is False or self.optimisation.outer_steps == 0:
            return 0, False
        bb = self.diffusion
        key = (
            tuple(z.shape),
            tuple(ctx.original.shape),
            str(z.dtype),
            self.memory.autocast,
            self.optimisation.num_cutouts,
        )
        if key not in self._activation_bytes:
            frozen = {p.untyped_storage().data_ptr() for m in (bb, classifier) for p in m.parameters()}
            leaf = z.detach().clone().requires_grad_(True)
            with self.autocast_context(z.device):
                u = saved_bytes(lambda: bb.eps(leaf, bb.timesteps[-1], cond_tgt, uncond[-1], checkpoint=False), frozen)
                ctx.latents = leaf
                d = saved_bytes(
                    lambda: self.objective(fit(bb.decode_checkpointed(leaf, False), ctx.original), ctx), frozen
                )
            self._activation_bytes[key] = (u, d)
        u, d = self._activation_bytes[key]
        budget = self.budget_bytes(z.device)
        if self.num_steps * u + self.optimisation.loss_steps * d <= budget:
            return 0, False
        fits = max(0, int((budget - d) // max(u, 1)))
        return max(0, self.num_steps - fits), True

    def autocast_context(self, device: torch.device):
        """Mixed precision as ``memory.autocast`` says (a null context for ``None``)."""
        if self.memory.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, self.memory.autocast))
