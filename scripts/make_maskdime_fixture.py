#!/usr/bin/env python
"""Write ``tests/fixtures/maskdime_masks.safetensors``: MaskDiME's official gradient masks.

    git clone https://github.com/clguo/MaskDiME /tmp/maskdime
    python scripts/make_maskdime_fixture.py /tmp/maskdime

Calls the official ``compute_grad_masks_nested2`` (``core/sample_utils.py``) on random
gradients with the README's settings (top 5 %, inner 50 %, blur kernel 5, sigma 3) from the
channel mean and per channel, and stores the gradients and both mask pairs.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    root = Path(sys.argv[1]).resolve()
    core = types.ModuleType("core")  # the package, without running its __init__
    core.__path__ = [str(root / "core")]
    sys.modules["core"] = core
    from core.sample_utils import compute_grad_masks_nested2

    torch.manual_seed(0)
    grads = torch.randn(3, 3, 32, 32) * torch.rand(3, 1, 32, 32)
    out = {"grads": grads}
    for name, per_channel in (("mean", False), ("channel", True)):
        m1, m2 = compute_grad_masks_nested2(grads, 0.05, 0.5, blur_kernel=5, blur_sigma=3, per_channel=per_channel)
        out[f"{name}.outer"], out[f"{name}.inner"] = m1, m2
    dest = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "maskdime_masks.safetensors"
    save_file(out, str(dest), metadata={"source": "clguo/MaskDiME core/sample_utils.py compute_grad_masks_nested2"})
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
