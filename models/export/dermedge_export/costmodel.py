"""An estimate of a .tflite file's latency on the target CPU, for judging recipes where the
device runs them rather than on whichever Xeon the build ran on.

Every op's work is counted from the file (multiply-accumulates for convolutions and fully
connected layers, elements for the rest) and classed by arithmetic: float32, float16 weights
(unpacked to float32 once at load: float32 arithmetic), int8 (full-integer), dynamic int8
(int8 weights, float activations quantised per op at run time), int16 activations (no XNNPACK
kernels: TFLite's reference kernels). Each class's throughput on one Cortex-A76 core at 2.4 GHz
(Raspberry Pi 5) is an ESTIMATE from public figures, not a measurement:

- Arm Cortex-A76 software optimisation guide: two 128-bit NEON pipes, each issuing one FMLA
  (4 float32 MACs) or SDOT (16 int8 MACs) per cycle: peaks of 8 float32 MACs and 32 int8 MACs
  per cycle per core.
- XNNPACK's published GEMM/IGEMM microkernel benchmarks on A76-class cores reach roughly 75 % of
  the float32 peak and 55 % of the SDOT peak for convolution-sized GEMMs; depthwise convolutions
  and elementwise ops are bound by loads and stores, not arithmetic.
- TFLite's reference (non-XNNPACK) kernels run around a tenth of XNNPACK's speed.

So int8 convolutions come out at ~2.9x float32 ones, in the 2-3x the boards show; the model is
for ranking recipes against the plain int8 export, not for promising a latency.

With XNNPACK's fp16 arithmetic (dermedge's `cpu_arithmetic = "fp16"`), float ops run as float16:
the A76's FP16 FMLA does 8 MACs per 128-bit pipe per cycle, twice float32's, at the same assumed
efficiencies (`float_arithmetic="float16"`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

from .opreport import OP_NAMES, TYPE_NAMES

CLOCK_HZ = 2.4e9
# MACs per cycle per core, by op family and arithmetic (see the module's sources).
GEMM_MACS_PER_CYCLE = {"float32": 8 * 0.75, "float16": 16 * 0.75, "int8": 32 * 0.55, "dynamic-int8": 32 * 0.55,
                       "int16": 0.6}
DEPTHWISE_MACS_PER_CYCLE = {"float32": 4.0, "float16": 8.0, "int8": 8.0, "dynamic-int8": 8.0, "int16": 0.4}
# Elements per cycle per core for everything else (adds, activations, pooling, (de)quantising).
ELEMENTS_PER_CYCLE = {"float32": 1.0, "float16": 2.0, "int8": 2.0, "dynamic-int8": 1.0, "int16": 0.1}
GEMM_OPS = {"CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL"}
DEPTHWISE_OPS = {"DEPTHWISE_CONV_2D"}


@dataclass
class OpCost:
    op: str
    arithmetic: str
    macs: int
    elements: int
    seconds: float


def _elements(tensor) -> int:
    shape = tensor.shape if tensor.shape is not None else []
    return int(np.prod([max(int(d), 1) for d in shape])) if len(shape) else 1


def arithmetic(op_name: str, activation_types: set[str], weight_types: set[str]) -> str:
    if "int16" in activation_types:
        return "int16"
    if activation_types and activation_types <= {"int8", "uint8", "int32"}:
        return "int8"
    if op_name in GEMM_OPS | DEPTHWISE_OPS and weight_types & {"int8", "uint8"}:
        return "dynamic-int8"
    return "float32"


# TFLite's reference kernels, for the nodes XNNPACK leaves outside its partitions.
REFERENCE_SLOWDOWN = 10.0


def estimate(flatbuffer: bytes, threads: int = 2, outside: set[str] = frozenset(),
             float_arithmetic: str = "float32") -> dict:
    """Estimated seconds per invoke on `threads` Cortex-A76 cores, with the work per arithmetic.
    Nodes of the op types in `outside` (those XNNPACK leaves to TFLite, runner.delegation) are
    costed at the reference kernels' speed; `float_arithmetic="float16"` costs float ops that
    XNNPACK runs as float16 arithmetic."""
    if float_arithmetic not in ("float32", "float16"):
        raise ValueError(f"float_arithmetic: float32 or float16, not {float_arithmetic!r}")
    model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    sg = model.subgraphs[0]
    has_data = [b.data is not None and len(b.data) > 0 for b in model.buffers]
    constant = {i for i, t in enumerate(sg.tensors) if t.buffer < len(has_data) and has_data[t.buffer]}
    costs = []
    for op in sg.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = OP_NAMES.get(max(code.builtinCode, code.deprecatedBuiltinCode), f"op{code.builtinCode}")
        inputs = [i for i in op.inputs if i >= 0]
        outputs = [o for o in op.outputs if o >= 0]
        if inputs and all(i in constant for i in inputs):
            constant.update(outputs)  # folded at load (dequantising fp16 weights, say): no cost per invoke
            continue
        acts = [i for i in inputs if i not in constant] + outputs
        weights = [i for i in inputs if i in constant]
        kind = arithmetic(name, {TYPE_NAMES.get(sg.tensors[i].type, "?") for i in acts},
                          {TYPE_NAMES.get(sg.tensors[i].type, "?") for i in weights})
        if kind == "float32" and name not in outside:
            kind = float_arithmetic
        out_elements = sum(_elements(sg.tensors[o]) for o in outputs)
        macs = 0
        if name in GEMM_OPS and len(inputs) > 1:
            w = sg.tensors[inputs[1]].shape
            # Every output element takes one MAC per weight in its filter: all but the filter count.
            per_output = int(np.prod(w[1:])) if name != "BATCH_MATMUL" else int(w[-2])
            macs = out_elements * per_output
            seconds = macs / (GEMM_MACS_PER_CYCLE[kind] * CLOCK_HZ)
        elif name in DEPTHWISE_OPS and len(inputs) > 1:
            w = sg.tensors[inputs[1]].shape  # [1, kh, kw, channels]
            macs = out_elements * int(w[1]) * int(w[2])
            seconds = macs / (DEPTHWISE_MACS_PER_CYCLE[kind] * CLOCK_HZ)
        else:
            in_elements = sum(_elements(sg.tensors[i]) for i in inputs if i not in constant)
            seconds = (in_elements + out_elements) / (ELEMENTS_PER_CYCLE[kind] * CLOCK_HZ)
        if name in outside:
            seconds *= REFERENCE_SLOWDOWN
        costs.append(OpCost(name, kind, macs, out_elements, seconds))
    total = sum(c.seconds for c in costs) / max(threads, 1)
    by_kind: dict[str, dict] = {}
    for c in costs:
        k = by_kind.setdefault(c.arithmetic, {"ops": 0, "gmacs": 0.0, "seconds": 0.0})
        k["ops"] += 1
        k["gmacs"] += c.macs / 1e9
        k["seconds"] += c.seconds / max(threads, 1)
    for k in by_kind.values():
        k["gmacs"] = round(k["gmacs"], 3)
    arith = ", fp16 arithmetic" if float_arithmetic == "float16" else ""
    return {"target": f"Cortex-A76 at {CLOCK_HZ / 1e9:.1f} GHz, {threads} threads{arith} (estimate)",
            "seconds": total, "by_arithmetic": by_kind}
