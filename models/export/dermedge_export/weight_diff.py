"""How far apart two conversions of one model are, buffer by buffer.

    scripts/python-env.sh -m dermedge_export.weight_diff A.tflite B.tflite

For builds of the same model on different CPUs (models/README.md): every constant buffer of at
least 256 bytes in A is paired with the identical buffer in B, else with B's same-size float32
buffer closest to it; prints how many are identical and the largest difference of the others,
relative to that buffer's largest magnitude. Tensor names are not used: two exports of one model
may name them differently.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

FLOAT32 = 0


def buffers(path: Path) -> dict[str, tuple[int, bytes]]:
    """Each large constant buffer of the main subgraph, by sha1: (tensor type, bytes)."""
    data = path.read_bytes()
    model = schema.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    found = {}
    for t in range(graph.TensorsLength()):
        tensor = graph.Tensors(t)
        buffer = model.Buffers(tensor.Buffer())
        if buffer.DataLength() >= 256:
            raw = bytes(buffer.DataAsNumpy())
            found[hashlib.sha1(raw).hexdigest()] = (tensor.Type(), raw)
    return found


def compare(a: Path, b: Path) -> dict:
    left, right = buffers(a), buffers(b)
    identical = set(left) & set(right)
    candidates = [np.frombuffer(raw, np.float32) for h, (kind, raw) in right.items()
                  if h not in identical and kind == FLOAT32]
    differences, unpaired = [], 0
    for h, (kind, raw) in left.items():
        if h in identical:
            continue
        x = np.frombuffer(raw, np.float32) if kind == FLOAT32 else None
        same_size = [y for y in candidates if x is not None and y.shape == x.shape]
        if not same_size:
            unpaired += 1
            continue
        differences.append(min(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)) for y in same_size))
    return {"a": str(a), "b": str(b), "buffers": len(left), "identical": len(identical),
            "differ": len(differences), "unpaired": unpaired,
            "largest_relative_difference": max(differences, default=0.0)}


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    print(json.dumps(compare(Path(argv[0]), Path(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
