"""A model's own trained classifier, written as a dermedge MLP head (`dermedge-mlp-head/1`, read by
`MlpHead` in crates/head) so that `dermedge fidelity` can ask it whether a quantised export changes
its answers.

lesion-x448's `teacher` (sklesion's HAM10000 head) is dense+ReLU -> batch norm, concatenated with
a metadata branch, -> dense+ReLU -> batch norm -> dense+softmax. A device without patient data
feeds the metadata branch a constant, so the branch is a constant vector; batch norm in inference
is a per-unit affine map. Both fold into the dense layers around them, leaving three layers:
2048 -> 264 (ReLU) -> 32 (ReLU) -> 7 (softmax).

The folding is exact arithmetic apart from one rounding per value: every sum is `math.fsum` of
products rounded once, so the file's bytes do not depend on the CPU's BLAS kernels (the registry
pins its checksum). `check` compares it with the SavedModel's own `teacher` signature.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import ExportError

FORMAT = "dermedge-mlp-head/1"
TEACHER_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
# sklesion's metadata input for an unknown sex and body site and a missing age (its encoding).
TEACHER_METADATA = [0, 0, 1, 0, 0, 0, 0, 1, 52.0 / 90.0, 1]
# Keras BatchNormalization's default, which sklesion's layers use (not stored with the variables).
BN_EPSILON = 1e-3
# The teacher signature's layers, in the order the SavedModel tracks them (`head_layers`).
TEACHER_LAYERS = ["dense", "batch_normalization_4", "dense_1", "batch_normalization_5", "dense_2",
                  "batch_normalization_6", "concatenate", "dense_3", "batch_normalization_7", "dense_4"]
# Largest |probability difference| from the SavedModel's teacher accepted: float32 rounding only.
TOLERANCE = 1e-4


def _variables(layer) -> dict:
    """A restored Keras layer's variables by name (`kernel`, `bias`, `gamma`, ...), as float64."""
    children = layer._trackable_children()
    return {name.lstrip("_"): np.asarray(v.numpy(), np.float64) for name, v in children.items()
            if hasattr(v, "numpy") and hasattr(v, "shape")}


def _matvec(kernel: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`x @ kernel` for a Keras kernel [in, out], each output an exactly rounded sum."""
    return np.array([math.fsum(kernel[:, j] * x) for j in range(kernel.shape[1])])


def _batch_norm(v: dict) -> tuple[np.ndarray, np.ndarray]:
    """Inference batch norm as `x * scale + shift`."""
    scale = v["gamma"] / np.sqrt(v["moving_variance"] + BN_EPSILON)
    return scale, v["beta"] - v["moving_mean"] * scale


def fold_teacher(layers: list) -> list[dict]:
    """Three dense layers (`weights` [out, in], `bias`, `activation`) from the teacher's ten."""
    if len(layers) != len(TEACHER_LAYERS):
        raise ExportError(f"the teacher has {len(layers)} tracked layers; expected {len(TEACHER_LAYERS)} "
                          f"({', '.join(TEACHER_LAYERS)})")
    v = dict(zip(TEACHER_LAYERS, (_variables(layer) for layer in layers)))
    relu = lambda x: np.maximum(x, 0.0)  # noqa: E731
    # The metadata branch on its constant input.
    s5, t5 = _batch_norm(v["batch_normalization_5"])
    s6, t6 = _batch_norm(v["batch_normalization_6"])
    meta = np.asarray(TEACHER_METADATA, np.float64)
    hidden = relu(_matvec(v["dense_1"]["kernel"], meta) + v["dense_1"]["bias"]) * s5 + t5
    branch = relu(_matvec(v["dense_2"]["kernel"], hidden) + v["dense_2"]["bias"]) * s6 + t6
    # dense_3 sees [bn4(relu(dense(e))), branch]: bn4's scale goes into its columns, bn4's shift
    # and the branch into its bias.
    s4, t4 = _batch_norm(v["batch_normalization_4"])
    k3, b3 = v["dense_3"]["kernel"], v["dense_3"]["bias"]
    image_part, branch_part = k3[:len(s4)], k3[len(s4):]
    if branch_part.shape[0] != len(branch):
        raise ExportError(f"dense_3 has {k3.shape[0]} inputs; expected {len(s4)} + {len(branch)}")
    bias3 = np.array([math.fsum(np.concatenate([image_part[:, j] * t4, branch_part[:, j] * branch, [b3[j]]]))
                      for j in range(k3.shape[1])])
    s7, t7 = _batch_norm(v["batch_normalization_7"])
    k4, b4 = v["dense_4"]["kernel"], v["dense_4"]["bias"]
    bias4 = np.array([math.fsum(np.concatenate([k4[:, j] * t7, [b4[j]]])) for j in range(k4.shape[1])])
    return [
        {"activation": "relu", "weights": v["dense"]["kernel"].T, "bias": v["dense"]["bias"]},
        {"activation": "relu", "weights": (image_part * s4[:, None]).T, "bias": bias3},
        {"activation": "identity", "weights": (k4 * s7[:, None]).T, "bias": bias4},
    ]


def _float32_list(values: np.ndarray) -> list:
    # Python floats of float32 values: each prints exactly and parses back to the same float32.
    return values.astype(np.float32).astype(np.float64).tolist()


def write_teacher(loaded, name: str, dim: int, path: Path) -> Path | None:
    """Write `<name>.teacher.json` where the SavedModel carries a `teacher` signature; `None` where
    it has none."""
    if "teacher" not in loaded.signatures:
        return None
    if not hasattr(loaded, "head_layers"):
        raise ExportError("the SavedModel has a `teacher` signature but no `head_layers` to fold it from")
    layers = fold_teacher(list(loaded.head_layers))
    if layers[0]["weights"].shape[1] != dim:
        raise ExportError(f"the teacher takes {layers[0]['weights'].shape[1]}-d embeddings; the model gives {dim}-d")
    head = {"format": FORMAT, "name": f"{name}-teacher", "model_id": name, "embedding_dim": dim, "kind": "softmax",
            "classes": TEACHER_CLASSES,
            "layers": [{"activation": l["activation"], "weights": _float32_list(l["weights"]),
                        "bias": _float32_list(l["bias"])} for l in layers]}
    path.write_text(json.dumps(head, separators=(",", ":")) + "\n")
    return path


def predict(head: dict, embeddings: np.ndarray) -> np.ndarray:
    """Class probabilities by the head file, in float32 as dermedge computes them."""
    x = embeddings.astype(np.float32)
    for layer in head["layers"]:
        x = x @ np.asarray(layer["weights"], np.float32).T + np.asarray(layer["bias"], np.float32)
        if layer["activation"] == "relu":
            x = np.maximum(x, 0.0)
    x = np.exp(x - x.max(axis=1, keepdims=True))
    return x / x.sum(axis=1, keepdims=True)


def check(path: Path, loaded, embeddings: np.ndarray) -> float:
    """The largest probability difference between the head file and the SavedModel's `teacher` on
    `embeddings`; an error above `TOLERANCE`."""
    import tensorflow as tf

    expected = loaded.signatures["teacher"](embedding=tf.constant(embeddings, tf.float32))["probabilities"].numpy()
    actual = predict(json.loads(path.read_text()), embeddings)
    worst = float(np.abs(actual - expected).max())
    if not worst <= TOLERANCE:
        raise ExportError(f"{path}: the folded teacher differs from the SavedModel's by {worst:.3g} in probability "
                          f"(at most {TOLERANCE} expected)")
    return worst
