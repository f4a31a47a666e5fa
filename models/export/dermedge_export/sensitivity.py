"""Per-layer quantisation sensitivity, measured on the final embedding.

For every op of a float .tflite file that the AI Edge Quantizer can quantise, quantise that op
alone (int8 activations at its calibrated range, per-channel int8 weights, the rest of the graph
float) and measure how far the embedding moves in the head's view: δ = ‖P(c) − P(r)‖ / ‖P(r)‖,
P(x) = x/‖x‖ − m, m the mean of the L2-normalised fp32 embeddings (dermedge-fidelity's definition
of `head_view_delta`). Then the other way round: quantise everything except the k most sensitive
ops, for growing k, which says how much of the graph must stay float for the embedding to hold.

Runs in the quantizer venv (`scripts/python-env.sh --venv quantizer`; no TensorFlow, LiteRT
2.3.0 in process): the inputs come preprocessed from the main venv (`dermedge_export inputs`), so
the two venvs share one copy of dermedge's preprocessing.

    python -m dermedge_export.sensitivity MODEL.fp32.tflite --calibration cal.npz --images eval.npz \
        --out DIR [--top 1,2,4,8,16,32] [--activation-bits 8]
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import ExportError

SIGNATURE = "serving_default"


def static_config(activation_bits: int = 8) -> dict:
    """The op config of a full-integer layer: per-tensor activations (asymmetric at 8 bits,
    symmetric at 16, as TFLite's kernels require) and per-channel symmetric int8 weights."""
    return {
        "activation_tensor_config": {"num_bits": activation_bits, "symmetric": activation_bits == 16,
                                     "granularity": "TENSORWISE", "dtype": "INT"},
        "weight_tensor_config": {"num_bits": 8, "symmetric": True, "granularity": "CHANNELWISE", "dtype": "INT"},
        "compute_precision": "INTEGER",
        "explicit_dequantize": False,
        "skip_checks": False,
        "min_weight_elements": 0,
    }


def entry(regex: str, operation: str, config: dict | None, algorithm: str = "min_max_uniform_quantize") -> dict:
    """One line of an AI Edge Quantizer recipe; `config` None keeps the matching ops float."""
    if config is None:
        return {"regex": regex, "operation": operation, "algorithm_key": "no_quantize"}
    return {"regex": regex, "operation": operation, "algorithm_key": algorithm, "op_config": config}


def scope_regex(scope: str) -> str:
    """A regex that selects exactly the op with this scope (its output tensor names, `;`-joined)."""
    return "^" + re.escape(scope) + "$"


@dataclass
class Op:
    index: int
    name: str  # the op type, e.g. CONV_2D
    scope: str


def quantisable_ops(model: bytes) -> list[Op]:
    """The main subgraph's ops the quantizer's min/max algorithm can quantise, in graph order."""
    from ai_edge_quantizer import algorithm_manager
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    flat = fb.read_model(bytearray(model))
    subgraph = flat.subgraphs[0]
    ops = []
    for i, op in enumerate(subgraph.operators):
        code = flat.operatorCodes[op.opcodeIndex].builtinCode
        name = fb.TFL_OP_CODE_TO_NAME.get(code)
        if name is None or not algorithm_manager.is_op_registered("min_max_uniform_quantize", name):
            continue
        ops.append(Op(i, str(getattr(name, "value", name)), fb.get_op_scope(op, subgraph.tensors)))
    return ops


def load_inputs(path: Path) -> tuple[np.ndarray, list[str]]:
    """Preprocessed model inputs written by `dermedge_export inputs` (an .npz: inputs, names)."""
    try:
        with np.load(path) as z:
            inputs, names = z["inputs"], [str(n) for n in z["names"]]
    except (OSError, KeyError, ValueError) as e:
        raise ExportError(f"{path}: not an inputs file from `dermedge_export inputs` ({e})") from e
    if inputs.ndim != 4 or inputs.dtype != np.float32 or len(names) != len(inputs) or len(inputs) == 0:
        raise ExportError(f"{path}: expected float32 inputs [n, h, w, c] with one name each, "
                          f"got {inputs.dtype} {list(inputs.shape)} and {len(names)} names")
    return inputs, names


class Runner:
    """One .tflite model on LiteRT's Python interpreter, float in and out whatever its I/O types."""

    def __init__(self, model: bytes, threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_content=bytes(model), num_threads=threads)
        self.run = self.interp.get_signature_runner(SIGNATURE)
        signature = self.interp.get_signature_list()[SIGNATURE]
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


def head_view_delta(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per image δ = ‖P(c) − P(r)‖ / ‖P(r)‖ with P(x) = x/‖x‖ − m, m the mean of the normalised
    reference rows (as dermedge-fidelity computes `head_view_delta`)."""
    r = reference.astype(np.float64)
    c = candidate.astype(np.float64)
    rn = r / np.linalg.norm(r, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    m = rn.mean(0)
    return np.linalg.norm((cn - m) - (rn - m), axis=1) / np.linalg.norm(rn - m, axis=1)


def stats(delta: np.ndarray) -> dict:
    return {"delta_median": float(np.median(delta)), "delta_p99": float(np.percentile(delta, 99)),
            "delta_mean": float(delta.mean())}


class Quantiser:
    """The AI Edge Quantizer on one float model, calibrated once for every recipe it makes."""

    def __init__(self, model: bytes, calibration: np.ndarray, input_name: str, activation_bits: int = 8,
                 threads: int = 2):
        from ai_edge_quantizer import quantizer

        self.model = model
        self.activation_bits = activation_bits
        q = quantizer.Quantizer(bytearray(model))
        q.load_quantization_recipe([entry(".*", "*", static_config(activation_bits))])
        data = {SIGNATURE: [{input_name: x[None]} for x in calibration]}
        self.qsvs = q.calibrate(data, num_threads=threads)

    def quantise(self, recipe: list[dict]) -> bytes:
        from ai_edge_quantizer import quantizer

        q = quantizer.Quantizer(bytearray(self.model))
        q.load_quantization_recipe(recipe)
        return bytes(q.quantize(self.qsvs, enable_progress_report=False).quantized_model)

    def only(self, op: Op) -> bytes:
        return self.quantise([entry(scope_regex(op.scope), op.name, static_config(self.activation_bits))])

    def all_but(self, kept_float: list[Op], algorithm: str = "min_max_uniform_quantize") -> bytes:
        """Every op quantised but `kept_float`; the graph's input and output stay float32, as
        dermedge's exports are (the first and last ops quantise and dequantise)."""
        recipe = [entry(".*", "*", static_config(self.activation_bits), algorithm),
                  entry(".*", "INPUT", None), entry(".*", "OUTPUT", None)]
        recipe += [entry(scope_regex(op.scope), op.name, None) for op in kept_float]
        return self.quantise(recipe)


RANK_BY = "delta_mean"  # the mean counts an op that ruins a few images as well as one that shifts all


def measure(model_path: Path, calibration: Path, images: Path, out: Path, top: list[int],
            activation_bits: int = 8, threads: int = 2, reuse: bool = False, full_only: bool = False,
            progress=print) -> dict:
    """Measure every op alone, then the graph without the k most sensitive. `reuse` takes the
    per-op measurements from an earlier run's `<name>.sensitivity.json` in `out` (same model,
    images and calibration, checked) and measures only the cumulative curve; `full_only`
    measures only the graph with every op quantised."""
    model = Path(model_path).read_bytes()
    cal, _ = load_inputs(calibration)
    xs, names = load_inputs(images)
    started = time.time()
    fp32 = Runner(model, threads)
    reference = fp32.embed(xs)
    quantiser = Quantiser(model, cal, fp32.input, activation_bits, threads)
    ops = quantisable_ops(model)
    progress(f"{model_path.name}: {len(ops)} quantisable ops, {len(xs)} images, calibrated on {len(cal)}")

    def judged(candidate: bytes) -> dict:
        return stats(head_view_delta(Runner(candidate, threads).embed(xs), reference))

    name = Path(model_path).name.split(".")[0]
    if full_only:
        full = judged(quantiser.all_but([]))
        progress(f"every op int{activation_bits}: delta median {full['delta_median']:.3f} p99 {full['delta_p99']:.3f}")
        return {"model": str(model_path), "images": str(images), "image_count": len(xs),
                "calibration_count": len(cal), "activation_bits": activation_bits, "full": full,
                "seconds": round(time.time() - started, 1)}
    earlier = out / f"{name}.sensitivity.json"
    if reuse:
        try:
            previous = json.loads(earlier.read_text())
        except (OSError, ValueError) as e:
            raise ExportError(f"{earlier}: no earlier measurement to reuse ({e})") from e
        same = {k: previous.get(k) for k in ("model", "images", "calibration", "activation_bits")}
        asked = {"model": str(model_path), "images": str(images), "calibration": str(calibration),
                 "activation_bits": activation_bits}
        if same != asked or {r["index"] for r in previous["alone"]} != {op.index for op in ops}:
            raise ExportError(f"{earlier}: measured {same}, not {asked}; run without --reuse")
        full, alone = previous["full"], previous["alone"]
    else:
        full = judged(quantiser.all_but([]))
        progress(f"every op int{activation_bits}: delta median {full['delta_median']:.3f} p99 {full['delta_p99']:.3f}")
        alone = []
        for n, op in enumerate(ops, 1):
            row = {"index": op.index, "op": op.name, "scope": op.scope, **judged(quantiser.only(op))}
            alone.append(row)
            if n % 10 == 0 or n == len(ops):
                progress(f"  {n}/{len(ops)} ops measured alone ({time.time() - started:.0f} s)")
    ranked = sorted(alone, key=lambda r: r[RANK_BY], reverse=True)
    by_index = {op.index: op for op in ops}
    cumulative = []
    for k in sorted({k for k in top if 0 < k <= len(ops)}):
        kept = [by_index[r["index"]] for r in ranked[:k]]
        row = {"float_ops": k, "kept_float": [op.scope for op in kept], **judged(quantiser.all_but(kept))}
        cumulative.append(row)
        progress(f"  all but the {k} most sensitive: delta median {row['delta_median']:.3f} p99 {row['delta_p99']:.3f}")
    by_type: dict[str, list[float]] = {}
    for r in alone:
        by_type.setdefault(r["op"], []).append(r["delta_median"])
    result = {
        "model": str(model_path), "images": str(images), "image_count": len(xs), "calibration": str(calibration),
        "calibration_count": len(cal), "activation_bits": activation_bits,
        "definition": "delta = |P(c) - P(r)| / |P(r)|, P(x) = x/|x| - mean of the normalised fp32 embeddings",
        "ranked_by": RANK_BY,
        "full": full,
        "by_type": {t: {"ops": len(v), "delta_median_max": max(v), "delta_median_mean": float(np.mean(v))}
                    for t, v in sorted(by_type.items())},
        "alone": ranked, "all_but_most_sensitive": cumulative, "seconds": round(time.time() - started, 1),
    }
    write(out, name, result)
    return result


def write(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.sensitivity.json").write_text(json.dumps(result, indent=1))
    with (out / f"{name}.sensitivity.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["index", "op", "scope", "delta_median", "delta_p99", "delta_mean"])
        w.writeheader()
        w.writerows(result["alone"])
    bits = result["activation_bits"]
    lines = [f"# {name}: per-layer sensitivity on the final embedding", "",
             f"{result['image_count']} images, calibration {result['calibration_count']} images, int{bits} "
             f"activations, per-channel int8 weights (AI Edge Quantizer, min/max). {result['definition']}.", "",
             f"Every op quantised: δ median {result['full']['delta_median']:.3f}, p99 {result['full']['delta_p99']:.3f}.",
             "", "| op type | ops | worst δ median alone | mean δ median alone |", "|---|---:|---:|---:|"]
    lines += [f"| {t} | {v['ops']} | {v['delta_median_max']:.4f} | {v['delta_median_mean']:.4f} |"
              for t, v in result["by_type"].items()]
    lines += ["", f"The most sensitive ops, each quantised alone (by {result['ranked_by'].replace('_', ' ')}):", "",
              "| rank | op | output tensor (its name's end) | δ median | δ mean | δ p99 |", "|---:|---|---|---:|---:|---:|"]
    lines += [f"| {i} | {r['op']} | `…{r['scope'].rstrip(';')[-60:]}` | {r['delta_median']:.4f} | "
              f"{r['delta_mean']:.4f} | {r['delta_p99']:.4f} |"
              for i, r in enumerate(result["alone"][:15], 1)]
    lines += ["", "Everything quantised except the k most sensitive ops:", "",
              "| float ops | δ median | δ p99 |", "|---:|---:|---:|",
              f"| 0 | {result['full']['delta_median']:.4f} | {result['full']['delta_p99']:.4f} |"]
    lines += [f"| {r['float_ops']} | {r['delta_median']:.4f} | {r['delta_p99']:.4f} |"
              for r in result["all_but_most_sensitive"]]
    (out / f"{name}.sensitivity.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dermedge_export.sensitivity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="the float .tflite export")
    p.add_argument("--calibration", required=True, type=Path, help="inputs .npz to calibrate ranges on")
    p.add_argument("--images", required=True, type=Path, help="inputs .npz to measure the embedding on")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--top", default="1,2,4,8,16,32", help="k values for 'all but the k most sensitive'")
    p.add_argument("--activation-bits", type=int, choices=[8, 16], default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true",
                   help="take the per-op measurements from an earlier run in --out; measure only the cumulative curve")
    p.add_argument("--full-only", action="store_true",
                   help="measure only the graph with every op quantised (nothing is written)")
    args = p.parse_args(argv)
    try:
        top = [int(k) for k in args.top.split(",") if k.strip()]
    except ValueError:
        print(f"error: --top takes comma-separated counts, not '{args.top}'", file=sys.stderr)
        return 2
    try:
        if not args.model.is_file():
            raise ExportError(f"{args.model}: no such model file")
        result = measure(args.model, args.calibration, args.images, args.out, top, args.activation_bits, args.threads,
                         args.reuse, args.full_only)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.full_only:
        print(json.dumps(result))
    else:
        print(f"wrote {args.out}/*.sensitivity.{{json,csv,md}} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
