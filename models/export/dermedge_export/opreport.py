"""What is in a .tflite file: op types, which ops run in integer and which in float, and whether
weight standardisation was folded into constants (no MEAN/RSQRT left computing on weights, and no
weights left as runtime variables)."""
from collections import Counter

from tensorflow.lite.python import schema_py_generated as schema

OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
TYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
INTEGER = {"int8", "uint8", "int16", "int32"}
WEIGHT_STAT_OPS = {"MEAN", "RSQRT", "SQUARED_DIFFERENCE", "SQRT", "SUB", "DIV", "MUL"}


def analyse(flatbuffer: bytes) -> dict:
    model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    sg = model.subgraphs[0]
    has_data = [b.data is not None and len(b.data) > 0 for b in model.buffers]
    constant = {i for i, t in enumerate(sg.tensors) if t.buffer < len(has_data) and has_data[t.buffer]}
    ops = Counter()
    where = {"int8": Counter(), "float": Counter()}
    folded_on_constants = Counter()
    on_variables = Counter()
    variable_values = set()
    for op in sg.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = OP_NAMES.get(max(code.builtinCode, code.deprecatedBuiltinCode), f"op{code.builtinCode}")
        ops[name] += 1
        inputs = [i for i in op.inputs if i >= 0]
        outputs = [o for o in op.outputs if o >= 0]
        if name == "READ_VARIABLE":
            variable_values.update(outputs)
        elif inputs and all(i in constant for i in inputs):
            folded_on_constants[name] += 1
            constant.update(outputs)
        elif inputs and all(i in constant or i in variable_values for i in inputs):
            # Computed from weights held as variables: the same work, at every invoke.
            on_variables[name] += 1
            variable_values.update(outputs)
        acts = [i for i in inputs if i not in constant] + [o for o in op.outputs if o >= 0]
        types = {TYPE_NAMES.get(sg.tensors[i].type, "?") for i in acts}
        if name in ("QUANTIZE", "DEQUANTIZE"):
            continue
        where["int8" if types and types <= INTEGER else "float"][name] += 1
    unfolded = {k: v for k, v in (folded_on_constants + on_variables).items() if k in WEIGHT_STAT_OPS}
    return {
        "op_counts": dict(sorted(ops.items())),
        "integer_ops": dict(sorted(where["int8"].items())),
        "float_ops": dict(sorted(where["float"].items())),
        "quantize_ops": ops.get("QUANTIZE", 0),
        "dequantize_ops": ops.get("DEQUANTIZE", 0),
        "ops_on_constants_only": dict(sorted(folded_on_constants.items())),
        "ops_on_variables": dict(sorted(on_variables.items())),
        "variables_read": ops.get("READ_VARIABLE", 0),
        "weight_standardisation_folded": not unfolded,
    }


def markdown(name: str, reports: dict) -> str:
    lines = [f"# Op report: {name}", ""]
    for precision, r in reports.items():
        lines += [f"## {precision}", "",
                  f"- weight standardisation folded into constants: {'yes' if r['weight_standardisation_folded'] else 'NO'}",
                  f"- weights read from runtime variables: {r['variables_read']}",
                  f"- QUANTIZE / DEQUANTIZE ops: {r['quantize_ops']} / {r['dequantize_ops']}", "",
                  "| op | count | integer | float |", "|---|---:|---:|---:|"]
        for op, n in r["op_counts"].items():
            lines.append(f"| {op} | {n} | {r['integer_ops'].get(op, 0)} | {r['float_ops'].get(op, 0)} |")
        lines.append("")
    return "\n".join(lines)
