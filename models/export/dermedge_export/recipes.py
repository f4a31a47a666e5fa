"""`export --target-fidelity`: try export recipes in order of cost and keep the fastest one whose
output passes dermedge's fidelity gates.

Each recipe is converted (from the core SavedModel by TensorFlow's converter, or from the fp32
export by the AI Edge Quantizer in its own venv: the `aeq-*` recipes), written with a dermedge
manifest, timed with `dermedge bench embed` alternately with the plain int8 file (same threads,
same moment, so a shared machine's load cancels out in the ratio), its Cortex-A76 time estimated
(costmodel.py), and judged with `dermedge fidelity` against the fp32 export on a validation set
disjoint from calibration (only a recipe over 8x the plain file here is left unjudged). The
fastest passing recipe within the latency budget on the A76 estimate, else the fastest passing
one (said over budget), is copied to `<name>.<precision>-faithful.{tflite,toml}`; every tried
recipe, with its fidelity, size and latency, goes to `<name>.recipes.json` and `.md`. When none
passes, nothing is copied: the table shows the best trade-off reached, and the gates stay as they
are.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from . import correction, costmodel
from .errors import ExportError
from .manifest import Preprocessing, sha256, write_manifest
from .options import ROOT
from .runner import delegation, run_tflite

GATE_KEYS = ("centred_cosine_p1", "head_view_delta_p99", "sqnr_db_p1", "top10_overlap_mean", "self_retrieval",
             "head_agreement")


@dataclass
class Recipe:
    name: str
    precision: str  # the manifest's precision
    how: str
    convert: Callable[[], bytes] = field(repr=False)
    # Fit a per-dimension output correction (correction.py) on the calibration images and ship
    # it in the manifest.
    corrected: bool = False
    # The float .tflite converted when it is not the fp32 export (a fine-tuned copy); its path and
    # checksum go into the manifest's provenance.
    source: Path | None = None


@dataclass
class Context:
    core_dir: Path
    # The same graph with Square / SquaredDifference rewritten as MUL (see export.integer_friendly);
    # None when the graph has none.
    integer_core_dir: Path | None
    name: str
    version: str
    out: Path
    pre: Preprocessing
    dim: int
    cal_inputs: list
    plain_int8: Path
    fp32_manifest: Path
    fp32_tflite: Path
    layer_errors: Path
    debug_count: int
    dermedge: str
    validation: Path
    holdout: Path | None
    threads: int
    latency_budget: float
    bench_runs: int
    progress: Callable[[str], None] = print
    # Recipe names to try (None: all). The plain export is always tried: it is the timing baseline.
    only: tuple[str, ...] | None = None
    # What several recipes need and is made once: a conversion a recipe shares with its
    # corrected twin, the fp32 export's outputs on the calibration samples.
    shared: dict = field(default_factory=dict)
    # A per-layer sensitivity run of the fp32 export (sensitivity.py): offers aeq-mixed-*.
    sensitivity: Path | None = None
    # A quantisation-aware fine-tuning run's float .tflite (qat.py): offers aeq-int8-qat-mse.
    qat: Path | None = None


def _converter(ctx: Context, integer_friendly: bool = False):
    core = ctx.integer_core_dir if integer_friendly else ctx.core_dir
    return tf.lite.TFLiteConverter.from_saved_model(str(core), signature_keys=["serving_default"])


def _full_int8(ctx: Context, samples: list, builtins_fallback: bool = False, integer_friendly: bool = False):
    conv = _converter(ctx, integer_friendly)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x] for x in samples)
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if builtins_fallback:
        ops.append(tf.lite.OpsSet.TFLITE_BUILTINS)
    conv.target_spec.supported_ops = ops
    conv.inference_input_type = tf.float32
    conv.inference_output_type = tf.float32
    return conv


def augmented(samples: list) -> list:
    """Each calibration image and its flips and 90-degree rotation: the same sources, 4x the
    activation statistics (skin has no canonical orientation)."""
    out = []
    for x in samples:
        out += [x, x[:, :, ::-1, :].copy(), x[:, ::-1, :, :].copy()]
        if x.shape[1] == x.shape[2]:  # a rotation of a non-square input is another shape
            out.append(np.rot90(x, axes=(1, 2)).copy())
    return out


def worst_layers(layer_errors: Path, k: int) -> list[str]:
    """The k tensors with the largest RMSE relative to their quantisation step (TensorFlow's
    QuantizationDebugger statistics, as the exporter dumps them)."""
    with layer_errors.open() as f:
        rows = list(csv.DictReader(f))
    scored = []
    for r in rows:
        try:
            scale = float(r["scale"])
            mse = float(r["mean_squared_error"])
        except (KeyError, ValueError):
            continue
        if scale > 0 and np.isfinite(mse):
            scored.append((np.sqrt(mse) / scale, r["tensor_name"]))
    scored.sort(reverse=True)
    return [name for _, name in scored[:k]]


def _selective(ctx: Context, k: int) -> bytes:
    if not ctx.layer_errors.is_file():
        raise ExportError(f"{ctx.layer_errors}: no per-layer error statistics to pick layers from "
                          "(the export ran with --debug-count 0)")
    denylist = worst_layers(ctx.layer_errors, k)
    if not denylist:
        raise ExportError(f"{ctx.layer_errors}: no per-layer statistics to pick layers from")
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=denylist)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=_full_int8(ctx, ctx.cal_inputs, builtins_fallback=True),
        debug_dataset=lambda: ([x] for x in ctx.cal_inputs[: ctx.debug_count]),
        debug_options=options)
    return debugger.get_nondebug_quantized_model()


# The per-op-type ablation: op types quantised at each step, cumulatively; every other op type
# stays float. The last step (everything) is the plain export.
ABLATION_STEPS = {
    "ablation-conv": {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"},
    "ablation-conv-add": {"ADD"},
    "ablation-conv-add-norm": {"MUL", "SUB", "DIV", "RSQRT", "SQUARE", "SQUARED_DIFFERENCE", "RELU", "RELU6"},
}
POOLING = {"MEAN", "MAX_POOL_2D", "AVERAGE_POOL_2D"}


def ablation_quantised(step: str) -> set[str]:
    """The op types quantised at `step`: its own and those of the steps before it."""
    names = list(ABLATION_STEPS)
    return set().union(*(ABLATION_STEPS[n] for n in names[:names.index(step) + 1]))


def ablation_denylist(step: str) -> list[str]:
    """The op types kept in float at `step`: those of later steps, and pooling."""
    return sorted(set().union(*ABLATION_STEPS.values()) - ablation_quantised(step) | POOLING)


def _ablation(ctx: Context, step: str) -> bytes:
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=ablation_denylist(step))
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=_full_int8(ctx, ctx.cal_inputs, builtins_fallback=True),
        debug_dataset=lambda: ([x] for x in ctx.cal_inputs[: max(ctx.debug_count, 1)]),
        debug_options=options)
    return debugger.get_nondebug_quantized_model()


def _dynamic_range(ctx: Context) -> bytes:
    conv = _converter(ctx)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    return conv.convert()


def _int16x8(ctx: Context) -> bytes:
    # 16x8 has no SQUARE kernel either: use the integer-friendly graph when there is one.
    conv = _converter(ctx, integer_friendly=ctx.integer_core_dir is not None)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([x] for x in ctx.cal_inputs)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    conv.inference_input_type = tf.float32
    conv.inference_output_type = tf.float32
    return conv.convert()


def _once(ctx: Context, key: str, make: Callable[[], object]):
    """`make()` once per search; a failure is kept too, so a twin recipe fails at once with it."""
    if key not in ctx.shared:
        try:
            ctx.shared[key] = make()
        except ExportError as e:
            ctx.shared[key] = e
    if isinstance(ctx.shared[key], ExportError):
        raise ctx.shared[key]
    return ctx.shared[key]


def _fp16(ctx: Context) -> bytes:
    conv = _converter(ctx)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    return conv.convert()


# A conversion of a full-size model (df-r101x3, 1.5 GB) calibrates for tens of minutes here.
QUANTIZER_TIMEOUT_S = 3 * 3600


def _quantizer(ctx: Context, conversion: str, *extra: str, source: Path | None = None) -> bytes:
    """A conversion by the AI Edge Quantizer (sensitivity.CONVERSIONS), run in its own venv
    (it pins another LiteRT) on the fp32 export (or `source`, a fine-tuned copy of it), calibrated
    on the same images as every recipe."""
    def calibration() -> Path:
        path = ctx.out / "recipes" / f"{ctx.name}.calibration-inputs.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, inputs=np.concatenate(ctx.cal_inputs), names=np.array([str(i) for i in range(len(ctx.cal_inputs))]))
        return path

    cal = _once(ctx, "calibration-npz", calibration)
    out = ctx.out / "recipes" / f"{ctx.name}.{conversion}{''.join(extra[-1:])}{'.qat' if source else ''}.aeq.tflite"
    cmd = ["bash", str(ROOT / "scripts" / "python-env.sh"), "--venv", "quantizer", "-m", "dermedge_export.sensitivity",
           str(source or ctx.fp32_tflite), "--calibration", str(cal), "--convert", conversion, "--out", str(out), *extra]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=QUANTIZER_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise ExportError(f"the AI Edge Quantizer's {conversion} conversion took over {QUANTIZER_TIMEOUT_S} s") from e
    if done.returncode != 0 or not out.is_file():
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise ExportError(f"the AI Edge Quantizer's {conversion} conversion failed: {reason[0][:300]} "
                          f"(command: {' '.join(cmd)})")
    data = out.read_bytes()
    out.unlink()
    return data


def fit_correction(ctx: Context, tflite: Path, path: Path) -> dict:
    """Fit the output correction of `tflite` against the fp32 export on the calibration images
    and their flips and rotation (4x the samples, none of them validation images); write it to
    `path`. Returns what the fit did on those samples."""
    samples = augmented(ctx.cal_inputs)
    reference = _once(ctx, "fp32-calibration-outputs", lambda: run_tflite(ctx.fp32_tflite, samples))
    candidate = run_tflite(tflite, samples)
    scale, offset = correction.fit_affine(candidate, reference)
    correction.write(path, scale, offset)
    before = float(np.mean(np.linalg.norm(candidate - reference, axis=1) / np.linalg.norm(reference, axis=1)))
    fitted = correction.apply(candidate, scale, offset)
    after = float(np.mean(np.linalg.norm(fitted - reference, axis=1) / np.linalg.norm(reference, axis=1)))
    return {"samples": len(samples), "relative_error_before": round(before, 4), "relative_error_after": round(after, 4),
            "scale_median": float(np.median(scale))}


def selected(ctx: Context) -> list[Recipe]:
    every = recipes(ctx)
    if ctx.only is None:
        return every
    offered = {r.name for r in every}
    missing = [n for n in ctx.only if n not in offered]
    if missing:
        why = {n: "needs --sensitivity (a per-layer sensitivity run)" if n.startswith("aeq-mixed-")
               else "needs --qat (a quantisation-aware fine-tuning run)" if n.startswith("aeq-int8-qat-mse")
               else "needs a graph with Square / SquaredDifference" for n in missing}
        raise ExportError("recipes not offered for this model: " + "; ".join(f"{n} {w}" for n, w in why.items()))
    return [r for r in every if r.name == "int8-plain" or r.name in ctx.only]


def recipes(ctx: Context) -> list[Recipe]:
    """In order of expected cost on a CPU: full-integer first, float islands after, wider types last.
    Their names are options.RECIPE_NAMES, which `--recipes` is checked against."""
    n = len(ctx.cal_inputs)

    def calibration_x4() -> bytes:
        return _once(ctx, "calibration-x4", lambda: _full_int8(ctx, augmented(ctx.cal_inputs)).convert())

    integer = []
    if ctx.integer_core_dir is not None:
        integer = [Recipe("int8-integer-groupnorm", "int8",
                          f"full-integer int8 with Square / SquaredDifference rewritten as MUL, so normalisation "
                          f"layers run in integer arithmetic end to end; {n} calibration images",
                          lambda: _full_int8(ctx, ctx.cal_inputs, integer_friendly=True).convert())]
    return [
        Recipe("int8-plain", "int8", f"full-integer int8, per-channel weights, {n} calibration images (the plain export)",
               lambda: ctx.plain_int8.read_bytes()),
        *integer,
        *[Recipe(step, "int8", f"ablation: only {', '.join(sorted(ablation_quantised(step)))} quantised to int8; "
                 "every other op type float", lambda step=step: _ablation(ctx, step))
          for step in ABLATION_STEPS],
        Recipe("int8-affine", "int8",
               f"the plain export with a per-dimension output correction (y = x * scale + offset) fitted against "
               f"the fp32 export on {4 * n} calibration samples (each image, its flips and a rotation)",
               lambda: ctx.plain_int8.read_bytes(), corrected=True),
        Recipe("int8-calibration-x4", "int8",
               f"full-integer int8, per-channel weights, {4 * n} calibration samples (each image, its two flips "
               "and a 90-degree rotation)",
               calibration_x4),
        Recipe("int8-calibration-x4-affine", "int8",
               "int8-calibration-x4 with the per-dimension output correction of int8-affine", calibration_x4,
               corrected=True),
        Recipe("int8-selective-5", "int8",
               "int8 with the 5 tensors of largest quantisation error (RMSE / step) kept in float",
               lambda: _selective(ctx, 5)),
        Recipe("int8-selective-20", "int8",
               "int8 with the 20 tensors of largest quantisation error (RMSE / step) kept in float",
               lambda: _selective(ctx, 20)),
        Recipe("dynamic-range-int8", "dynamic-int8",
               "int8 weights, float activations (weights dequantised or hybrid kernels at run time)",
               lambda: _dynamic_range(ctx)),
        Recipe("fp16", "fp16", "float16 weights, float32 arithmetic (XNNPACK unpacks the weights to float32 once, "
               "at load): half the fp32 file, the fp32 model's speed", lambda: _fp16(ctx)),
        Recipe("int16x8", "int16x8", "int16 activations, int8 weights", lambda: _int16x8(ctx)),
        *aeq_recipes(ctx),
    ]


def aeq_recipes(ctx: Context) -> list[Recipe]:
    """The AI Edge Quantizer's recipes, converted from the fp32 export (not the SavedModel)."""
    n = len(ctx.cal_inputs)

    def bias_corrected() -> bytes:
        return _once(ctx, "aeq-int8-bias-corrected", lambda: _quantizer(ctx, "int8-bias-corrected"))

    mixed = []
    if ctx.sensitivity is not None:
        for conversion, base in (("mixed", "aeq-int8-bias-corrected"), ("mixed-gptq-mse", "aeq-int8-gptq-mse")):
            mixed += [Recipe(f"aeq-{conversion}-{k}", "int8",
                             f"{base} with the {k} ops most sensitive on the final embedding kept float "
                             f"({ctx.sensitivity.name}); {n} calibration images",
                             lambda k=k, c=conversion: _quantizer(ctx, c, "--sensitivity", str(ctx.sensitivity),
                                                                  "--float-ops", str(k)))
                      for k in (8, 32)]
    qat = []
    if ctx.qat is not None:
        def fine_tuned() -> bytes:
            return _once(ctx, "qat-int8-mse", lambda: _quantizer(ctx, "int8-mse", source=ctx.qat))

        qat = [Recipe("aeq-int8-qat-mse", "int8",
                      f"int8 with MSE activation ranges and nearest-rounded weights, converted from a copy of the "
                      f"model fine-tuned with int8 rounding in its forward pass towards its own float embeddings "
                      f"({ctx.qat}; dermedge_export.qat), judged against the original fp32 export; "
                      f"{n} calibration images", fine_tuned, source=ctx.qat),
               Recipe("aeq-int8-qat-mse-affine", "int8",
                      "aeq-int8-qat-mse with the per-dimension output correction of int8-affine, fitted against "
                      "the original fp32 export", fine_tuned, corrected=True, source=ctx.qat)]
    return [
        Recipe("aeq-int8", "int8", f"AI Edge Quantizer int8 (min/max ranges, per-channel weights); {n} calibration images",
               lambda: _quantizer(ctx, "int8")),
        Recipe("aeq-int8-bias-corrected", "int8",
               "aeq-int8 on the graph with every convolution's bias corrected for its int8 weights' error "
               "(b' = b - (Q(W) - W) E[x], E[x] measured on 16 calibration images spread over the set), "
               "ranges calibrated on the corrected graph", bias_corrected),
        Recipe("aeq-int8-bias-corrected-affine", "int8",
               "aeq-int8-bias-corrected with the per-dimension output correction of int8-affine", bias_corrected,
               corrected=True),
        Recipe("aeq-int8-bias-corrected-mse", "int8",
               "aeq-int8-bias-corrected with each activation's range chosen to minimise its int8 error (clipping "
               "plus rounding) on the calibration images, not the moving average of per-image min/max",
               lambda: _quantizer(ctx, "int8-bias-corrected-mse")),
        Recipe("aeq-int8-cle-bias-corrected-mse", "int8",
               "aeq-int8-bias-corrected-mse after cross-layer equalisation of every depthwise -> 1x1 convolution "
               "pair (weight ranges balanced, Nagel et al. 2019; the float function unchanged)",
               lambda: _quantizer(ctx, "int8-cle-bias-corrected-mse")),
        Recipe("aeq-int8-gptq-mse", "int8",
               "int8 with every convolution's weights rounded by GPTQ (each column's rounding error spread over "
               "the rest by the inverse Hessian of the layer's input, 16 calibration images) and bias-corrected; "
               "MSE activation ranges", lambda: _quantizer(ctx, "int8-gptq-mse")),
        Recipe("aeq-int8-activation-corrected-mse", "int8",
               "aeq-int8-bias-corrected-mse, then every convolution's bias moved by its output's mean error in the "
               "quantised graph against float's (8 calibration images), one convolution after another in graph "
               "order, each measured with the earlier ones corrected (empirical bias correction)",
               lambda: _quantizer(ctx, "int8-activation-corrected-mse")),
        Recipe("aeq-int8-gptq-activation-corrected-mse", "int8",
               "aeq-int8-gptq-mse with the empirical bias correction of aeq-int8-activation-corrected-mse",
               lambda: _quantizer(ctx, "int8-gptq-activation-corrected-mse")),
        Recipe("aeq-int8-adapted-mse", "int8",
               "aeq-int8-gptq-mse, then every convolution's weights and bias refitted to the inputs it meets in the "
               "quantised graph (least squares against float's output, held at the float weights by a ridge, "
               "rounded by GPTQ on the quantised inputs; 8 calibration images), one convolution after another",
               lambda: _quantizer(ctx, "int8-adapted-mse")),
        Recipe("aeq-int8-weights-gptq", "dynamic-int8",
               "int8 weights rounded by GPTQ and bias-corrected, dequantised to float32 at load; float "
               "activations and arithmetic (fp32's speed, or fp16 arithmetic's with cpu_arithmetic = \"fp16\"), "
               "a quarter of the fp32 file", lambda: _quantizer(ctx, "int8-weights-gptq")),
        *mixed,
        *qat,
        Recipe("aeq-a16w8", "int16x8", "AI Edge Quantizer int16 activations, int8 weights",
               lambda: _quantizer(ctx, "a16w8")),
    ]


