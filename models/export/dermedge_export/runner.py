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


def delegation(path: Path, threads: int = 2) -> dict:
    """How XNNPACK takes the file, as LiteRT's Python interpreter (same release as dermedge's
    runtime) applies it: the graph's own nodes, the partitions XNNPACK runs (each becomes one
    DELEGATE node) and, by op type, the nodes left to TFLite's own kernels between partitions
    (what splits the graph; a run of several such nodes counts its last)."""
    from collections import Counter

    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=threads)
    interp.allocate_tensors()
    ops = interp._get_ops_details()
    delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
    produced = {int(t) for o in delegates for t in o["outputs"]}
    fed = {int(t) for o in delegates for t in o["inputs"]}
    graph_outputs = {int(d["index"]) for d in interp.get_output_details()}
    nodes = [o for o in ops if o["op_name"] != "DELEGATE"]
    # A partition's own nodes write tensors internal to it or its outputs; a node outside every
    # partition writes what a partition (or the graph's caller) reads next.
    kept = Counter(o["op_name"] for o in nodes
                   if not ({int(t) for t in o["outputs"]} & produced)
                   and {int(t) for t in o["outputs"]} & (fed | graph_outputs))
    if not delegates:
        kept = Counter(o["op_name"] for o in nodes)
    return {"nodes": len(nodes), "partitions": len(delegates), "outside": dict(kept.most_common())}
