"""Run a .tflite file on preprocessed inputs with LiteRT's Python interpreter."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def run_tflite(path: Path, inputs: list[np.ndarray]) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=2)
    runner = interp.get_signature_runner("serving_default")
    name = interp.get_signature_list()["serving_default"]["inputs"][0]
    detail = runner.get_input_details()[name]
    outs = []
    for x in inputs:
        if detail["dtype"] != np.float32:
            s, z = detail["quantization"]
            info = np.iinfo(detail["dtype"])
            x = np.clip(np.round(x / s + z), info.min, info.max).astype(detail["dtype"])
        outs.append(runner(**{name: x})["embedding"][0].astype(np.float32))
    return np.stack(outs)