def runtime_env() -> dict:
    """The environment for the dermedge binary: a release build searches no build-tree path for
    its runtime, so point it at the pinned one in the repository cache (what
    scripts/litert-env.sh does) unless the caller already chose one."""
    env = dict(os.environ)
    if "DERMEDGE_LITERT_LIB" not in env:
        done = subprocess.run(["bash", "-c", 'source scripts/litert-env.sh "" && echo "$DERMEDGE_LITERT_LIB"'],
                              cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0 or not done.stdout.strip():
            raise ExportError(f"scripts/litert-env.sh could not name the runtime: {done.stderr.strip()[-300:]}")
        env["DERMEDGE_LITERT_LIB"] = done.stdout.strip()
    return env


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=runtime_env())


def bench(ctx: Context, manifest: Path) -> dict:
    with_json = ctx.out / "recipes" / f"{manifest.stem}.bench.json"
    cmd = [ctx.dermedge, "bench", "embed", "--model", str(manifest), "--images", str(ctx.validation),
           "--runs", str(ctx.bench_runs), "--warmup", "1", "--threads", str(ctx.threads), "--json", str(with_json)]
    done = _run(cmd)
    if done.returncode != 0:
        raise ExportError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    result = json.loads(with_json.read_text())[0]
    return {"invoke_s": list(dict(result["stages"])["invoke"]), "peak_rss_bytes": result["peak_rss_bytes"]}


