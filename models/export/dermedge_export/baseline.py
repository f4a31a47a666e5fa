"""What a user would run instead of dermedge, timed the same way, for the side-by-side benchmark
(scripts/bench-side-by-side.sh):

- `litert`: a plain Python pipeline -- PIL decode and bilinear resize, numpy scaling, the
  `ai-edge-litert` interpreter (XNNPACK) on a .tflite file;
- `savedmodel`: TensorFlow's `serving_default` with the PNG bytes in a tf.train.Example, as the
  model card shows;
- `macs`: multiply-accumulates per image of a .tflite file (CONV_2D, DEPTHWISE_CONV_2D,
  FULLY_CONNECTED), for GMAC/s.

Each prints one JSON line: per-image seconds (median, p90, min) over the timed runs, after
warm-up, and the peak RSS of the process.
"""
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def images(directory: Path) -> list[Path]:
    files = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"error: {directory}: no images")
    return files


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median": statistics.median(ordered), "p90": ordered[round((len(ordered) - 1) * 0.9)],
            "min": ordered[0], "runs": len(ordered)}


def timed(step, files: list[Path], runs: int, warmup: int) -> dict:
    started = time.perf_counter()
    step(files[0])
    first = time.perf_counter() - started
    for i in range(warmup):
        step(files[i % len(files)])
    times = []
    for i in range(runs):
        t = time.perf_counter()
        step(files[i % len(files)])
        times.append(time.perf_counter() - t)
    return {"first_s": first, "per_image_s": summary(times), "peak_rss_bytes": peak_rss_bytes()}


def litert(model: Path, directory: Path, threads: int, runs: int, warmup: int, size: int = 448,
           scale: float = 1 / 255, offset: float = 0.0) -> dict:
    from ai_edge_litert.interpreter import Interpreter
    from PIL import Image

    started = time.perf_counter()
    interpreter = Interpreter(model_path=str(model), num_threads=threads)
    interpreter.allocate_tensors()
    load = time.perf_counter() - started
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]

    def step(path: Path):
        image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
        x = np.asarray(image, dtype=np.float32)[None] * np.float32(scale) + np.float32(offset)
        if inp["dtype"] != np.float32:
            s, z = inp["quantization"]
            x = np.clip(np.round(x / s + z), np.iinfo(inp["dtype"]).min, np.iinfo(inp["dtype"]).max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(out["index"])

    result = timed(step, images(directory), runs, warmup)
    return {"pipeline": "python ai-edge-litert + PIL/numpy", "model": str(model), "threads": threads,
            "load_s": load, **result}


def savedmodel(path: Path, directory: Path, threads: int, runs: int, warmup: int) -> dict:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from .export import serialized_example

    started = time.perf_counter()
    serving = tf.saved_model.load(str(path)).signatures["serving_default"]
    load = time.perf_counter() - started
    examples = {}

    def step(p: Path):
        if p not in examples:
            examples[p] = serialized_example(p)
        return serving(tf.constant([examples[p]]))["embedding"].numpy()

    result = timed(step, images(directory), runs, warmup)
    return {"pipeline": "TensorFlow SavedModel serving_default (tf.train.Example)", "model": str(path),
            "threads": threads, "load_s": load, **result}


def macs(model: Path) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model))
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    total = 0
    for op in interpreter._get_ops_details():  # noqa: SLF001 -- the interpreter's own op listing
        name = op["op_name"]
        if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        weights = tensors[op["inputs"][1]]["shape"]
        output = tensors[op["outputs"][0]]["shape"]
        if name == "CONV_2D":  # weights [cout, kh, kw, cin], output [1, h, w, cout]
            total += int(np.prod(output)) * int(weights[1] * weights[2] * weights[3])
        elif name == "DEPTHWISE_CONV_2D":  # weights [1, kh, kw, cout]
            total += int(np.prod(output)) * int(weights[1] * weights[2])
        else:  # weights [out, in]
            total += int(np.prod(output)) * int(weights[1])
    return {"model": str(model), "macs": total}


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="dermedge-export baseline")
    parser.add_argument("pipeline", choices=["litert", "savedmodel", "macs"])
    parser.add_argument("model", type=Path, help=".tflite file or SavedModel directory")
    parser.add_argument("--images", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    if args.pipeline == "macs":
        result = macs(args.model)
    elif args.pipeline == "litert":
        result = litert(args.model, args.images, args.threads, args.runs, args.warmup)
    else:
        result = savedmodel(args.model, args.images, args.threads, args.runs, args.warmup)
    print(json.dumps(result))
    return 0
