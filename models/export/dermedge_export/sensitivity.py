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
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ExportError
from .runner import Runner

SIGNATURE = "serving_default"  # the signature every dermedge export serves


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


def weight_only_config() -> dict:
    """Per-channel symmetric int8 weights dequantised to float32 at load; float arithmetic. What
    weight quantisation alone costs."""
    return {"weight_tensor_config": {"num_bits": 8, "symmetric": True, "granularity": "CHANNELWISE", "dtype": "INT"},
            "compute_precision": "FLOAT", "explicit_dequantize": True, "skip_checks": False, "min_weight_elements": 0}


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


def _op_type(flat, op) -> str | None:
    """An op's type name as the quantizer spells it (CONV_2D, ...), or None for one it does not know."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    name = fb.TFL_OP_CODE_TO_NAME.get(flat.operatorCodes[op.opcodeIndex].builtinCode)
    return None if name is None else str(getattr(name, "value", name))


def quantisable_ops(model: bytes) -> list[Op]:
    """The main subgraph's ops the quantizer's min/max algorithm can quantise, in graph order."""
    from ai_edge_quantizer import algorithm_manager
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    flat = fb.read_model(bytearray(model))
    subgraph = flat.subgraphs[0]
    ops = []
    for i, op in enumerate(subgraph.operators):
        name = _op_type(flat, op)
        if name is None or not algorithm_manager.is_op_registered("min_max_uniform_quantize", name):
            continue
        ops.append(Op(i, name, fb.get_op_scope(op, subgraph.tensors)))
    return ops


def _conv_weights(flat, subgraph, op):
    """(op type, weight array, bias array or None, per-channel axis) of a convolution, else None."""
    name = _op_type(flat, op)
    if name not in ("CONV_2D", "DEPTHWISE_CONV_2D") or len(op.inputs) < 2:
        return None
    weights = subgraph.tensors[op.inputs[1]]
    data = flat.buffers[weights.buffer].data
    if data is None or len(data) == 0 or weights.type != 0:  # 0: FLOAT32; only a float model's
        return None
    w = np.frombuffer(bytes(data), np.float32).reshape(weights.shape)
    b = None
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        bias = subgraph.tensors[op.inputs[2]]
        if flat.buffers[bias.buffer].data is not None and len(flat.buffers[bias.buffer].data):
            b = np.frombuffer(bytes(flat.buffers[bias.buffer].data), np.float32)
    return name, w, b, (3 if name == "DEPTHWISE_CONV_2D" else 0)


def _set_constant(flat, op, slot: int, values: np.ndarray, subgraph: int = 0) -> None:
    """Give the constant at input `slot` of `op` new values, for this op only. The converter
    shares equal constants (every all-zero bias of a size is one tensor on one buffer), so a
    tensor or buffer used elsewhere is first copied and `op` rewired to the copy."""
    import copy

    graph = flat.subgraphs[subgraph]
    index = op.inputs[slot]
    tensor = graph.tensors[index]
    readers = sum(list(o.inputs).count(index) for o in graph.operators)
    owners = sum(t.buffer == tensor.buffer for g in flat.subgraphs for t in g.tensors)
    if readers > 1 or owners > 1:
        flat.buffers.append(copy.copy(flat.buffers[tensor.buffer]))
        tensor = copy.copy(tensor)
        tensor.buffer = len(flat.buffers) - 1
        # Tensor names must stay unique (the quantizer keys its ranges by name).
        tensor.name = f"{_tensor_name(tensor)}/own-{len(graph.tensors)}".encode()
        graph.tensors.append(tensor)
        inputs = list(op.inputs)
        inputs[slot] = len(graph.tensors) - 1
        op.inputs = np.array(inputs, dtype=np.int32) if isinstance(op.inputs, np.ndarray) else inputs
    flat.buffers[tensor.buffer].data = np.frombuffer(values.astype(np.float32).tobytes(), np.uint8)


def int8_weight_error(w: np.ndarray, axis: int) -> np.ndarray:
    """Q(w) − w for per-channel symmetric int8 along `axis` (scale max|w| / 127)."""
    moved = np.moveaxis(w, axis, 0)
    scale = np.abs(moved).reshape(moved.shape[0], -1).max(1) / 127.0
    scale[scale == 0] = 1.0
    scale = scale.reshape((-1,) + (1,) * (moved.ndim - 1))
    return np.moveaxis(np.round(moved / scale) * scale - moved, 0, axis)


BIAS_CORRECTION_IMAGES = 16


def spread(inputs: np.ndarray, count: int = BIAS_CORRECTION_IMAGES) -> np.ndarray:
    """`count` inputs evenly spaced through `inputs` (calibration sets are sorted by file name,
    so the first few would be one image kind)."""
    if len(inputs) <= count:
        return inputs
    return inputs[np.linspace(0, len(inputs) - 1, count).round().astype(int)]


def calibration_runs(model: bytes, calibration: np.ndarray, threads: int = 2):
    """Run the float model on each calibration input in turn, every intermediate tensor kept;
    yields the interpreter after each run (read activations with `get_tensor`)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=bytes(model), num_threads=threads, experimental_preserve_all_tensors=True)
    run = interp.get_signature_runner(SIGNATURE)
    input_name = interp.get_signature_list()[SIGNATURE]["inputs"][0]
    for x in calibration:
        run(**{input_name: x[None]})
        yield interp


def channel_mean(activation: np.ndarray) -> np.ndarray:
    """The per-channel (last axis) mean of one activation."""
    return activation.reshape(-1, activation.shape[-1]).mean(0)