def side_by_side(ctx: Context, manifest: Path, plain: Path, rounds: int = 2) -> dict:
    """Time `manifest` and the plain int8 export alternately, so both see the same machine load;
    the ratio of their medians is what the latency budget judges."""
    mine, base, rss = [], [], 0
    for _ in range(rounds):
        b = bench(ctx, plain)
        m = bench(ctx, manifest)
        base += b["invoke_s"]
        mine += m["invoke_s"]
        rss = max(rss, m["peak_rss_bytes"])
    return {"invoke_median_s": float(np.median(mine)), "plain_int8_median_s": float(np.median(base)),
            "latency_vs_plain_int8": round(float(np.median(mine) / np.median(base)), 3), "peak_rss_bytes": rss}


def fidelity(ctx: Context, manifest: Path, images: Path, report: Path) -> dict:
    # A report left by an earlier run must never be read as this one's verdict.
    shutil.rmtree(report, ignore_errors=True)
    cmd = [ctx.dermedge, "fidelity", "--threads", str(ctx.threads), "--reference", str(ctx.fp32_manifest),
           "--candidate", str(manifest), "--images", str(images), "--report", str(report)]
    done = _run(cmd)
    path = report / "report.json"
    if done.returncode not in (0, 1) or not path.is_file():
        raise ExportError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    data = json.loads(path.read_text())
    gates = {g["gate"]: {"value": g["value"], "pass": g["pass"], "min": g.get("min"), "max": g.get("max")}
             for g in data["gates"]}
    return {"verdict": data["verdict"], "gates": gates, "report": str(report)}


