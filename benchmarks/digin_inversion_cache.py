#!/usr/bin/env python
"""DiG-IN on a 3-target protocol with and without the inversion cache (``inversion.cache``).

    python benchmarks/digin_inversion_cache.py [--images 4] [--rounds 2]

Each world test image is explained into its three other classes, one sample at a time
(as deterministic runs and batch size 1 do), with the world config's settings (20 DDIM
steps, 5 null-text inner steps, 10 outer steps, 8 cutouts, the 6 searched settings).
Without the cache every (image, target) inverts the image; with it, the first target
inverts it and the other two read the inversion. Prints seconds per VCE (median over the
rounds, the two contenders alternated), the ratio, the cache's hits and misses, and the
largest difference between the two contenders' images (the same method: rounding only).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import torch

    from lit_vce.classifiers import load_classifier
    from lit_vce.data.world import ShapesWorld
    from lit_vce.methods import VCEBatch
    from lit_vce.methods.digin import DiGIN, InversionSettings, OptimisationSettings
    from lit_vce.rngs import sample_rngs

    torch.set_num_threads(1)
    clf = load_classifier("robust")
    world = ShapesWorld("balanced", "test", a.images)
    samples = []
    for i in range(a.images):
        it = world[i]
        for k in (1, 2, 3):
            samples.append((it, (int(it["label"]) + k) % 4))

    def run(cache: str | None) -> tuple[float, torch.Tensor, DiGIN]:
        m = DiGIN(
            "world",
            inversion=InversionSettings(null_text_steps=5, cache=cache),
            optimisation=OptimisationSettings(outer_steps=10, lr=0.05, num_cutouts=8),
        )
        images, t0 = [], time.perf_counter()
        for it, target in samples:
            sid = f"{it['sample_id']}->{target}"
            b = VCEBatch(
                it["image"][None],
                torch.tensor([int(it["label"])]),
                torch.tensor([target]),
                [sid],
                sample_rngs(0, [sid]),
                it["mask"][None],
            )
            images.append(m.generate(b, clf).images)
        return (time.perf_counter() - t0) / len(samples), torch.cat(images), m

    times = {"no cache": [], "cache": []}
    for r in range(a.rounds):
        for name in times:
            with tempfile.TemporaryDirectory() as folder:
                sec, imgs, m = run(folder if name == "cache" else None)
            times[name].append(sec)
            if name == "cache":
                hits, misses, cached_imgs = m._cache.hits, m._cache.misses, imgs
            else:
                plain_imgs = imgs
    base = statistics.median(times["no cache"])
    print(f"{len(samples)} VCEs ({a.images} images x 3 targets), one at a time, 1 thread; medians of {a.rounds} rounds")
    for name, ts in times.items():
        print(f"{name:<9} {statistics.median(ts):7.2f} s/VCE  ratio {statistics.median(ts) / base:.3f}")
    print(
        f"cache: {hits} hits, {misses} misses; largest image difference "
        f"{float((cached_imgs - plain_imgs).abs().max()):.2e}"
    )


if __name__ == "__main__":
    main()