def bias_shift(name: str, error: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """How far a weight error moves each output channel's expected value: (W' − W)·E[x], E[x]
    the per-channel mean of the op's input."""
    if name == "CONV_2D":  # [out, kh, kw, in]
        return np.einsum("ohwi,i->o", error, mean)
    # DEPTHWISE_CONV_2D: [1, kh, kw, in * multiplier]
    return error.sum((0, 1, 2)) * np.repeat(mean, error.shape[3] // mean.shape[0])


def bias_corrected(model: bytes, calibration: np.ndarray, threads: int = 2, kept_float: set[int] = frozenset()) -> bytes:
    """The float model with every convolution's bias corrected for its int8 weights' error:
    b' = b − Σ (Q(W) − W) · E[x], E[x] the per-channel mean of the op's input over the calibration
    images (Nagel et al. 2019, "Data-free quantization", analytic bias correction with measured
    means; borders and padding ignored). Quantising the result leaves the weights as they were and
    moves each output channel's expected value back to float's. Ops in `kept_float` (op indices)
    stay float, so their biases are left alone: correcting them would add the error it removes."""
    from ai_edge_litert.tools import flatbuffer_utils as fu
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    flat = fb.read_model(bytearray(model))
    subgraph = flat.subgraphs[0]
    convs = [(op, c) for i, op in enumerate(subgraph.operators)
             if i not in kept_float and (c := _conv_weights(flat, subgraph, op)) and c[2] is not None]
    sums = {op.inputs[0]: 0.0 for op, _ in convs}
    for interp in calibration_runs(model, calibration, threads):
        for index in sums:
            sums[index] = sums[index] + channel_mean(interp.get_tensor(index))
    for op, (name, w, b, axis) in convs:
        mean = sums[op.inputs[0]] / len(calibration)
        _set_constant(flat, op, 2, b - bias_shift(name, int8_weight_error(w, axis), mean))
    return bytes(fu.convert_object_to_bytearray(flat))


def _tensor_name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def _dequantised(interp, detail: dict) -> np.ndarray:
    """A tensor of a run as float: an integer one mapped through its scale and zero point."""
    a = interp.get_tensor(detail["index"])
    if a.dtype in (np.int8, np.uint8, np.int16):
        scale, zero = detail["quantization"]
        return (a.astype(np.float32) - zero) * np.float32(scale)
    return a.astype(np.float32, copy=False)


ACTIVATION_CORRECTION_IMAGES = 8


def _writable_constant(root, model: bytearray, tensor, what: str) -> np.ndarray:
    """A writable uint8 view, inside `model`, of the constant buffer behind `tensor`."""
    buffer = root.Buffers(tensor.Buffer())
    # A large constant may sit after the flatbuffer, at an offset from the file's start.
    data = buffer.DataAsNumpy() if buffer.Offset() <= 1 else np.frombuffer(model, np.uint8, buffer.Size(),
                                                                           buffer.Offset())
    if isinstance(data, int) or len(data) == 0:
        raise ExportError(f"{what} is not a constant in the quantised graph")
    return data


def _quantised_biases(model: bytearray, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each op of a quantised model whose output is named in `names` and whose third input is
    an int32 bias: (a writable int32 view of that bias inside `model`, its per-channel scale)."""
    found = _quantised_convolutions(model, names, "activation bias correction")
    if unbiased := [n for n, c in found.items() if c["bias"] is None]:
        raise ExportError(f"activation bias correction: {unbiased[:3]} have no bias in the quantised graph")
    return {n: (c["bias"], c["bias_scale"]) for n, c in found.items()}


def _quantised_convolutions(model: bytearray, names: list[str], purpose: str) -> dict[str, dict]:
    """For each op of a quantised model whose output is named in `names`: its input tensor's
    index, a writable int8 view of its weights inside `model` (the op's own layout) and their
    per-channel scales, and a writable int32 view of its bias and the bias's scales (None where
    it has none). Every constant must be the op's own: an edit must not reach another op."""
    from ai_edge_litert import schema_py_generated as schema

    from collections import Counter

    root = schema.Model.GetRootAs(model, 0)
    graph = root.Subgraphs(0)
    # Who else holds a constant: tensors on its buffer (every subgraph), ops reading its tensor.
    owners = Counter(root.Subgraphs(g).Tensors(t).Buffer() for g in range(root.SubgraphsLength())
                     for t in range(root.Subgraphs(g).TensorsLength()))
    readers = Counter(graph.Operators(i).Inputs(j) for i in range(graph.OperatorsLength())
                      for j in range(graph.Operators(i).InputsLength()))
    convolutions = (schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.DEPTHWISE_CONV_2D)
    found = {}
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        if op.OutputsLength() < 1 or op.InputsLength() < 2:
            continue
        name = graph.Tensors(op.Outputs(0)).Name().decode()
        if name not in names:
            continue
        code = root.OperatorCodes(op.OpcodeIndex())
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) not in convolutions:
            raise ExportError(f"{purpose}: {name!r} is not the output of a convolution in the quantised graph")
        slots = [op.Inputs(1)] + ([op.Inputs(2)] if op.InputsLength() > 2 and op.Inputs(2) >= 0 else [])
        weights, bias = graph.Tensors(slots[0]), (graph.Tensors(slots[1]) if len(slots) > 1 else None)
        if (weights.Type() != schema.TensorType.INT8 or (bias is not None and bias.Type() != schema.TensorType.INT32)
                or any(readers[t] > 1 or owners[graph.Tensors(t).Buffer()] > 1 for t in slots)):
            raise ExportError(f"{purpose}: the weights or bias of {name!r} in the quantised graph are not int8 / "
                              "int32 constants of its own")
        w = _writable_constant(root, model, weights, f"{purpose}: the weights of {name!r}").view(np.int8)
        w = w.reshape(weights.ShapeAsNumpy())
        entry = {"input": op.Inputs(0), "weights": w,
                 "weight_scale": weights.Quantization().ScaleAsNumpy().astype(np.float64),
                 "weight_axis": weights.Quantization().QuantizedDimension(), "bias": None, "bias_scale": None}
        if bias is not None:
            entry["bias"] = _writable_constant(root, model, bias, f"{purpose}: the bias of {name!r}").view(np.int32)
            entry["bias_scale"] = bias.Quantization().ScaleAsNumpy().astype(np.float64)
        found[name] = entry
    missing = [n for n in names if n not in found]
    if missing:
        raise ExportError(f"{purpose}: the convolutions {missing[:3]} are not in the quantised "
                          "graph (did the quantizer rename their outputs?)")
    return found


def activation_bias_corrections(reference: bytes, quantised: bytes, calibration: np.ndarray, threads: int = 2,
                                kept_float: set[int] = frozenset(), progress=None) -> tuple[dict[str, np.ndarray], dict]:
    """Empirical bias correction (Nagel et al. 2019, "Data-free quantization", §4.2, measured
    rather than modelled, layer by layer as AIMET does it): each convolution's bias moved by the
    mean error of its output in the quantised graph against the `reference` float graph on the
    calibration images, so each output channel's expected value is float's again whatever made
    it wrong (its weights, the rounding and clipping of its int8 input, errors from upstream).
    Where the convolution has a fused ReLU the error is divided by float's active positions, not
    all of them: a bias shift moves only those (one Newton step on the mean after ReLU).

    Strictly in graph order, each convolution measured with every earlier correction in place:
    correcting upstream changes what reaches downstream, and correcting many at once from one
    measurement corrects the same error several times over. The corrections are written into the
    quantised graph's int32 biases directly (no re-quantisation between steps). Returns, per
    convolution output name, the shift in float units (whole bias steps) to subtract from the
    float graph's bias, and what was done."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    flat = fb.read_model(bytearray(reference))
    subgraph = flat.subgraphs[0]
    every = [(op, c[2] is not None) for i, op in enumerate(subgraph.operators)
             if i not in kept_float and (c := _conv_weights(flat, subgraph, op))]
    convs = [op for op, has_bias in every if has_bias]
    without_bias = len(every) - len(convs)
    names = [_tensor_name(subgraph.tensors[op.outputs[0]]) for op in convs]
    activation = {n: getattr(op.builtinOptions, "fusedActivationFunction", 0) for n, op in zip(names, convs)}
    other = {n: a for n, a in activation.items() if a not in (0, 1)}  # 0: NONE, 1: RELU
    if other:
        name, code = next(iter(other.items()))
        raise ExportError(f"activation bias correction: the convolution {name!r} has fused activation {code} "
                          "(RELU6, RELU_N1_TO_1, TANH, ...); only none and RELU are corrected")
    relu = {n: a == 1 for n, a in activation.items()}
    float_sum, moved = {n: 0.0 for n in names}, {n: 0.0 for n in names}
    for interp in calibration_runs(reference, calibration, threads):
        index = {d["name"]: d["index"] for d in interp.get_tensor_details()}
        for n in names:
            f = interp.get_tensor(index[n])
            f = f.reshape(-1, f.shape[-1]).astype(np.float64)
            float_sum[n] = float_sum[n] + f.sum(0)
            moved[n] = moved[n] + ((f > 0).sum(0) if relu[n] else len(f))
    model = bytearray(quantised)
    biases = _quantised_biases(model, names)
    shifts, started = {}, time.time()
    # Measured on TFLite's own int8 kernels (keeping every tensor turns XNNPACK off), which round
    # as XNNPACK's do up to ties: the mean error is the same.
    for k, n in enumerate(names, 1):
        q_sum, detail = 0.0, None
        for interp in calibration_runs(bytes(model), calibration, threads):
            detail = detail or next(d for d in interp.get_tensor_details() if d["name"] == n)
            q = _dequantised(interp, detail)
            q_sum = q_sum + q.reshape(-1, q.shape[-1]).astype(np.float64).sum(0)
        view, scale = biases[n]
        steps = np.round((q_sum - float_sum[n]) / np.maximum(moved[n], 1.0) / scale)
        if not np.all(np.isfinite(steps)):
            raise ExportError(f"activation bias correction: the output of {n!r} is not finite on the calibration "
                              "inputs; nothing was corrected")
        info = np.iinfo(np.int32)
        view[:] = np.clip(view.astype(np.int64) - steps.astype(np.int64), info.min, info.max).astype(np.int32)
        shifts[n] = steps * scale
        if progress is not None and (k % 10 == 0 or k == len(names)):
            progress(f"  activation bias correction: {k}/{len(names)} convolutions ({time.time() - started:.0f} s)")
    return shifts, {"activation_correction_convolutions": len(names),
                    "activation_correction_without_bias": without_bias, "activation_correction_images": len(calibration),
                    "activation_correction_mean_steps": float(np.mean([np.abs(s / biases[n][1]).mean()
                                                                       for n, s in shifts.items()])) if shifts else 0.0}


ERROR_PROFILE_IMAGES = 8


def activation_error_profile(reference: bytes, quantised: bytes, inputs: np.ndarray, threads: int = 2) -> dict:
    """How a quantised graph's convolution outputs err against the float graph's on `inputs`: per
    output, the error's RMS relative to float's and the share of its energy that is a per-channel
    mean (a bias, which a bias can take back; the rest is noise that no bias correction
    removes). Medians and maxima over the convolutions."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    flat = fb.read_model(bytearray(reference))
    subgraph = flat.subgraphs[0]
    names = [_tensor_name(subgraph.tensors[op.outputs[0]]) for op in subgraph.operators
             if _conv_weights(flat, subgraph, op)]
    q_interp = Interpreter(model_content=bytes(quantised), num_threads=threads, experimental_preserve_all_tensors=True)
    q_run = q_interp.get_signature_runner(SIGNATURE)
    input_name = q_interp.get_signature_list()[SIGNATURE]["inputs"][0]
    q_detail = {d["name"]: d for d in q_interp.get_tensor_details()}
    names = [n for n in names if n in q_detail]
    if not names:
        raise ExportError("activation error profile: no convolution output of the float graph is in the quantised one")
    error_sum, error_energy, float_energy, count = ({n: 0.0 for n in names} for _ in range(4))
    for x, interp in zip(inputs, calibration_runs(reference, inputs, threads)):
        q_run(**{input_name: x[None]})
        index = {d["name"]: d["index"] for d in interp.get_tensor_details()}
        for n in names:
            f = interp.get_tensor(index[n])
            f = f.reshape(-1, f.shape[-1]).astype(np.float64)
            e = _dequantised(q_interp, q_detail[n]).reshape(f.shape) - f
            error_sum[n] = error_sum[n] + e.sum(0)
            error_energy[n] += float((e ** 2).sum())
            float_energy[n] += float((f ** 2).sum())
            count[n] += len(e)
    share = [float(np.sum((error_sum[n] / count[n]) ** 2) * count[n] / max(error_energy[n], 1e-300)) for n in names]
    relative = [float(np.sqrt(error_energy[n] / max(float_energy[n], 1e-300))) for n in names]
    return {"convolutions": len(names), "images": len(inputs),
            "bias_share_median": float(np.median(share)), "bias_share_max": float(np.max(share)),
            "relative_rms_error_median": float(np.median(relative)), "relative_rms_error_max": float(np.max(relative))}


def with_bias_shifts(graph: bytes, shifts: dict[str, np.ndarray]) -> bytes:
    """The float graph with `shifts[name]` subtracted from the bias of the convolution whose output
    is `name` (every name must match one)."""
    from ai_edge_litert.tools import flatbuffer_utils as fu
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    flat = fb.read_model(bytearray(graph))
    subgraph = flat.subgraphs[0]
    done = set()
    for op in subgraph.operators:
        name = _tensor_name(subgraph.tensors[op.outputs[0]]) if len(op.outputs) else None
        if name in shifts and (c := _conv_weights(flat, subgraph, op)) and c[2] is not None:
            _set_constant(flat, op, 2, c[2] - shifts[name])
            done.add(name)
    if done != set(shifts):
        raise ExportError(f"bias shifts for {sorted(set(shifts) - done)[:3]}: no such convolution with a bias")
    return bytes(fu.convert_object_to_bytearray(flat))


GPTQ_POSITIONS_PER_IMAGE = 4096
GPTQ_DAMPING = 0.01  # of the Hessian's mean diagonal, as GPTQ's reference implementation


def _patches(x: np.ndarray, shape: tuple, options, rng) -> np.ndarray:
    """Input patches of a convolution at up to GPTQ_POSITIONS_PER_IMAGE random output positions of
    one image: [positions, kh, kw, channels] (x is [1, h, w, c]; SAME padding is zeros)."""
    _, kh, kw, _ = shape
    sh, sw = options.strideH, options.strideW
    dh, dw = getattr(options, "dilationHFactor", 1) or 1, getattr(options, "dilationWFactor", 1) or 1
    h, w = x.shape[1:3]
    if options.padding == 0:  # SAME
        oh, ow = -(-h // sh), -(-w // sw)
        ph = max((oh - 1) * sh + (kh - 1) * dh + 1 - h, 0)
        pw = max((ow - 1) * sw + (kw - 1) * dw + 1 - w, 0)
        x = np.pad(x[0], ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:  # VALID
        oh, ow = (h - (kh - 1) * dh - 1) // sh + 1, (w - (kw - 1) * dw - 1) // sw + 1
        x = x[0]
    count = oh * ow
    at = np.arange(count) if count <= GPTQ_POSITIONS_PER_IMAGE else rng.choice(count, GPTQ_POSITIONS_PER_IMAGE, replace=False)
    ys = (at // ow)[:, None] * sh + np.arange(kh)[None, :] * dh
    xs = (at % ow)[:, None] * sw + np.arange(kw)[None, :] * dw
    return x[ys[:, :, None], xs[:, None, :], :]


def _patch_rows(p: np.ndarray, shape: tuple, depthwise: bool) -> np.ndarray:
    """Patches laid out as the weights' rows multiply them: [positions, kh·kw·in] for a
    convolution, [positions, kh·kw, channels] for a depthwise one (its multiplier repeated)."""
    if depthwise:
        p = np.repeat(p, shape[3] // p.shape[3], axis=3)
        return p.reshape(len(p), -1, p.shape[3])
    return p.reshape(len(p), -1)


def _weight_rows(w: np.ndarray, depthwise: bool) -> np.ndarray:
    """Weights as `_gptq` takes them, [groups, rows, d]: one group of every output channel of a
    convolution ([out, kh, kw, in]), or one group per channel of a depthwise one ([1, kh, kw, c])."""
    return w.reshape(-1, w.shape[3]).T[:, None, :] if depthwise else w.reshape(1, w.shape[0], -1)


def _from_weight_rows(rows: np.ndarray, shape: tuple, depthwise: bool) -> np.ndarray:
    """`_weight_rows` undone."""
    return rows[:, 0, :].T.reshape(shape) if depthwise else rows[0].reshape(shape)


def _gptq(w: np.ndarray, hessian: np.ndarray, scale: np.ndarray, keep_top: bool = True) -> np.ndarray:
    """GPTQ (Frantar et al. 2023) on groups of rows sharing a Hessian: w [groups, rows, d],
    hessian [groups, d, d], scale [groups, rows]. Each column is rounded to the symmetric int8
    grid in turn and its error spread over the columns not yet rounded, weighted by the inverse
    Hessian, so the layer's output error E‖(W' − W)x‖² is what is minimised, not each weight's.
    With `keep_top`, each row's largest weight is rounded to exactly ±127 steps (its original
    value), so the quantizer, which takes the scale from it, finds the same scale. Returns the
    rounded weights (on the grid: integers × scale)."""
    original = w.astype(np.float64)
    w = original.copy()
    d = w.shape[2]
    top = np.abs(original).argmax(2)
    h = hessian.astype(np.float64).copy()
    diagonal = np.diagonal(h, axis1=1, axis2=2).copy()
    # An input never seen non-zero (in the sample) has no curvature: give it some so the inverse
    # exists; its weight is then rounded to nearest and its error spread nowhere.
    for g, i in zip(*np.nonzero(diagonal <= 0)):
        h[g, i, i] = 1.0
    damping = GPTQ_DAMPING * np.maximum(np.diagonal(h, axis1=1, axis2=2).mean(1), 1e-12)
    h += damping[:, None, None] * np.eye(d)
    upper = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)  # Hinv = Uᵀ U
    s = np.where(scale > 0, scale, 1.0)
    for i in range(d):
        q = np.clip(np.round(w[:, :, i] / s), -127, 127) * s
        if keep_top:
            q = np.where(top == i, original[:, :, i], q)  # the scale-setting weight: ±127 steps exactly
        error = (w[:, :, i] - q) / upper[:, i, i][:, None]
        w[:, :, i + 1:] -= error[:, :, None] * upper[:, None, i, i + 1:]
        w[:, :, i] = q
    return w


def gptq_rounded(model: bytes, calibration: np.ndarray, threads: int = 2, kept_float: set[int] = frozenset(),
                 seed: int = 0) -> bytes:
    """The float model with every convolution's weights already on its per-channel int8 grid
    (scale max|w| / 127, as the quantizer will choose it, so quantising leaves them as they are),
    rounded by GPTQ from the Hessian of its input over the calibration images (the float graph's
    activations), then bias-corrected against the original weights: b' = b − (W' − W)·E[x]. Ops in
    `kept_float` (op indices) keep their weights and biases."""
    from ai_edge_litert.tools import flatbuffer_utils as fu
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    flat = fb.read_model(bytearray(model))
    graph = flat.subgraphs[0]
    convs = [(op, c) for i, op in enumerate(graph.operators)
             if i not in kept_float and (c := _conv_weights(flat, graph, op))]
    rng = np.random.default_rng(seed)
    hessians, means, counts = {}, {}, {}
    for interp in calibration_runs(model, calibration, threads):
        for n, (op, (name, w, _, _)) in enumerate(convs):
            a = interp.get_tensor(int(op.inputs[0]))
            p = _patch_rows(_patches(a, w.shape, op.builtinOptions, rng).astype(np.float32), w.shape,
                            name == "DEPTHWISE_CONV_2D")
            update = (p.T @ p)[None] if name == "CONV_2D" else np.einsum("pkc,pjc->ckj", p, p)
            hessians[n] = hessians.get(n, 0.0) + update.astype(np.float64)
            counts[n] = counts.get(n, 0) + len(p)
            means[n] = means.get(n, 0.0) + channel_mean(a)
    for n, (op, (name, w, b, axis)) in enumerate(convs):
        h = hessians[n] / counts[n]
        rows = _weight_rows(w, name == "DEPTHWISE_CONV_2D")
        try:
            rounded = _gptq(rows, h, np.abs(rows).max(2) / 127.0)
        except np.linalg.LinAlgError as e:
            raise ExportError(f"GPTQ: the input Hessian of {name} {fb.get_op_scope(op, graph.tensors)!r} "
                              f"is not positive definite even damped ({e}); calibrate on more images") from e
        new = _from_weight_rows(rounded, w.shape, name == "DEPTHWISE_CONV_2D")
        _set_constant(flat, op, 1, new)
        if b is not None:
            _set_constant(flat, op, 2, b - bias_shift(name, new - w, means[n] / len(calibration)))
    return bytes(fu.convert_object_to_bytearray(flat))


ADAPTATION_IMAGES = 8
ADAPTATION_RIDGE = 1.0  # × the input covariance's mean diagonal: how firmly W* is held at W (docs/QUANTISATION.md)


def _moments(a: np.ndarray, b: np.ndarray, depthwise: bool) -> tuple:
    """Sums over positions for one image's patches `a` (quantised graph) and `b` (float graph):
    Σa, Σb, ΣaᵀA, ΣaᵀB, per channel for a depthwise convolution ([positions, kh·kw, channels])."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if depthwise:
        return a.sum(0).T, b.sum(0).T, np.einsum("pkc,pjc->ckj", a, a), np.einsum("pkc,pjc->ckj", a, b)
    return a.sum(0)[None], b.sum(0)[None], (a.T @ a)[None], (a.T @ b)[None]


def adapted_weights(reference: bytes, quantised: bytes, calibration: np.ndarray, threads: int = 2,
                    kept_float: set[int] = frozenset(), seed: int = 0, progress=None) -> tuple[bytes, dict]:
    """Every convolution's int8 weights and bias refitted to the inputs it meets in the quantised
    graph, one convolution after another in graph order (GPTQ with quantised inputs, as GPTAQ
    and QDrop argue for): with x the float graph's input patches and x̂ the quantised graph's at
    the same positions (every earlier convolution already refitted), the float weights W are
    replaced by the least-squares W* = argmin E‖W*(x̂ − E x̂) − W(x − E x)‖² + λ‖W* − W‖² (λ
    ADAPTATION_RIDGE times the covariance's mean diagonal: where a few images cannot decide, W
    stays; a late convolution has more inputs than 8 images have positions), W* is rounded by
    GPTQ on the quantised inputs' covariance onto the weights' existing int8 grid, and the bias
    becomes b + W·E x − W′·E x̂. So each convolution takes back what it can predict of the error
    its inputs carry (a gain, a mean, a correlated part) instead of passing it on.

    The edits are written into the quantised graph's int8 weights and int32 biases (their scales
    and the activation ranges stay as calibrated); what comes back is that graph. Fused
    activations are not modelled: the fit is on the convolution's linear output."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    flat = fb.read_model(bytearray(reference))
    subgraph = flat.subgraphs[0]
    convs = [(op, c) for i, op in enumerate(subgraph.operators)
             if i not in kept_float and (c := _conv_weights(flat, subgraph, op))]
    names = [_tensor_name(subgraph.tensors[op.outputs[0]]) for op, _ in convs]
    model = bytearray(quantised)
    slots = _quantised_convolutions(model, names, "weight adaptation")
    # Every convolution's float input on every image, kept once (the float graph does not change).
    # Keyed by tensor: a residual 1×1 convolution and a separable branch read the same input.
    float_inputs = [{int(op.inputs[0]): interp.get_tensor(int(op.inputs[0])).copy() for op, _ in convs}
                    for interp in calibration_runs(reference, calibration, threads)]
    started, moved = time.time(), []
    for k, (n, (op, (kind, w, b, _))) in enumerate(zip(names, convs), 1):
        slot, depthwise = slots[n], kind == "DEPTHWISE_CONV_2D"
        if slot["weight_scale"].size > 1 and slot["weight_axis"] != (3 if depthwise else 0):
            raise ExportError(f"weight adaptation: the weights of {n!r} are quantised along axis "
                              f"{slot['weight_axis']}, not per output channel")
        if slot["weights"].shape != w.shape:
            raise ExportError(f"weight adaptation: the weights of {n!r} are {tuple(slot['weights'].shape)} in the "
                              f"quantised graph and {w.shape} in the float one")
        sums, count, detail = None, 0, None
        for i, (interp, floats) in enumerate(zip(calibration_runs(bytes(model), calibration, threads), float_inputs)):
            detail = detail or next((d for d in interp.get_tensor_details() if d["index"] == slot["input"]), None)
            if detail is None:
                raise ExportError(f"weight adaptation: the input of {n!r} is not a tensor of the quantised graph")
            # The same positions in both graphs: one seed per convolution and image.
            q, f = (_patch_rows(_patches(a, w.shape, op.builtinOptions, np.random.default_rng([seed, k, i])),
                                w.shape, depthwise)
                    for a in (_dequantised(interp, detail), floats[int(op.inputs[0])]))
            m = _moments(q, f, depthwise)
            sums = m if sums is None else tuple(s + t for s, t in zip(sums, m))
            count += len(q)
        mean_q, mean_f = sums[0] / count, sums[1] / count  # [groups, d]
        cov_qq = sums[2] / count - mean_q[:, :, None] * mean_q[:, None, :]
        cov_qf = sums[3] / count - mean_q[:, :, None] * mean_f[:, None, :]
        rows = _weight_rows(w, depthwise).astype(np.float64)
        ridge = ADAPTATION_RIDGE * np.maximum(np.diagonal(cov_qq, axis1=1, axis2=2).mean(1), 1e-12)
        eye = np.eye(rows.shape[2])
        # W*ᵀ = (Σq̂q̂ + λI)⁻¹ (Σq̂x Wᵀ + λ Wᵀ), per group
        target = np.linalg.solve(cov_qq + ridge[:, None, None] * eye,
                                 cov_qf @ rows.transpose(0, 2, 1) + ridge[:, None, None] * rows.transpose(0, 2, 1))
        fitted = target.transpose(0, 2, 1)
        channels = w.shape[3] if depthwise else w.shape[0]
        if slot["weight_scale"].size not in (1, channels):
            raise ExportError(f"weight adaptation: the weights of {n!r} have {slot['weight_scale'].size} scales for "
                              f"{channels} output channels")
        scale = np.broadcast_to(slot["weight_scale"], (channels,)).copy()
        scale = scale.reshape(1, -1) if not depthwise else scale.reshape(-1, 1)
        if not (np.all(np.isfinite(fitted)) and np.all(scale > 0)):
            raise ExportError(f"weight adaptation: the refit of {n!r} is not finite (or its weight scale is zero); "
                              "nothing was written")
        try:
            rounded = _gptq(fitted, cov_qq, scale, keep_top=False)
        except np.linalg.LinAlgError as e:
            raise ExportError(f"weight adaptation: the quantised input covariance of {n!r} is not positive definite "
                              f"even damped ({e}); calibrate on more images") from e
        steps = np.clip(np.round(rounded / scale[:, :, None]), -127, 127)
        new = _from_weight_rows(steps, w.shape, depthwise)
        moved.append(float(np.abs(new - slot["weights"].astype(np.float64)).mean()))
        slot["weights"][...] = new.astype(np.int8)
        if slot["bias"] is not None:
            deq = steps * scale[:, :, None]  # [groups, rows, d]
            # b' = b + W·E x − W'·E x̂, per output channel
            shift = (np.einsum("grd,gd->gr", rows, mean_f) - np.einsum("grd,gd->gr", deq, mean_q))
            shift = shift[0] if not depthwise else shift[:, 0]
            bias = (0.0 if b is None else b.astype(np.float64)) + shift
            info = np.iinfo(np.int32)
            slot["bias"][:] = np.clip(np.round(bias / slot["bias_scale"]), info.min, info.max).astype(np.int32)
        if progress is not None and (k % 10 == 0 or k == len(names)):
            progress(f"  weight adaptation: {k}/{len(names)} convolutions ({time.time() - started:.0f} s)")
    return bytes(model), {"adapted_convolutions": len(names), "adaptation_images": len(calibration),
                          "adaptation_mean_steps_moved": float(np.mean(moved)) if moved else 0.0}


EQUALISATION_MODES = ("weights", "activations")


def equalised(model: bytes, calibration: np.ndarray, mode: str = "activations", threads: int = 2) -> bytes:
    """The float model with cross-layer equalisation over every depthwise → 1×1 convolution pair
    (an Xception separable convolution: the depthwise output feeds that one convolution, with no
    activation between, or a ReLU, which commutes with a positive scale). Depthwise channel i is
    divided by s_i (weights and bias) and the pointwise convolution's input column i multiplied by
    it: the float function is unchanged. `weights` balances the two weight ranges (Nagel et al.
    2019, s_i = √(r1_i / r2_i)); `activations` balances the depthwise output's per-channel range,
    measured on the calibration images, against the pointwise column's (s_i = √(a_i / r2_i), the
    migration of SmoothQuant at α = ½): the per-tensor int8 activation between them stops being
    one wide channel's scale, which per-channel weights cannot help."""
    from ai_edge_litert.tools import flatbuffer_utils as fu
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    if mode not in EQUALISATION_MODES:
        raise ExportError(f"equalisation {mode!r}: expected one of {', '.join(EQUALISATION_MODES)}")
    flat = fb.read_model(bytearray(model))
    graph = flat.subgraphs[0]
    outputs = set(int(t) for t in graph.outputs)
    pairs = []
    for op in graph.operators:
        dw = _conv_weights(flat, graph, op)
        if dw is None or dw[0] != "DEPTHWISE_CONV_2D" or dw[2] is None:
            continue
        activation = getattr(op.builtinOptions, "fusedActivationFunction", 0)
        y = int(op.outputs[0])
        readers = [o for o in graph.operators if y in list(o.inputs)]
        if activation not in (0, 1) or y in outputs or len(readers) != 1:  # NONE or RELU only
            continue
        pw = _conv_weights(flat, graph, readers[0])
        if pw is None or pw[0] != "CONV_2D" or pw[1].shape[1:3] != (1, 1) or list(readers[0].inputs).count(y) != 1:
            continue
        pairs.append((op, dw, readers[0], pw))
    peaks = {int(op.outputs[0]): 0.0 for op, *_ in pairs}
    if mode == "activations" and pairs:
        for interp in calibration_runs(model, calibration, threads):
            for index in peaks:
                a = interp.get_tensor(index)
                peaks[index] = np.maximum(peaks[index], np.abs(a.reshape(-1, a.shape[-1])).max(0))
    for op, (_, w1, b1, _), pw_op, (_, w2, _, _) in pairs:
        column = np.abs(w2).max((0, 1, 2))  # r2_i over the pointwise outputs
        first = peaks[int(op.outputs[0])] if mode == "activations" else np.abs(w1).max((0, 1, 2))
        s = np.sqrt(np.maximum(first, 1e-12) / np.maximum(column, 1e-12))
        s = np.where((first > 0) & (column > 0), s, 1.0)
        _set_constant(flat, op, 1, w1 / s)
        _set_constant(flat, op, 2, b1 / s)
        _set_constant(flat, pw_op, 1, w2 * s)
    return bytes(fu.convert_object_to_bytearray(flat))


MSE_SAMPLES_PER_IMAGE = 4096
MSE_SCALES = np.geomspace(0.05, 1.0, 61)


def mse_ranges(model: bytes, qsvs: dict, calibration: np.ndarray, threads: int = 2, seed: int = 0) -> dict:
    """The quantizer's calibration result with every activation range chosen to minimise the
    int8 quantisation MSE (clipping plus rounding) over the calibration images' values, instead
    of the moving average of per-image min/max. Each range is the observed [min, max] scaled by
    one factor (zero stays representable); values come from a seeded sample of each tensor."""
    rng = np.random.default_rng(seed)
    tensors = None
    samples, lows, highs = {}, {}, {}
    for interp in calibration_runs(model, calibration, threads):
        if tensors is None:
            by_name = {d["name"]: d["index"] for d in interp.get_tensor_details()}
            tensors = {n: by_name[n] for n in qsvs if n in by_name}
            samples = {n: [] for n in tensors}
            lows, highs = {n: np.inf for n in tensors}, {n: -np.inf for n in tensors}
        for n, index in tensors.items():
            a = interp.get_tensor(index)
            if a.dtype != np.float32 or a.size == 0:
                continue
            flat_a = a.reshape(-1)
            flat_a = flat_a[np.isfinite(flat_a) & (np.abs(flat_a) < 3e38)]  # as the quantizer's min/max skips
            if flat_a.size == 0:
                continue
            lows[n], highs[n] = min(lows[n], float(flat_a.min())), max(highs[n], float(flat_a.max()))
            samples[n].append(flat_a[rng.integers(0, flat_a.size, min(MSE_SAMPLES_PER_IMAGE, flat_a.size))])
    chosen = dict(qsvs)
    for n, parts in samples.items():
        # Only per-tensor ranges (activations' are): a per-channel one is left as calibrated.
        if not parts or highs[n] - lows[n] <= 0 or np.size(qsvs[n]["min"]) != 1 or np.size(qsvs[n]["max"]) != 1:
            continue
        lo, hi = mse_range(np.concatenate(parts), lows[n], highs[n])
        old = qsvs[n]
        chosen[n] = {**old, "min": np.full_like(np.asarray(old["min"], np.float32), lo),
                     "max": np.full_like(np.asarray(old["max"], np.float32), hi)}
    return chosen


def int8_range_error(values: np.ndarray, lo: float, hi: float) -> float:
    """The mean squared error of asymmetric int8 (256 steps over [lo, hi], clipped outside)."""
    step = (hi - lo) / 255.0
    q = np.clip(np.round((values - lo) / step), 0, 255) * step + lo
    return float(np.mean((q - values) ** 2))


def mse_range(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """[low, high] (widened to hold 0) scaled by the factor of MSE_SCALES whose int8 error on
    `values` is least."""
    values = np.asarray(values, np.float64)
    lo, hi = min(low, 0.0), max(high, 0.0)
    best = min(MSE_SCALES, key=lambda scale: int8_range_error(values, lo * scale, hi * scale))
    return float(lo * best), float(hi * best)


def with_weight_noise(model: bytes, relative: float, seed: int = 0) -> bytes:
    """The float model with Gaussian noise on every convolution's weights, `relative` to each
    weight tensor's RMS: unbiased error of a chosen size, the yardstick for int8's."""
    from ai_edge_litert.tools import flatbuffer_utils as fu
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    flat = fb.read_model(bytearray(model))
    subgraph = flat.subgraphs[0]
    rng = np.random.default_rng(seed)
    for op in subgraph.operators:
        conv = _conv_weights(flat, subgraph, op)
        if conv is None:
            continue
        w = conv[1]
        noisy = w + rng.normal(0.0, relative * float(np.sqrt((w.astype(np.float64) ** 2).mean())), w.shape)
        _set_constant(flat, op, 1, noisy)
    return bytes(fu.convert_object_to_bytearray(flat))


def int8_weight_relative_error(model: bytes) -> float:
    """The median over convolutions of ‖Q(W) − W‖ / ‖W‖ under per-channel int8."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    flat = fb.read_model(bytearray(model))
    subgraph = flat.subgraphs[0]
    errors = [float(np.linalg.norm(int8_weight_error(c[1], c[3])) / np.linalg.norm(c[1]))
              for op in subgraph.operators if (c := _conv_weights(flat, subgraph, op))]
    return float(np.median(errors))


def load_inputs(path: Path, runner: Runner | None = None) -> tuple[np.ndarray, list[str]]:
    """Preprocessed model inputs written by `dermedge_export inputs` (an .npz: inputs, names); with
    `runner`, checked to be of its model's input shape."""
    try:
        with np.load(path) as z:
            inputs, names = z["inputs"], [str(n) for n in z["names"]]
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as e:  # TypeError, AttributeError: an .npy
        raise ExportError(f"{path}: not an inputs file from `dermedge_export inputs` ({e})") from e
    if inputs.ndim != 4 or inputs.dtype != np.float32 or len(names) != len(inputs) or len(inputs) == 0:
        raise ExportError(f"{path}: expected float32 inputs [n, h, w, c] with one name each, "
                          f"got {inputs.dtype} {list(inputs.shape)} and {len(names)} names")
    if not np.all(np.isfinite(inputs)):
        raise ExportError(f"{path}: {int(np.sum(~np.isfinite(inputs)))} input values are not finite (NaN or infinite)")
    if runner is not None and list(inputs.shape[1:]) != [int(d) for d in runner.input_detail["shape"][1:]]:
        raise ExportError(f"{path}: inputs of shape {list(inputs.shape[1:])}, but the model takes "
                          f"{[int(d) for d in runner.input_detail['shape'][1:]]} (made for another model?)")
    return inputs, names


def head_view_delta(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per image δ = ‖P(c) − P(r)‖ / ‖P(r)‖ with P(x) = x/‖x‖ − m, m the mean of the normalised
    reference rows (as dermedge-fidelity computes `head_view_delta`)."""
    if len(reference) < 2:
        raise ExportError("the head view needs at least 2 images (it is centred on their mean)")
    r = reference.astype(np.float64)
    c = candidate.astype(np.float64)
    tiny = np.finfo(np.float64).tiny
    rn = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), tiny)
    cn = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), tiny)
    m = rn.mean(0)
    delta = np.linalg.norm((cn - m) - (rn - m), axis=1) / np.maximum(np.linalg.norm(rn - m, axis=1), tiny)
    # A candidate that collapsed to zero or overflowed is as wrong as can be, never "insensitive".
    return np.where(np.isfinite(delta), delta, np.inf)


def stats(delta: np.ndarray) -> dict:
    return {"delta_median": float(np.median(delta)), "delta_p99": float(np.percentile(delta, 99)),
            "delta_mean": float(delta.mean())}


def weights_only(model: bytes) -> bytes:
    """Every weight per-channel int8, dequantised to float32 at load; float arithmetic."""
    from ai_edge_quantizer import quantizer

    q = quantizer.Quantizer(bytearray(model))
    q.load_quantization_recipe([entry(".*", "*", weight_only_config())])
    return bytes(q.quantize(enable_progress_report=False).quantized_model)


# Activation ranges: the quantizer's own (a moving average of per-image min/max), or MSE-optimal.
RANGES = ("minmax", "mse")


class Quantiser:
    """The AI Edge Quantizer on one float model, calibrated once for every recipe it makes."""

    def __init__(self, model: bytes, calibration: np.ndarray, input_name: str, activation_bits: int = 8,
                 threads: int = 2, ranges: str = "minmax"):
        from ai_edge_quantizer import quantizer

        if ranges not in RANGES:
            raise ExportError(f"activation ranges {ranges!r}: expected one of {', '.join(RANGES)}")
        self.model = model
        self.input_name = input_name
        self.activation_bits = activation_bits
        q = quantizer.Quantizer(bytearray(model))
        q.load_quantization_recipe([entry(".*", "*", static_config(activation_bits))])
        data = {SIGNATURE: [{input_name: x[None]} for x in calibration]}
        self.qsvs = q.calibrate(data, num_threads=threads)
        if ranges == "mse":
            self.qsvs = mse_ranges(model, self.qsvs, calibration, threads)

    def quantise(self, recipe: list[dict], model: bytes | None = None) -> bytes:
        """`model` (default: the calibrated one) quantised by `recipe` at the calibrated ranges."""
        from ai_edge_quantizer import quantizer

        q = quantizer.Quantizer(bytearray(self.model if model is None else model))
        q.load_quantization_recipe(recipe)
        return bytes(q.quantize(self.qsvs, enable_progress_report=False).quantized_model)

    def only(self, op: Op) -> bytes:
        return self.quantise([entry(scope_regex(op.scope), op.name, static_config(self.activation_bits))])

    def all_but(self, kept_float: list[Op], model: bytes | None = None) -> bytes:
        """Every op quantised but `kept_float`; the graph's input and output stay float32, as
        dermedge's exports are (the first and last ops quantise and dequantise)."""
        recipe = [entry(".*", "*", static_config(self.activation_bits)),
                  entry(".*", "INPUT", None), entry(".*", "OUTPUT", None)]
        recipe += [entry(scope_regex(op.scope), op.name, None) for op in kept_float]
        return self.quantise(recipe, model)


RANK_BY = "delta_mean"  # the mean counts an op that ruins a few images as well as one that shifts all


def measure(model_path: Path, calibration: Path, images: Path, out: Path, top: list[int],
            activation_bits: int = 8, threads: int = 2, reuse: bool = False, full_only: bool = False,
            variants: bool = False, progress=print) -> dict:
    """Measure every op alone, then the graph without the k most sensitive. `reuse` takes the
    per-op measurements from an earlier run's `<name>.sensitivity.json` in `out` (same model,
    images and calibration, checked) and measures only the cumulative curve; `full_only`
    measures only the graph with every op quantised."""
    model = Path(model_path).read_bytes()
    fp32 = Runner(model, threads)
    cal, _ = load_inputs(calibration, fp32)
    xs, names = load_inputs(images, fp32)
    started = time.time()
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
    if variants:
        return whole_graph_variants(model, cal, quantiser, judged, out, name, progress) | {
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
        "model": str(model_path), "model_sha256": hashlib.sha256(model).hexdigest(),
        "images": str(images), "image_count": len(xs), "calibration": str(calibration),
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


def whole_graph_variants(model: bytes, cal: np.ndarray, quantiser: "Quantiser", judged, out: Path, name: str,
                         progress=print) -> dict:
    """Where the loss comes from, graph-wide: int8 weights alone (float arithmetic), the same
    with bias correction and with GPTQ rounding, the full int8 graph with and without them, with
    MSE activation ranges and with cross-layer equalisation first, and unbiased weight noise of
    int8's size (what nearest rounding would cost if its error were unbiased)."""
    relative = int8_weight_relative_error(model)
    corrected = bias_corrected(model, spread(cal))
    gptq = gptq_rounded(model, spread(cal))

    def full(graph: bytes, ranges: str = "minmax") -> bytes:
        return Quantiser(graph, cal, quantiser.input_name, 8, ranges=ranges).all_but([])

    def equalised_then(mode: str) -> bytes:
        return full(bias_corrected(equalised(model, spread(cal), mode), spread(cal)), "mse")
    rows = [
        ("int8 weights, float arithmetic", lambda: weights_only(model)),
        ("int8 weights + bias correction, float arithmetic", lambda: weights_only(corrected)),
        ("full int8 (activations and weights)", lambda: quantiser.all_but([])),
        ("full int8 + bias correction", lambda: full(corrected)),
        ("full int8 + bias correction + MSE activation ranges", lambda: full(corrected, "mse")),
        ("int8 weights rounded by GPTQ, float arithmetic", lambda: weights_only(gptq)),
        ("full int8, GPTQ weights", lambda: full(gptq)),
        ("full int8, GPTQ weights + MSE activation ranges", lambda: full(gptq, "mse")),
        ("full int8, cross-layer equalisation (weight ranges) + bias correction + MSE ranges",
         lambda: equalised_then("weights")),
        ("full int8, cross-layer equalisation (activation ranges) + bias correction + MSE ranges",
         lambda: equalised_then("activations")),
        (f"unbiased weight noise at int8's size ({relative:.4f} of each tensor's RMS), float arithmetic",
         lambda: with_weight_noise(model, relative)),
        (f"unbiased weight noise at a quarter of it ({relative / 4:.4f})", lambda: with_weight_noise(model, relative / 4)),
    ]
    result = {"int8_weight_relative_error_median": relative, "variants": []}
    for label, make in rows:
        row = {"variant": label, **judged(make())}
        result["variants"].append(row)
        progress(f"  {label}: delta median {row['delta_median']:.3f} p99 {row['delta_p99']:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.variants.json").write_text(json.dumps(result, indent=1))
    lines = [f"# {name}: where the int8 loss comes from", "",
             f"Median relative error of per-channel int8 convolution weights: {relative:.4f}.", "",
             "| variant | δ median | δ mean | δ p99 |", "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['delta_median']:.4f} | {r['delta_mean']:.4f} | {r['delta_p99']:.4f} |"
              for r in result["variants"]]
    (out / f"{name}.variants.md").write_text("\n".join(lines) + "\n")
    return result


WEIGHT_ROUNDINGS = ("nearest", "bias-corrected", "gptq")


@dataclass(frozen=True)
class Conversion:
    """How one of the AI Edge Quantizer recipes the exporter's search converts through this venv
    (`recipes.py`, `aeq-*`) treats the float graph before quantising it, and what it quantises.
    The graph's input and output stay float32, as dermedge's exports are."""
    activation_bits: int = 8
    equalise: str | None = None  # EQUALISATION_MODES: cross-layer equalisation first
    weights: str = "nearest"  # nearest | bias-corrected | gptq (rounded by GPTQ, bias-corrected)
    ranges: str = "minmax"  # RANGES
    mixed: bool = False  # keep a sensitivity run's k most sensitive ops float
    weights_only: bool = False  # int8 weights dequantised at load, float activations and arithmetic
    activation_correction: bool = False  # biases corrected for the quantised graph's measured output error
    adapted: bool = False  # weights and biases refitted, one convolution after another, to the quantised graph's inputs

    def __post_init__(self):
        if self.activation_bits not in (8, 16):
            raise ValueError(f"activation_bits: 8 or 16, not {self.activation_bits}")
        if self.equalise is not None and self.equalise not in EQUALISATION_MODES:
            raise ValueError(f"equalise: one of {EQUALISATION_MODES}, not {self.equalise!r}")
        if self.weights not in WEIGHT_ROUNDINGS:
            raise ValueError(f"weights: one of {WEIGHT_ROUNDINGS}, not {self.weights!r}")
        if self.ranges not in RANGES:
            raise ValueError(f"ranges: one of {RANGES}, not {self.ranges!r}")
        if (self.activation_correction or self.adapted) and self.activation_bits != 8:
            raise ValueError("activation_correction and adapted edit int32 biases: int8 activations only")
        if self.activation_correction and self.adapted:
            raise ValueError("adapted refits the biases itself: not with activation_correction")
        if self.weights_only and (self.mixed or self.ranges != "minmax" or self.activation_bits != 8
                                  or self.activation_correction or self.adapted):
            raise ValueError("weights_only quantises no activation: no mixed ops, ranges, activation bits "
                             "or activation correction")


CONVERSIONS = {
    "int8": Conversion(),
    "int8-bias-corrected": Conversion(weights="bias-corrected"),
    "int8-mse": Conversion(ranges="mse"),
    "int8-bias-corrected-mse": Conversion(weights="bias-corrected", ranges="mse"),
    "int8-cle-bias-corrected-mse": Conversion(equalise="weights", weights="bias-corrected", ranges="mse"),
    "int8-gptq-mse": Conversion(weights="gptq", ranges="mse"),
    "int8-activation-corrected-mse": Conversion(weights="bias-corrected", ranges="mse", activation_correction=True),
    "int8-gptq-activation-corrected-mse": Conversion(weights="gptq", ranges="mse", activation_correction=True),
    "int8-adapted-mse": Conversion(weights="gptq", ranges="mse", adapted=True),
    "int8-weights-gptq": Conversion(weights="gptq", weights_only=True),
    "a16w8": Conversion(activation_bits=16),
    "mixed": Conversion(weights="bias-corrected", mixed=True),
    "mixed-gptq-mse": Conversion(weights="gptq", ranges="mse", mixed=True),
}


def _ranked_ops(model: bytes, model_path: Path, sensitivity: Path | None, float_ops: int,
                conversion: str = "mixed") -> list[Op]:
    """The `float_ops` most sensitive ops of `model` by a sensitivity run's ranking (its JSON)."""
    if sensitivity is None or float_ops < 1:
        raise ExportError(f"conversion {conversion}: needs --sensitivity (a sensitivity run's JSON) and --float-ops >= 1")
    try:
        measured = json.loads(Path(sensitivity).read_text())
        ranked = measured["alone"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{sensitivity}: not a sensitivity run's JSON ({e})") from e
    recorded = measured.get("model_sha256")
    if recorded is not None and recorded != hashlib.sha256(model).hexdigest():
        raise ExportError(f"{sensitivity}: measured on another file than {model_path} (sha256 differs)")
    if len(ranked) < float_ops:
        raise ExportError(f"{sensitivity}: ranks {len(ranked)} ops; --float-ops {float_ops} asks for more")
    by_scope = {op.scope: op for op in quantisable_ops(model)}
    kept = [by_scope.get(r.get("scope")) for r in ranked[:float_ops]]
    if None in kept:
        raise ExportError(f"{sensitivity}: its ops are not {model_path}'s (measured on another model?)")
    return kept


def convert(model_path: Path, calibration: Path, conversion: str, out: Path, sensitivity: Path | None = None,
            float_ops: int = 0, threads: int = 2) -> dict:
    """Write one of CONVERSIONS of the float model to `out`; returns what was done."""
    data, done, _ = converted(model_path, calibration, conversion, sensitivity, float_ops, threads)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return done


def converted(model_path: Path, calibration: Path, conversion: str, sensitivity: Path | None = None,
              float_ops: int = 0, threads: int = 2) -> tuple[bytes, dict, bytes]:
    """One of CONVERSIONS of the float model: (the quantised file's bytes, what was done, the float
    graph its activations correspond to: the model itself, or its equalised version)."""
    if conversion not in CONVERSIONS:
        raise ExportError(f"conversion {conversion!r}: expected one of {', '.join(CONVERSIONS)}")
    spec = CONVERSIONS[conversion]
    model = Path(model_path).read_bytes()
    runner = Runner(model, threads)
    cal, _ = load_inputs(calibration, runner)
    input_name = runner.input
    done = {"conversion": conversion, "calibration_count": len(cal)}
    if not spec.mixed and (sensitivity is not None or float_ops):
        raise ExportError(f"conversion {conversion}: --sensitivity and --float-ops are for the mixed conversions "
                          f"({', '.join(n for n, c in CONVERSIONS.items() if c.mixed)})")
    kept = _ranked_ops(model, model_path, sensitivity, float_ops, conversion) if spec.mixed else []
    # The ops kept float keep their weights and biases: correcting them would add the error it removes.
    kept_float = {op.index for op in kept}
    float_graph = model  # what the quantised graph is compared with, activation by activation
    if spec.equalise is not None:
        float_graph = equalised(model, spread(cal), spec.equalise, threads)
        done["equalisation"] = spec.equalise
    graph = float_graph
    if spec.weights == "bias-corrected":
        graph = bias_corrected(graph, spread(cal), threads, kept_float)
        done["bias_correction_images"] = len(spread(cal))
    elif spec.weights == "gptq":
        graph = gptq_rounded(graph, spread(cal), threads, kept_float)
        done["gptq_images"] = len(spread(cal))
    if spec.weights_only:
        data = weights_only(graph)  # nothing calibrated: the activations stay float
    else:
        quantiser = Quantiser(graph, cal, input_name, spec.activation_bits, threads, spec.ranges)
        data = quantiser.all_but(kept, graph)
        if spec.activation_correction:
            shifts, corrected = activation_bias_corrections(float_graph, data, spread(cal, ACTIVATION_CORRECTION_IMAGES),
                                                            threads, kept_float)
            data = quantiser.all_but(kept, with_bias_shifts(graph, shifts))  # the ranges stay as calibrated
            done |= corrected
        if spec.adapted:
            data, adapted = adapted_weights(float_graph, data, spread(cal, ADAPTATION_IMAGES), threads, kept_float,
                                            progress=lambda line: print(line, file=sys.stderr, flush=True))
            done |= adapted
        done["ranges"] = spec.ranges
    if kept:
        done |= {"float_ops": float_ops, "sensitivity": str(sensitivity), "kept_float": [op.scope for op in kept]}
    return data, done, float_graph


def judge(model_path: Path, calibration: Path, images: Path, out: Path, conversions: list[str], threads: int = 2,
          progress=print, reference_model: Path | None = None) -> dict:
    """Convert the float model by each of `conversions` (CONVERSIONS) into `out` and measure δ on
    `images` against the float model (or `reference_model`, when the converted one is a fine-tuned
    copy of it): `<name>.judged.{json,md}`."""
    unknown = [c or "an empty name" for c in conversions if c not in CONVERSIONS or CONVERSIONS[c].mixed]
    if unknown or not conversions:
        raise ExportError(f"--judge: expected conversions from {', '.join(n for n, c in CONVERSIONS.items() if not c.mixed)} "
                          f"(the mixed ones need a ranking: --convert), got {', '.join(unknown) or 'none'}")
    model = Path(model_path).read_bytes()
    fp32 = Runner(model, threads)
    xs, _ = load_inputs(images, fp32)
    reference = (fp32 if reference_model is None else Runner(Path(reference_model).read_bytes(), threads)).embed(xs)
    name = Path(model_path).name.split(".")[0]
    rows = []
    for conversion in conversions:
        started = time.time()
        quantised, done, float_graph = converted(model_path, calibration, conversion, threads=threads)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.{conversion}.tflite").write_bytes(quantised)
        # Against the float graph whose activations the quantised one carries (equalisation rescales channels).
        profile = activation_error_profile(float_graph, quantised, spread(xs, ERROR_PROFILE_IMAGES), threads)
        row = {"conversion": conversion, **stats(head_view_delta(Runner(quantised, threads).embed(xs), reference)),
               "activation_error": profile,
               "seconds": round(time.time() - started, 1), "done": done}
        rows.append(row)
        progress(f"  {conversion}: delta median {row['delta_median']:.3f} p99 {row['delta_p99']:.3f}")
    result = {"model": str(model_path), "reference": str(reference_model or model_path), "images": str(images),
              "image_count": len(xs),
              "calibration": str(calibration), "judged": rows}
    (Path(out) / f"{name}.judged.json").write_text(json.dumps(result, indent=1))
    lines = [f"# {name}: conversions judged on {len(xs)} images", "",
             f"The convolution outputs' error against float on {min(len(xs), ERROR_PROFILE_IMAGES)} of them: its RMS "
             "relative to float's, and the share of its energy that is a per-channel mean (medians over the "
             "convolutions).", "",
             "| conversion | δ median | δ mean | δ p99 | output error (relative RMS) | of it a bias (share) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['conversion']} | {r['delta_median']:.4f} | {r['delta_mean']:.4f} | {r['delta_p99']:.4f} | "
              f"{r['activation_error']['relative_rms_error_median']:.4f} | {r['activation_error']['bias_share_median']:.4f} |"
              for r in rows]
    (Path(out) / f"{name}.judged.md").write_text("\n".join(lines) + "\n")
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
    p.add_argument("--images", type=Path, help="inputs .npz to measure the embedding on")
    p.add_argument("--out", required=True, type=Path, help="the directory results go to (with --convert: the .tflite)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--convert", choices=CONVERSIONS, help="write this quantised model to --out instead of measuring")
    action.add_argument("--judge", help="comma-separated conversions: write each to --out and measure its delta on --images "
                                   "(<name>.judged.{json,md})")
    p.add_argument("--reference", type=Path, help="--judge: measure against this float .tflite instead of the model "
                                                 "(the original, when the model is a fine-tuned copy of it)")
    p.add_argument("--sensitivity", type=Path, help="--convert mixed*: the sensitivity run whose ranking to use")
    p.add_argument("--float-ops", type=int, default=0, help="--convert mixed*: how many of the most sensitive ops stay float")
    p.add_argument("--top", default="1,2,4,8,16,32", help="k values for 'all but the k most sensitive'")
    p.add_argument("--activation-bits", type=int, choices=[8, 16], default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse", action="store_true",
                   help="take the per-op measurements from an earlier run in --out; measure only the cumulative curve")
    p.add_argument("--full-only", action="store_true",
                   help="measure only the graph with every op quantised (nothing is written)")
    p.add_argument("--variants", action="store_true",
                   help="measure where the loss comes from graph-wide: int8 weights alone, bias correction, "
                        "GPTQ rounding, MSE activation ranges, cross-layer equalisation, unbiased weight noise "
                        "of int8's size (<name>.variants.{json,md})")
    args = p.parse_args(argv)
    try:
        top = [int(k) for k in args.top.split(",") if k.strip()]
    except ValueError:
        print(f"error: --top takes comma-separated counts, not '{args.top}'", file=sys.stderr)
        return 2
    try:
        if not args.model.is_file():
            raise ExportError(f"{args.model}: no such model file")
        if args.convert:
            print(json.dumps(convert(args.model, args.calibration, args.convert, args.out, args.sensitivity,
                                     args.float_ops, args.threads)))
            return 0
        if args.images is None:
            raise ExportError("--images is needed to measure (or give --convert)")
        if args.reference is not None and (args.judge is None or not args.reference.is_file()):
            raise ExportError(f"--reference {args.reference}: " + ("no such model file" if args.judge is not None
                                                                   else "only for --judge"))
        if args.judge is not None:
            judge(args.model, args.calibration, args.images, args.out, [c.strip() for c in args.judge.split(",")],
                  args.threads, reference_model=args.reference)
            print(f"wrote {args.out}/*.judged.{{json,md}}")
            return 0
        result = measure(args.model, args.calibration, args.images, args.out, top, args.activation_bits, args.threads,
                         args.reuse, args.full_only, args.variants)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.full_only:
        print(json.dumps(result))
    elif args.variants:
        print(f"wrote {args.out}/*.variants.{{json,md}} in {result['seconds']} s")
    else:
        print(f"wrote {args.out}/*.sensitivity.{{json,csv,md}} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
