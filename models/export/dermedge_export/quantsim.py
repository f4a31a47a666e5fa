"""Simulated full-int8 quantisation of a BiT stand-in, for a model too large to convert per variant.

`sensitivity` measures where int8 loses the embedding by converting the .tflite file once per
variant; on df-r101x3 (Derm Foundation's architecture) one conversion takes about 50 minutes and
21 GB here, so its op-type ablation and per-layer sensitivity are simulated instead. The network
runs in TensorFlow, in float, with int8 rounding inserted wherever a full-int8 graph holds an int8
tensor: every op's output and every int8 op's inputs at a per-tensor asymmetric range (min/max
over the calibration images, as the converter calibrates; `fake_quant_with_min_max_args`, which
makes zero exact as TFLite does), and convolution weights per output channel, symmetric, in
[-127, 127]. Rounding a chosen set of those tensors -- by op kind for the ablation, by layer for
the sensitivity -- and measuring δ in the head's view (`sensitivity.head_view_delta`) against the
same network unrounded says where int8 loses the embedding.

It is a model of the converter, not the converter: op fusions, the kernels' fixed-point
requantisation and LiteRT's rounding are not reproduced. docs/QUANTISATION.md compares it with
the real conversions on df-mini.

    python -m dermedge_export inputs --standin df-r101x3 --images DIR --count 16 --out eval.npz
    python -m dermedge_export.quantsim df-r101x3 --calibration cal.npz --images eval.npz --out DIR \\
        [--layer-images 8] [--batch 2] [--only ablation,levers,layers]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from . import bit
from .errors import ExportError
from .sensitivity import head_view_delta, load_inputs, spread, stats

# Op kinds in the order the ablation adds them (as the search's ablation recipes do); "statistics"
# are GroupNorm's per-group mean, square, variance and rsqrt, the rest of it is "norm".
KINDS = ("conv", "add", "norm", "statistics", "pool")


@dataclass(frozen=True)
class Selection:
    """Which tensors one variant rounds: the activations of `kinds` (to int16 for the kinds in
    `wide`, else int8) and, with `weights`, the convolution weights (to `weight_bits`), in
    `layers` (None: all)."""
    kinds: frozenset
    weights: bool
    layers: frozenset | None = None
    wide: frozenset = frozenset()
    weight_bits: int = 8

    def bits(self, layer: str, kind: str) -> int | None:
        """The bits this tensor is rounded to, or None if it stays float."""
        if kind not in self.kinds or (self.layers is not None and layer not in self.layers):
            return None
        return 16 if kind in self.wide else 8

    def rounds_weights(self, layer: str) -> bool:
        return self.weights and (self.layers is None or layer in self.layers)


FLOAT = Selection(frozenset(), False)
EVERY_OP = frozenset(KINDS)
ABLATION = (
    ("int8 weights, float arithmetic", Selection(frozenset(), True)),
    ("int8 convolutions only", Selection(frozenset({"conv"}), True)),
    ("+ residual adds", Selection(frozenset({"conv", "add"}), True)),
    ("+ normalisation and activations", Selection(frozenset({"conv", "add", "norm", "statistics"}), True)),
    ("+ pooling: every op int8", Selection(EVERY_OP, True)),
)
# Mixed recipes the ablation points at, simulated before anyone converts one, and two diagnostics:
# what int8 activations cost without int8 weights, and whether the weights' cost scales with their
# error (int10 weights round 4x finer; a network whose embedding is chaotic in its weights would
# lose nearly as much).
LEVERS = (
    ("every op's activations int8, float weights", Selection(EVERY_OP, False)),
    ("int10 weights (a quarter of int8's error), float arithmetic", Selection(frozenset(), True, weight_bits=10)),
    ("every op int8 but GroupNorm's statistics (float)", Selection(EVERY_OP - {"statistics"}, True)),
    ("every op int8, GroupNorm's statistics int16", Selection(EVERY_OP, True, wide=frozenset({"statistics"}))),
)
PARTS = ("ablation", "levers", "layers")


def per_channel(w: np.ndarray, bits: int = 8) -> np.ndarray:
    """Symmetric per-output-channel integers (last axis, HWIO; int8: [-127, 127]), back to float."""
    top = 2 ** (bits - 1) - 1
    scale = np.max(np.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True) / top
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(w / scale), -top, top) * scale).astype(np.float32)


def int8_per_tensor(v: np.ndarray) -> np.ndarray:
    """Asymmetric per-tensor int8 over the range [min(v, 0), max(v, 0)] (how the converter stores
    GroupNorm's gamma and beta), back to float."""
    lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
    if hi - lo < 1e-12:
        return v.astype(np.float32)
    scale = (hi - lo) / 255.0
    zero = np.round(-128 - lo / scale)
    return ((np.clip(np.round(v / scale) + zero, -128, 127) - zero) * scale).astype(np.float32)


class Simulation:
    """A BiT network (`bit.BiT`) run with int8 rounding at the tensors a `Selection` picks."""

    def __init__(self, core):
        self.core = core
        self.layers = ["stem"] + [f"unit{i:02d}" for i in range(1, len(core.units) + 1)] + ["final"]
        self.weights = {"stem/conv": core.standardised(core.stem).numpy()}
        for layer, unit in zip(self.layers[1:-1], core.units):
            for conv in ("proj", "conv1", "conv2", "conv3"):
                if conv in unit:
                    self.weights[f"{layer}/{conv}"] = core.standardised(unit[conv]).numpy()
        self._rounded_weights: dict[int, dict[str, np.ndarray]] = {}
        norms = [("final/gn", core.gn_final)] + [(f"{layer}/{gn}", unit[gn]) for layer, unit in
                                                  zip(self.layers[1:-1], core.units) for gn in ("gn_a", "gn_b", "gn_c")]
        self.norm_constants = {name: [v.numpy() for v in params] for name, params in norms}
        self.int8_norm_constants = {name: [int8_per_tensor(v) for v in params] for name, params in self.norm_constants.items()}
        self.ranges: dict[str, tuple[float, float]] = {}
        self._selection = FLOAT
        self._recording = False

    def calibrate(self, images: np.ndarray, batch: int = 1, progress=None) -> None:
        """Record every tensor's min and max over `images` (float network)."""
        self.ranges = {}
        self._recording = True
        try:
            self.embed(images, FLOAT, batch, progress, "calibrating")
        finally:
            self._recording = False

    def embed(self, images: np.ndarray, selection: Selection, batch: int = 1, progress=None,
              label: str = "") -> np.ndarray:
        if selection != FLOAT and not self.ranges:
            raise ExportError("quantsim: calibrate before rounding activations (no recorded ranges)")
        self._selection = selection
        out = []
        for start in range(0, len(images), batch):
            out.append(self._forward(tf.constant(images[start:start + batch])).numpy())
            if progress is not None:
                progress(f"  {label}: {min(start + batch, len(images))}/{len(images)} images")
        return np.concatenate(out)

    def _weights(self, layer: str, name: str) -> np.ndarray:
        if not self._selection.rounds_weights(layer):
            return self.weights[name]
        bits = self._selection.weight_bits
        if bits not in self._rounded_weights:
            self._rounded_weights[bits] = {n: per_channel(w, bits) for n, w in self.weights.items()}
        return self._rounded_weights[bits][name]

    def _round(self, layer: str, kind: str, name: str, x, shares: str | None = None):
        """Round `x` (the tensor `name`) if the selection picks its layer and kind. `shares`: the
        tensor whose range it takes -- an op's input is its producer's int8 tensor, and the
        converter gives MAX_POOL's output, a residual branch's last convolution and GroupNorm's
        variance + eps the range of their input or of the ADD they feed."""
        if self._recording:
            lo, hi = float(tf.reduce_min(x)), float(tf.reduce_max(x))
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise ExportError(f"quantsim: tensor {name} is not finite on the calibration images")
            old = self.ranges.get(name, (lo, hi))
            self.ranges[name] = (min(old[0], lo), max(old[1], hi))
            return x
        bits = self._selection.bits(layer, kind)
        if bits is None:
            return x
        lo, hi = self.ranges[shares or name]
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # the converter's ranges always hold zero
        if hi - lo < 1e-12:
            return x
        if bits == 16:  # TFLite's 16-bit activations are symmetric
            top = max(-lo, hi)
            return tf.quantization.fake_quant_with_min_max_args(x, min=-top, max=top, num_bits=16,
                                                                      narrow_range=True)
        return tf.quantization.fake_quant_with_min_max_args(x, min=lo, max=hi, num_bits=bits, narrow_range=False)

    def _conv(self, x, layer: str, name: str, stride: int, source: str | None = None, output_shares: str | None = None):
        x = self._round(layer, "conv", f"{name}/input", x, shares=source)
        y = tf.nn.conv2d(x, self._weights(layer, name), strides=stride, padding="SAME")
        return self._round(layer, "conv", f"{name}/output", y, shares=output_shares)

    def _norm_relu(self, x, layer: str, name: str, source: str):
        """bit.BiT.group_norm then ReLU, each intermediate an int8 tensor of its own, as the
        converter lowers it: MEAN, SUB, SQUARE of the difference, MEAN, ADD, RSQRT, MUL, MUL by
        gamma, ADD of beta with the ReLU fused."""
        key = f"{layer}/{name}"
        rounded = self._selection.bits(layer, "norm") is not None
        gamma, beta = (self.int8_norm_constants if rounded else self.norm_constants)[key]
        _, h, w, c = x.shape
        g = min(self.core.groups, c)

        def r(part, t, kind="norm", shares=None):
            return self._round(layer, kind, f"{key}/{part}", t, shares=shares)

        def statistic(part, t, shares=None):
            return r(part, t, "statistics", shares)

        # SUB and MUL are int8 ops of the normalisation: their statistic inputs reach them as int8
        # whatever precision the statistics ran in (the second r(...) on mean and rsqrt).
        xg = tf.reshape(r("input", x, shares=source), [-1, h, w, g, c // g])
        mean = statistic("mean", tf.reduce_mean(xg, axis=[1, 2, 4], keepdims=True))
        centred = r("centred", xg - r("mean", mean))
        var = statistic("variance", tf.reduce_mean(statistic("square", tf.square(centred)), axis=[1, 2, 4],
                                                   keepdims=True))
        inverse = statistic("rsqrt", tf.math.rsqrt(statistic("variance_eps", var + bit.GROUPNORM_EPS,
                                                             shares=f"{key}/variance")))
        normalised = r("normalised", centred * r("rsqrt", inverse))
        scaled = r("scaled", tf.reshape(normalised, [-1, h, w, c]) * gamma)
        return r("output", tf.nn.relu(scaled + beta))

    def _forward(self, image):
        """bit.BiT.__call__, layer by layer, with a rounding point at each int8 tensor."""
        core = self.core
        x = self._conv(image, "stem", "stem/conv", 2)
        source = "stem/conv/output"  # the tensor x is, as far as its int8 range goes
        x = self._round("stem", "pool", "stem/max_pool", tf.nn.max_pool2d(x, ksize=3, strides=2, padding="SAME"),
                        shares=source)
        for layer, u in zip(self.layers[1:-1], core.units):
            a = self._norm_relu(x, layer, "gn_a", source)
            if "proj" in u:
                shortcut = self._conv(a, layer, f"{layer}/proj", u["stride"])
                shortcut_source = f"{layer}/proj/output"
            else:
                shortcut, shortcut_source = x, source
            y = self._conv(a, layer, f"{layer}/conv1", 1)
            y = self._conv(self._norm_relu(y, layer, "gn_b", f"{layer}/conv1/output"), layer, f"{layer}/conv2", u["stride"])
            # With the ADD int8 too, the converter gives the branch's last convolution the ADD's range.
            add_is_int8 = self._selection.bits(layer, "add") is not None
            y = self._conv(self._norm_relu(y, layer, "gn_c", f"{layer}/conv2/output"), layer, f"{layer}/conv3", 1,
                           output_shares=f"{layer}/add" if add_is_int8 else None)
            shortcut = self._round(layer, "add", f"{layer}/add/shortcut", shortcut, shares=shortcut_source)
            y = self._round(layer, "add", f"{layer}/add/residual", y, shares=f"{layer}/add")
            x = self._round(layer, "add", f"{layer}/add", y + shortcut)
            source = f"{layer}/add"
        x = self._norm_relu(x, "final", "gn", source)
        return self._round("final", "pool", "final/mean", tf.reduce_mean(x, axis=[1, 2]))


def _worst(delta: np.ndarray, names: list[str], n: int = 5) -> list[dict]:
    return [{"image": names[i], "delta": float(delta[i])} for i in np.argsort(-delta)[:n]]


def _judged(label: str, selection: Selection, delta: np.ndarray, names: list[str]) -> dict:
    return {"variant": label, "kinds": sorted(selection.kinds), "int16": sorted(selection.wide),
            "weights": selection.weights, **stats(delta), "worst": _worst(delta, names)}


def measure(standin: str, calibration: Path, images: Path, out: Path, layer_images: int = 8, batch: int = 1,
            parts: tuple = PARTS, progress=print) -> dict:
    """The op-type ablation and the levers on every image of `images`, then each layer rounded
    alone on `layer_images` of them (evenly spread) -- the `parts` asked for; written to
    `out/<standin>.quantsim[-<parts>].json` and `.md`."""
    from . import standins

    asked = [p.strip() for p in parts]
    if not asked or any(p not in PARTS for p in asked):
        raise ExportError(f"quantsim: --only takes a comma-separated subset of {', '.join(PARTS)}, not {','.join(parts)!r}")
    parts = tuple(p for p in PARTS if p in asked)
    if layer_images < 2:
        raise ExportError(f"quantsim: --layer-images must be at least 2 (the head view is centred on their mean), "
                          f"not {layer_images}")
    if batch < 1:
        raise ExportError(f"quantsim: --batch must be at least 1, not {batch}")
    cal, cal_names = load_inputs(calibration)
    xs, names = load_inputs(images)
    expected = standins.bit_preprocessing(standin)
    for path, arr in ((calibration, cal), (images, xs)):
        if list(arr.shape[1:]) != [expected.height, expected.width, 3]:
            raise ExportError(f"{path}: inputs of shape {list(arr.shape[1:])}, but {standin} takes "
                              f"{[expected.height, expected.width, 3]} (made for another model?)")
        made_for = input_affine(path)
        if made_for is not None and not np.allclose(made_for, (expected.scale, expected.offset), rtol=1e-6, atol=1e-9):
            raise ExportError(f"{path}: inputs made with scale {made_for[0]:.6g} and offset {made_for[1]:.6g}, but "
                              f"{standin} takes scale {expected.scale:.6g} and offset {expected.offset:.6g} "
                              f"(made for another model?)")
    if len(xs) < 2:
        raise ExportError(f"{images}: the head view needs at least 2 images (it is centred on their mean)")
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"{out}: cannot write the results there ({e})") from e
    batch = min(batch, max(len(cal), len(xs)))
    tf.random.set_seed(standins.SEED)
    started = time.time()
    progress(f"{standin}: building the seeded network")
    sim = Simulation(standins.bit_core(standin))
    sim.calibrate(cal, batch, progress)
    progress(f"{standin}: {len(sim.ranges)} int8 tensors calibrated on {len(cal)} images, "
             f"{len(sim.weights)} convolutions, {len(sim.layers)} layers ({time.time() - started:.0f} s)")
    reference = sim.embed(xs, FLOAT, batch, progress, "float reference")
    bad = [names[i] for i in np.flatnonzero(~np.all(np.isfinite(reference), axis=1))]
    if bad:
        raise ExportError(f"{images}: the float network's embedding is not finite for {', '.join(bad[:5])}")
    result = {
        "standin": standin, "simulated": True, "parts": list(parts),
        "definition": "delta = |P(c) - P(r)| / |P(r)|, P(x) = x/|x| - mean of the normalised float embeddings",
        "calibration": str(calibration), "calibration_images": cal_names,
        "images": str(images), "image_names": names,
        "int8_tensors": len(sim.ranges), "convolutions": len(sim.weights),
    }
    for part, variants in (("ablation", ABLATION), ("levers", LEVERS)):
        if part in parts:
            result[part] = []
            for label, selection in variants:
                delta = head_view_delta(sim.embed(xs, selection, batch, progress, label), reference)
                result[part].append(_judged(label, selection, delta, names))
                progress(f"{label}: delta median {float(np.median(delta)):.3f} p99 {float(np.percentile(delta, 99)):.3f}")
            write(out, result)  # each part as it finishes: a long run killed later keeps it
    if "layers" in parts:
        picked = spread(np.arange(len(xs)), min(layer_images, len(xs)))
        sub, sub_reference = xs[picked], reference[picked]
        layers = []
        result["layer_images"] = [names[i] for i in picked]
        for n, layer in enumerate(sim.layers, 1):
            delta = head_view_delta(sim.embed(sub, Selection(EVERY_OP, True, frozenset({layer})), batch), sub_reference)
            layers.append({"layer": layer, **stats(delta)})
            result["layers_ranked"] = sorted(layers, key=lambda r: r["delta_median"], reverse=True)
            write(out, result)
            progress(f"  layer {n}/{len(sim.layers)} {layer}: delta median {layers[-1]['delta_median']:.3f} "
                     f"({time.time() - started:.0f} s)")
    result["seconds"] = round(time.time() - started, 1)
    write(out, result)
    return result


def input_affine(path: Path) -> tuple[float, float] | None:
    """The scale and offset `dermedge_export inputs` recorded in an inputs file (None if it did not)."""
    with np.load(path) as z:
        if "scale" not in z or "offset" not in z:
            return None
        return float(z["scale"]), float(z["offset"])


def report_path(out: Path, result: dict, suffix: str) -> Path:
    parts = "" if tuple(result["parts"]) == PARTS else "-" + "-".join(result["parts"])
    return Path(out) / f"{result['standin']}.quantsim{parts}.{suffix}"


def write(out: Path, result: dict) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    report_path(out, result, "json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {result['standin']}: simulated int8 (TensorFlow, fake quantisation)", "",
             f"Calibrated on {len(result['calibration_images'])} images ({result['calibration']}); "
             f"variants on {len(result['image_names'])} images ({result['images']}). {result['int8_tensors']} "
             f"int8 tensors, {result['convolutions']} convolutions. {result['definition']}."]
    variants = result.get("ablation", []) + result.get("levers", [])
    if variants:
        lines += ["", "| variant | δ median | δ mean | δ p99 | worst images |", "|---|---:|---:|---:|---|"]
    for r in variants:
        worst = ", ".join(f"{w['image']} {w['delta']:.3f}" for w in r["worst"][:3])
        lines.append(f"| {r['variant']} | {r['delta_median']:.3f} | {r['delta_mean']:.3f} | {r['delta_p99']:.3f} | {worst} |")
    if "layers_ranked" in result:
        lines += ["", f"Each layer rounded alone (every op kind, its weights too) on {len(result['layer_images'])} "
                      f"of the images:", "", "| layer | δ median | δ mean | δ p99 |", "|---|---:|---:|---:|"]
        for r in result["layers_ranked"]:
            lines.append(f"| {r['layer']} | {r['delta_median']:.4f} | {r['delta_mean']:.4f} | {r['delta_p99']:.4f} |")
        lines += ["", "A layer rounded alone also reads its input as int8: the tensor between two layers counts "
                      "toward both."]
    report_path(out, result, "md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dermedge_export.quantsim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("standin", help="the BiT stand-in: df-mini or df-r101x3")
    p.add_argument("--calibration", required=True, type=Path, help="inputs .npz (`inputs --standin`) to calibrate on")
    p.add_argument("--images", required=True, type=Path, help="inputs .npz to measure the embedding on")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--layer-images", type=int, default=8, help="images each layer is measured alone on")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass")
    p.add_argument("--only", default=",".join(PARTS), help=f"a comma-separated subset of {', '.join(PARTS)}")
    args = p.parse_args(argv)
    try:
        result = measure(args.standin, args.calibration, args.images, args.out, args.layer_images, args.batch,
                         tuple(args.only.split(",")), progress=lambda line: print(line, flush=True))
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {report_path(args.out, result, 'md')} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
