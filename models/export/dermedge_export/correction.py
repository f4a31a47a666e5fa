"""A per-dimension output correction: `y = x * scale + offset`, fitted so a quantised export's
embeddings land where its fp32 reference's do, shipped beside the model as a float32 `.npy` of
shape [2, dim] that the manifest's `[output.correction]` names and dermedge's engine applies."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def fit_affine(candidate: np.ndarray, reference: np.ndarray, shrink: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Least squares per dimension of `reference` on `candidate` (rows are images), with the
    slope shrunk towards 1 by a ridge of `shrink` x the median variance, so a dimension that
    hardly varies on the fitting images keeps its slope and only moves by its mean offset."""
    x = candidate.astype(np.float64)
    y = reference.astype(np.float64)
    if x.shape != y.shape or x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"fit_affine: expected two equal [n >= 2, dim] arrays, got {x.shape} and {y.shape}")
    mx, my = x.mean(0), y.mean(0)
    var = ((x - mx) ** 2).mean(0)
    cov = ((x - mx) * (y - my)).mean(0)
    ridge = shrink * float(np.median(var)) + 1e-12
    scale = (cov + ridge) / (var + ridge)
    offset = my - scale * mx
    return scale.astype(np.float32), offset.astype(np.float32)


def apply(candidate: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return candidate * scale + offset


# The largest |scale| or |offset| dermedge's engine accepts (crates/engine/src/correction.rs).
MAX_MAGNITUDE = 1.0e6


def write(path: Path, scale: np.ndarray, offset: np.ndarray) -> Path:
    if not (np.isfinite(scale).all() and np.isfinite(offset).all()):
        raise ValueError("the fitted correction is not finite")
    if max(np.abs(scale).max(), np.abs(offset).max()) > MAX_MAGNITUDE:
        raise ValueError(f"the fitted correction exceeds {MAX_MAGNITUDE:g}, which dermedge refuses")
    with open(path, "wb") as f:
        np.save(f, np.stack([scale, offset]).astype("<f4"), allow_pickle=False)
    return path
