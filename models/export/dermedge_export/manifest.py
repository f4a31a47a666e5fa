"""What a dermedge model manifest states: the file's checksum and the preprocessing its input expects."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Preprocessing:
    decode_op: str
    resize_op: str
    height: int
    width: int
    scale: float
    offset: float
    cut_tensor: str
    chain: list
    recovered: bool


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: Path, tflite: Path, name: str, version: str, precision: str, dim: int,
                   pre: Preprocessing, input_dtype: str, quant, provenance: dict, correction: Path | None = None,
                   classifier: Path | None = None):
    lines = [
        f"# dermedge model manifest: what {tflite.name} is and the preprocessing its input expects.",
        "[model]", f'id = "{name}"', f'version = "{version}"', f'file = "{tflite.name}"',
        f'sha256 = "{sha256(tflite)}"', f'precision = "{precision}"', f"embedding_dim = {dim}", "",
        "[input]", f"width = {pre.width}", f"height = {pre.height}", "channels = 3", 'layout = "nhwc"',
        'color_order = "rgb"', f'dtype = "{input_dtype}"', 'resize_filter = "bilinear"',
        f"# value = pixel (0-255, after the bilinear resize) * scale + offset; "
        f"{'recovered from' if pre.recovered else 'stated for'} the serving graph",
        f"scale = {pre.scale!r}", f"offset = {pre.offset!r}",
    ]
    if quant is not None:
        lines += ["", "[input.quantization]", f"scale = {quant[0]!r}", f"zero_point = {quant[1]}"]
    lines += ["", "[output]", 'name = "embedding"', 'dtype = "float32"']
    if correction is not None:
        lines += ["", "# y = x * scale + offset per dimension, fitted on the calibration images; applied by dermedge's engine",
                  "[output.correction]", f'file = "{correction.name}"', f'sha256 = "{sha256(correction)}"']
    if classifier is not None:
        lines += ["", "# the model's own trained classifier on its embeddings (dermedge-mlp-head/1); "
                      "`dermedge fidelity` adds it to its head ensemble",
                  "[classifier]", f'file = "{classifier.name}"', f'sha256 = "{sha256(classifier)}"']
    lines += ["", "[provenance]"]
    lines += [f"{k} = {json.dumps(str(v))}" for k, v in provenance.items()]
    path.write_text("\n".join(lines) + "\n")
