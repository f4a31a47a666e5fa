"""Run a .tflite file on preprocessed inputs with LiteRT's Python interpreter."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class Runner:
    """One .tflite model on LiteRT's Python interpreter, float in and out whatever its I/O types."""

    def __init__(self, model: bytes, threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_content=bytes(model), num_threads=threads)
        self.run = self.interp.get_signature_runner("serving_default")
        signature = self.interp.get_signature_list()["serving_default"]
        self.input, self.output = signature["inputs"][0], signature["outputs"][0]
        self.input_detail = self.run.get_input_details()[self.input]
        self.output_detail = self.run.get_output_details()[self.output]

    def embed(self, inputs: np.ndarray) -> np.ndarray:
        out = []
        for x in inputs:
            x = x[None]
            if self.input_detail["dtype"] != np.float32:
                s, z = self.input_detail["quantization"]
                info = np.iinfo(self.input_detail["dtype"])
                x = np.clip(np.round(x / s + z), info.min, info.max).astype(self.input_detail["dtype"])
            y = self.run(**{self.input: x})[self.output][0]
            if self.output_detail["dtype"] != np.float32:
                s, z = self.output_detail["quantization"]
                y = (y.astype(np.float32) - z) * s
            out.append(np.asarray(y, dtype=np.float32).reshape(-1))
        return np.stack(out)


def run_tflite(path: Path, inputs: list[np.ndarray]) -> np.ndarray:
    """The embeddings of `path` for each preprocessed input ([1, h, w, c] arrays)."""
    return Runner(Path(path).read_bytes()).embed(np.concatenate(inputs))


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