# A recipe this much slower than the plain int8 export is timed but not judged: at 62x (int16x8 on
# lesion-x448, 16 s an image) judging 300 validation images would take 80 minutes, for a file no
# device would run at that speed.
TOO_SLOW_TO_JUDGE = 8.0


def search(ctx: Context) -> dict:
    work = ctx.out / "recipes"
    work.mkdir(parents=True, exist_ok=True)
    remove_faithful(ctx)
    tried = []
    plain_manifest = None  # the first recipe's (the plain export's) manifest
    plain_estimate = None
    for recipe in selected(ctx):
        entry = {"recipe": recipe.name, "precision": recipe.precision, "how": recipe.how}
        ctx.progress(f"[{ctx.name}] recipe {recipe.name}: converting")
        started = time.time()
        try:
            model = recipe.convert()
        except Exception as e:  # a recipe the converter cannot make is a result, not a crash
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            entry["error"] = f"conversion failed: {type(e).__name__}: {first_line[:300]}"
            tried.append(entry)
            ctx.progress(f"[{ctx.name}] recipe {recipe.name}: {entry['error']}")
            continue
        try:
            tflite, manifest = write_recipe(ctx, recipe, model, work, entry)
            entry["convert_s"] = round(time.time() - started, 1)
            entry["delegation"] = delegation(tflite, ctx.threads)
            estimate = costmodel.estimate(model, ctx.threads, outside=set(entry["delegation"]["outside"]))
        except Exception as e:  # one recipe that cannot be written or read back ends only itself
            if recipe.name == "int8-plain":
                raise
            entry["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
            tried.append(entry)
            ctx.progress(f"[{ctx.name}] recipe {recipe.name}: {entry['error']}")
            continue
        plain_estimate = plain_estimate or estimate["seconds"]
        entry["a76_estimate"] = estimate
        entry["a76_vs_plain_int8"] = round(estimate["seconds"] / plain_estimate, 3)
        # The budget is judged where the device runs: on the Cortex-A76 estimate.
        entry["within_budget"] = entry["a76_vs_plain_int8"] <= ctx.latency_budget
        ctx.progress(f"[{ctx.name}] recipe {recipe.name}: timing, side by side with the plain int8 export")
        plain_manifest = plain_manifest or manifest
        try:
            entry.update(side_by_side(ctx, manifest, plain_manifest))
            if entry["latency_vs_plain_int8"] > TOO_SLOW_TO_JUDGE:
                entry["fidelity"] = None
                entry["skipped"] = (f"not judged: {entry['latency_vs_plain_int8']:.2f}x the plain int8 latency, over "
                                    f"{TOO_SLOW_TO_JUDGE}x")
            else:
                ctx.progress(f"[{ctx.name}] recipe {recipe.name}: fidelity on {ctx.validation}")
                entry["fidelity"] = fidelity(ctx, manifest, ctx.validation, work / f"fidelity-{recipe.name}")
        except ExportError as e:  # a file dermedge cannot run is a result too, not the end of the search
            if recipe.name == "int8-plain":
                raise
            entry["error"] = f"does not run in dermedge: {str(e)[-300:]}"
            ctx.progress(f"[{ctx.name}] recipe {recipe.name}: {entry['error']}")
            tried.append(entry)
            continue
        tried.append(entry)
        ctx.progress(f"[{ctx.name}] recipe {recipe.name}: {summary_line(entry)}")

    result = {"validation": str(ctx.validation), "threads": ctx.threads, "latency_budget": ctx.latency_budget,
              "dermedge": ctx.dermedge, "recipes": tried, **choose(tried)}
    chosen = next((t for t in tried if t["recipe"] == result["chosen"]), None)
    if chosen:
        held_out = None
        if ctx.holdout:
            ctx.progress(f"[{ctx.name}] chosen {chosen['recipe']}: fidelity on the held-out {ctx.holdout}")
            held_out = fidelity(ctx, work / f"{ctx.name}.{chosen['recipe']}.toml", ctx.holdout,
                                ctx.out / f"fidelity-{chosen['recipe']}-holdout")
            result["holdout"] = held_out
        if held_out is None or held_out["verdict"] == "PASS":
            selection = ("the fastest recipe passing the gates, over the latency budget "
                         f"({chosen['a76_vs_plain_int8']:.2f}x the plain int8 export on the Cortex-A76 estimate)"
                         if result.get("over_budget") else "the fastest recipe passing the gates within the latency budget")
            faithful = keep_faithful(ctx, work, chosen, selection)
            result["faithful"] = faithful.name
        else:
            result["faithful"] = None
            result["chosen_failed_holdout"] = True
    (ctx.out / f"{ctx.name}.recipes.json").write_text(json.dumps(result, indent=1) + "\n")
    (ctx.out / f"{ctx.name}.recipes.md").write_text(markdown(ctx.name, result))
    (ctx.out / f"{ctx.name}.frontier.svg").write_text(frontier_svg(ctx.name, result))
    return result


def refresh(out: Path, name: str, threads: int = 2) -> dict:
    """Recompute every tried recipe's delegation and Cortex-A76 estimate from its file in
    `out/recipes/` (after a cost-model change, say) and rewrite the search's JSON, Markdown and
    frontier; the measured latencies and fidelity stay as the search recorded them."""
    path = out / f"{name}.recipes.json"
    result = json.loads(path.read_text())
    plain = None
    for entry in result["recipes"]:
        tflite = out / "recipes" / entry.get("file", "")
        if "error" in entry or not tflite.is_file():
            continue
        entry["delegation"] = delegation(tflite, threads)
        entry["a76_estimate"] = costmodel.estimate(tflite.read_bytes(), threads,
                                                   outside=set(entry["delegation"]["outside"]))
        plain = plain or entry["a76_estimate"]["seconds"]
        entry["a76_vs_plain_int8"] = round(entry["a76_estimate"]["seconds"] / plain, 3)
        entry["within_budget"] = entry["a76_vs_plain_int8"] <= result["latency_budget"]
    path.write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.recipes.md").write_text(markdown(name, result))
    (out / f"{name}.frontier.svg").write_text(frontier_svg(name, result))
    return result


def merged(outs: list[Path], name: str) -> dict:
    """Several searches' results (`<name>.recipes.json` in each --out) as one, for one frontier:
    each recipe as the first search that judged it recorded it; the first search's budget."""
    result, seen = None, set()
    for out in outs:
        path = Path(out) / f"{name}.recipes.json"
        try:
            one = json.loads(path.read_text())
            tried = one["recipes"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExportError(f"{path}: not a finished search's result ({e})") from e
        result = result or {**one, "recipes": []}
        for entry in tried:
            if entry.get("recipe") not in seen:
                seen.add(entry.get("recipe"))
                result["recipes"].append(entry)
    if result is None:
        raise ExportError("no search to merge")
    return result


def frontier_svg(name: str, result: dict) -> str:
    """Fidelity against latency for every judged recipe: head-view δ p99 (log scale; the gate at
    0.33) over the Cortex-A76 estimate relative to the plain int8 export (the budget marked). A
    recipe without a finite latency has no place on it; a δ that is not finite (a broken file's
    NaN) is drawn at the top, as the worst."""
    points = [(t["recipe"], t["a76_vs_plain_int8"], t["fidelity"]["gates"]["head_view_delta_p99"]["value"],
               t["fidelity"]["verdict"]) for t in result["recipes"]
              if t.get("fidelity") and np.isfinite(t.get("a76_vs_plain_int8", np.nan))
              and (t["fidelity"]["gates"].get("head_view_delta_p99") or {}).get("value")]
    width, left, bottom, top, right = 900, 70, 50, 30, 330
    height = max(480, top + 12 * (len(points) + 1) + 4)  # tall enough for the label column
    xs = [p[1] for p in points] + [result["latency_budget"], 1.0]
    x_max = max(xs) * 1.1
    y_lo, y_hi = -3.0, 1.0  # log10 of δ: 0.001 to 10

    def x(v):
        return left + (width - left - right) * v / x_max

    def y(v):
        ly = min(max(np.log10(max(v, 1e-3)), y_lo), y_hi) if np.isfinite(v) else y_hi
        return top + (height - top - bottom) * (y_hi - ly) / (y_hi - y_lo)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="18" font-size="13">{name}: fidelity against latency, every judged recipe</text>',
           f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>']
    for decade in range(int(y_lo), int(y_hi) + 1):
        out.append(f'<text x="{left - 8}" y="{y(10.0 ** decade) + 4:.1f}" text-anchor="end">{10.0 ** decade:g}</text>')
    for tick in np.linspace(0, x_max, 6):
        out.append(f'<text x="{x(tick):.1f}" y="{height - bottom + 16}" text-anchor="middle">{tick:.1f}x</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 10}" text-anchor="middle">Cortex-A76 estimate, '
               'relative to the plain int8 export</text>')
    out.append(f'<text x="16" y="{(top + height - bottom) / 2}" transform="rotate(-90 16 {(top + height - bottom) / 2})" '
               'text-anchor="middle">head-view δ p99 (log)</text>')
    gate = 0.33
    out.append(f'<line x1="{left}" y1="{y(gate):.1f}" x2="{width - right}" y2="{y(gate):.1f}" stroke="green" '
               f'stroke-dasharray="4 3"/><text x="{left + 4}" y="{y(gate) - 4:.1f}" fill="green">gate δ p99 ≤ 0.33</text>')
    budget = result["latency_budget"]
    out.append(f'<line x1="{x(budget):.1f}" y1="{top}" x2="{x(budget):.1f}" y2="{height - bottom}" stroke="gray" '
               f'stroke-dasharray="4 3"/><text x="{x(budget) + 4:.1f}" y="{top + 10}" fill="gray">budget {budget}x</text>')
    # Labels in one column right of the plot, in the order of their points' height, each as near
    # its point's height as the ones above it allow and joined to it by a line: many recipes sit
    # at the same latency, where labels beside the points would cover each other.
    marks = sorted(((x(lat), y(delta), recipe, lat, delta, verdict) for recipe, lat, delta, verdict in points),
                   key=lambda m: (m[1], m[0]))
    column, line = width - right + 24, 12
    baselines = []
    for _, cy, *_ in marks:
        baselines.append(max(cy + 4, baselines[-1] + line) if baselines else cy + 4)
    overflow = (baselines[-1] - (height - 4)) if baselines else 0
    if overflow > 0:  # the column ran off the bottom: lift it, keeping the lines apart
        baselines = [max(b - overflow, top + line * (i + 1)) for i, b in enumerate(baselines)]
    for (cx, cy, recipe, lat, delta, verdict), ly in zip(marks, baselines):
        colour = "green" if verdict == "PASS" else "firebrick"
        out.append(f'<line x1="{cx + 4:.1f}" y1="{cy:.1f}" x2="{column - 4}" y2="{ly - 4:.1f}" stroke="{colour}" '
                   'stroke-opacity="0.35" stroke-width="0.8"/>')
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="{colour}"><title>{recipe}: '
                   f'{lat:.2f}x, δ p99 {delta:.3f}, {verdict}</title></circle>')
        out.append(f'<text x="{column}" y="{ly:.1f}">{recipe}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_recipe(ctx: Context, recipe: Recipe, model: bytes, work: Path, entry: dict) -> tuple[Path, Path]:
    """Write a converted recipe's .tflite, its fitted correction when it has one, and its
    manifest into `work`; note what was written in `entry`."""
    tflite = work / f"{ctx.name}.{recipe.name}.tflite"
    tflite.write_bytes(model)
    fitted = None
    if recipe.corrected:
        ctx.progress(f"[{ctx.name}] recipe {recipe.name}: fitting the output correction")
        fitted = work / f"{ctx.name}.{recipe.name}.correction.npy"
        entry["correction"] = fit_correction(ctx, tflite, fitted)
    manifest = work / f"{ctx.name}.{recipe.name}.toml"
    source = {"source": "the exporter's core SavedModel"}
    if recipe.source is not None:
        source = {"source": f"{recipe.source} (a fine-tuned copy of the exporter's core SavedModel)",
                  "source_sha256": sha256(recipe.source)}
    write_manifest(manifest, tflite, ctx.name, ctx.version, recipe.precision, ctx.dim, ctx.pre, "float32", None,
                   {**source, "tool": f"models/export (tensorflow {tf.__version__})",
                    "conversion": recipe.how, "recipe": recipe.name}, correction=fitted)
    entry.update({"file": tflite.name, "bytes": tflite.stat().st_size, "sha256": sha256(tflite)})
    return tflite, manifest


def make_faithful(ctx: Context, name: str) -> Path:
    """Convert the one recipe `name` (the registry's `faithful_recipe`, chosen by an earlier
    search) and keep it as `<model>.<precision>-faithful.*`; returns its manifest."""
    recipe = next((r for r in recipes(ctx) if r.name == name), None)
    if recipe is None:
        raise ExportError(f"faithful_recipe: {name!r} is not a recipe this model has")
    work = ctx.out / "recipes"
    work.mkdir(parents=True, exist_ok=True)
    ctx.progress(f"[{ctx.name}] faithful recipe {name}: converting")
    entry = {"recipe": recipe.name, "precision": recipe.precision}
    write_recipe(ctx, recipe, recipe.convert(), work, entry)
    return keep_faithful(ctx, work, entry, f"recipe {name}, as the registry names it (faithful_recipe)")


def choose(tried: list[dict]) -> dict:
    """The fastest recipe that passes within the latency budget; failing that, the fastest that
    passes at all (over the budget, said so); failing that, none, and the best trade-off reached."""
    passing = [t for t in tried if t.get("fidelity") and t["fidelity"]["verdict"] == "PASS"]
    within = [t for t in passing if t.get("within_budget")]
    fastest = lambda t: (t.get("a76_vs_plain_int8", 0.0), t["invoke_median_s"])  # noqa: E731
    if within:
        return {"chosen": min(within, key=fastest)["recipe"], "over_budget": False}
    if passing:
        return {"chosen": min(passing, key=fastest)["recipe"], "over_budget": True}
    judged = [t for t in tried if t.get("fidelity")]
    best = max(judged, key=lambda t: margin(t["fidelity"]["gates"]), default=None)
    return {"chosen": None, "best_tradeoff": best and best["recipe"]}


def remove_faithful(ctx: Context):
    for old in ctx.out.glob(f"{ctx.name}.*-faithful.*"):
        old.unlink()


def keep_faithful(ctx: Context, work: Path, chosen: dict, selection: str) -> Path:
    """Copy the chosen recipe's files to `<name>.<precision>-faithful.*` (its correction too),
    saying in its provenance how it was chosen; returns the manifest. Earlier faithful exports
    of the model are removed first: exactly one is current."""
    remove_faithful(ctx)
    stem = f"{ctx.name}.{chosen['precision']}-faithful"
    source = f"{ctx.name}.{chosen['recipe']}"
    text = (work / f"{source}.toml").read_text()
    for ext in ("tflite", "correction.npy"):
        if (work / f"{source}.{ext}").is_file():
            shutil.copy(work / f"{source}.{ext}", ctx.out / f"{stem}.{ext}")
            text = text.replace(f'"{source}.{ext}"', f'"{stem}.{ext}"').replace(f" {source}.{ext} ", f" {stem}.{ext} ")
    # [provenance] is the manifest's last table (manifest.write_manifest).
    text = text.rstrip("\n") + f"\nselection = {json.dumps(selection)}\n"
    faithful = ctx.out / f"{stem}.toml"
    faithful.write_text(text)
    return faithful


def margin(gates: dict) -> float:
    """The worst gate's distance from failing, over its threshold's scale (higher is better):
    `value - min` or `max - value`; a gate whose metric was undefined (null) is the worst of all."""
    scale = {"sqnr_db_p1": 20.0}

    def one(name: str, gate: dict) -> float:
        value = gate.get("value")
        if value is None:
            return float("-inf")
        lo, hi = gate.get("min"), gate.get("max")
        if hi is not None:
            return (hi - value) / (abs(hi) or 1.0)
        if lo is not None:
            return (value - lo) / (abs(lo) or 1.0)
        return value / scale.get(name, 1.0)

    return min(one(k, v) for k, v in gates.items())


def gate_value(gate: dict) -> str:
    value = gate.get("value")
    return "undefined" if value is None else f"{value:.3f}"


def summary_line(entry: dict) -> str:
    parts = [f"{entry.get('bytes', 0) / 2**20:.1f} MiB", f"{entry.get('invoke_median_s', 0):.3f} s/img "
             f"({entry.get('latency_vs_plain_int8', 0):.2f}x plain here, {entry.get('a76_vs_plain_int8', 0):.2f}x "
             "on the A76 estimate)"]
    f = entry.get("fidelity")
    if f:
        g = f["gates"]
        parts.append(f"{f['verdict']}: " + ", ".join(f"{k} {gate_value(g[k])}" for k in GATE_KEYS if k in g))
    elif entry.get("skipped"):
        parts.append(entry["skipped"])
    return "; ".join(parts)


def delegated(entry: dict) -> str:
    d = entry.get("delegation")
    if not d:
        return "–"
    outside = ", ".join(f"{n} {op}" for op, n in d["outside"].items())
    return f"{d['partitions']}" + (f" ({outside})" if outside else "")


def a76(entry: dict) -> str:
    if "a76_estimate" not in entry:
        return "– | –"
    return f"{entry['a76_estimate']['seconds']:.3f} | {entry['a76_vs_plain_int8']:.2f}x"


def markdown(name: str, result: dict) -> str:
    lines = [f"# Quantisation recipes tried for {name}", "",
             f"Validation images: `{result['validation']}`; {result['threads']} threads; latency budget "
             f"{result['latency_budget']}x the plain int8 export's on the Cortex-A76 estimate (costmodel.py); recipes "
             f"over {TOO_SLOW_TO_JUDGE}x on this machine are not judged.", "",
             "| recipe | size (MiB) | XNNPACK partitions (ops outside) | x86 invoke median (s) | x86 vs plain | "
             "A76 estimate (s) | A76 vs plain | head-view cos p1 | δ p99 | SQNR p1 (dB) | top-10 | self-retrieval | "
             "head agreement | verdict |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for t in result["recipes"]:
        if "error" in t:
            lines.append(f"| {t['recipe']} | | | | | | | | | | | | | {t['error']} |")
            continue
        f = t.get("fidelity")
        g = f["gates"] if f else {}
        cell = lambda k, fmt: "undefined" if k in g and g[k]["value"] is None else (
            format(g[k]["value"], fmt) if k in g else "–")
        lines.append(
            f"| {t['recipe']} | {t['bytes'] / 2**20:.1f} | {delegated(t)} | {t['invoke_median_s']:.3f} | "
            f"{t['latency_vs_plain_int8']:.2f}x | "
            f"{a76(t)} | "
            f"{cell('centred_cosine_p1', '.4f')} | {cell('head_view_delta_p99', '.3f')} | {cell('sqnr_db_p1', '.2f')} | "
            f"{cell('top10_overlap_mean', '.3f')} | {cell('self_retrieval', '.3f')} | {cell('head_agreement', '.3f')} | "
            f"{f['verdict'] if f else t.get('skipped', '')} |")
    lines += ["", "Recipes: " + "; ".join(f"**{t['recipe']}**: {t['how']}" for t in result["recipes"]), ""]
    if result["chosen"]:
        why = ("the fastest recipe that passes, but none passes within the latency budget" if result.get("over_budget")
               else "the fastest recipe that passes within the latency budget")
        lines.append(f"Chosen: **{result['chosen']}** ({why}) -> `{result.get('faithful')}`.")
        if "holdout" in result:
            h = result["holdout"]
            lines.append(f"Held-out check: {h['verdict']} (" + ", ".join(
                f"{k} {v['value']:.4f}" for k, v in h["gates"].items()) + ").")
    else:
        lines.append(f"No recipe passes the gates. Best trade-off reached: **{result.get('best_tradeoff')}**.")
    return "\n".join(lines) + "\n"
