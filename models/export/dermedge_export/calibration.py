"""Which calibration images an export uses: a seeded sample stratified by image kind."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .options import ExportOptions


def image_kind(path: Path) -> str:
    """An image's kind, the first word of its file name (`mosaic-003.png`, `photo-retina-02.png`)."""
    return path.stem.split("-", 1)[0]


def calibration_sample(files: list[Path], options: ExportOptions) -> tuple[list[Path], str]:
    """The calibration images and how they were chosen. Stratified: each kind gets its share of
    the count (largest remainder, at least one image per kind while the count allows), drawn at
    random with the options' seed; the sample is listed in sorted order."""
    count = min(options.calibration_count, len(files))
    if options.calibration_sampling == "sorted":
        return files[:count], f"the first {count} readable images of the directory in sorted order"
    return stratified_sample(files, count, options.calibration_seed)


def stratified_sample(files: list[Path], count: int, seed: int) -> tuple[list[Path], str]:
    """`count` of `files`, each kind in proportion, drawn with `seed`; and how they were chosen."""
    count = min(count, len(files))
    kinds: dict[str, list[Path]] = {}
    for p in files:
        kinds.setdefault(image_kind(p), []).append(p)
    names = sorted(kinds)
    exact = {k: count * len(kinds[k]) / len(files) for k in names}
    share = {k: int(exact[k]) for k in names}
    if count >= len(names):
        for k in names:
            share[k] = max(share[k], 1)
    # Hand out what is left by largest remainder, or take back from the largest shares.
    by_remainder = sorted(names, key=lambda k: (share[k] - exact[k], k))
    while sum(share.values()) < count:
        k = next(k for k in by_remainder if share[k] < len(kinds[k]))
        share[k] += 1
        by_remainder.remove(k)
        by_remainder.append(k)
    while sum(share.values()) > count:
        k = max(names, key=lambda k: (share[k], k))
        share[k] -= 1
    rng = np.random.default_rng(seed)
    chosen = []
    for k in names:
        picked = rng.choice(len(kinds[k]), share[k], replace=False)
        chosen += [kinds[k][i] for i in sorted(picked)]
    shares = ", ".join(f"{share[k]} of {len(kinds[k])} {k}" for k in names)
    return sorted(chosen), f"stratified by kind, seeded random: {shares}"
