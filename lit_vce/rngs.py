"""Per-sample randomness: every sample's noise comes from its own generator,
seeded by (global seed, sample id), so outputs do not depend on the batch
composition, the batch size or the number of processes."""

from __future__ import annotations

import hashlib

import torch


def sample_seed(seed: int, sample_id: str) -> int:
    """A 63-bit seed from the global seed and a sample id (stable across runs and machines)."""
    digest = hashlib.sha256(f"{int(seed)}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_rngs(seed: int, sample_ids, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per sample id."""
    gens = []
    for sid in sample_ids:
        g = torch.Generator(device=device)
        g.manual_seed(sample_seed(seed, str(sid)))
        gens.append(g)
    return gens


def per_sample_randn(shape, rngs: list[torch.Generator], dtype=torch.float32) -> torch.Tensor:
    """A batch (len(rngs), *shape) of standard normal noise, row i from generator i."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype) for g in rngs])


def per_sample_rand(shape, rngs: list[torch.Generator], dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) analogue of :func:`per_sample_randn`."""
    return torch.stack([torch.rand(tuple(shape), generator=g, device=g.device, dtype=dtype) for g in rngs])
