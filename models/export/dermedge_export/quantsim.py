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
        [--layer-images 8] [--batch 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ExportError
from .sensitivity import head_view_delta, load_inputs, spread, stats

# Op kinds in the order the ablation adds them (as the search's ablation recipes do).
KINDS = ("conv", "add", "norm", "pool")
ABLATION = (
    ("int8 weights, float arithmetic", frozenset(), True),
    ("int8 convolutions only", frozenset({"conv"}), True),
    ("+ residual adds", frozenset({"conv", "add"}), True),
    ("+ normalisation and activations", frozenset({"conv", "add", "norm"}), True),
    ("+ pooling: every op int8", frozenset(KINDS), True),
)
GROUPNORM_EPS = 1e-5  # bit.BiT.group_norm's


@dataclass(frozen=True)
class Selection:
    """Which tensors one variant rounds to int8: the activations of `kinds` and, with `weights`, the
    convolution weights, in `layers` (None: all layers)."""
    kinds: frozenset
    weights: bool
    layers: frozenset | None = None

    def rounds(self, layer: str, kind: str) -> bool:
        return kind in self.kinds and (self.layers is None or layer in self.layers)

    def rounds_weights(self, layer: str) -> bool:
        return self.weights and (self.layers is None or layer in self.layers)


FLOAT = Selection(frozenset(), False)


def int8_per_channel(w: np.ndarray) -> np.ndarray:
    """Symmetric per-output-channel int8 (last axis, HWIO), in [-127, 127], back to float."""
    scale = np.max(np.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)


class Simulation:
    """A BiT network (`bit.BiT`) run with int8 rounding at the tensors a `Selection` picks."""

    def __init__(self, core):
        import tensorflow as tf

        self.tf = tf
        self.core = core
        self.layers = ["stem"] + [f"unit{i:02d}" for i in range(1, len(core.units) + 1)] + ["final"]
        self.weights = {"stem/conv": core.standardised(core.stem).numpy()}
        for layer, unit in zip(self.layers[1:-1], core.units):
            for conv in ("proj", "conv1", "conv2", "conv3"):
                if conv in unit:
                    self.weights[f"{layer}/{conv}"] = core.standardised(unit[conv]).numpy()
        self.int8_weights = {name: int8_per_channel(w) for name, w in self.weights.items()}
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
            out.append(self._forward(self.tf.constant(images[start:start + batch])).numpy())
            if progress is not None:
                progress(f"  {label}: {min(start + batch, len(images))}/{len(images)} images")
        return np.concatenate(out)

    def _round(self, layer: str, kind: str, name: str, x):
        if self._recording:
            lo, hi = float(self.tf.reduce_min(x)), float(self.tf.reduce_max(x))
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise ExportError(f"quantsim: tensor {name} is not finite on the calibration images")
            old = self.ranges.get(name, (lo, hi))
            self.ranges[name] = (min(old[0], lo), max(old[1], hi))
            return x
        if not self._selection.rounds(layer, kind):
            return x
        lo, hi = self.ranges[name]
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # the converter's ranges always hold zero
        if hi - lo < 1e-12:
            return x
        return self.tf.quantization.fake_quant_with_min_max_args(x, min=lo, max=hi, num_bits=8, narrow_range=False)

    def _conv(self, x, layer: str, name: str, stride: int):
        x = self._round(layer, "conv", f"{name}/input", x)
        w = (self.int8_weights if self._selection.rounds_weights(layer) else self.weights)[name]
        y = self.tf.nn.conv2d(x, w, strides=stride, padding="SAME")
        return self._round(layer, "conv", f"{name}/output", y)

    def _norm_relu(self, x, params, layer: str, name: str):
        """bit.BiT.group_norm then ReLU, each intermediate an int8 tensor of its own, as the
        converter lowers it: MEAN, SUB, SQUARE of the difference, MEAN, ADD, RSQRT, MUL, MUL by
        gamma, ADD of beta with the ReLU fused."""
        tf = self.tf
        gamma, beta = params
        _, h, w, c = x.shape
        g = min(self.core.groups, c)

        def r(part, t):
            return self._round(layer, "norm", f"{layer}/{name}/{part}", t)

        xg = tf.reshape(r("input", x), [-1, h, w, g, c // g])
        mean = r("mean", tf.reduce_mean(xg, axis=[1, 2, 4], keepdims=True))
        centred = r("centred", xg - mean)
        var = r("variance", tf.reduce_mean(r("square", tf.square(centred)), axis=[1, 2, 4], keepdims=True))
        inverse = r("rsqrt", tf.math.rsqrt(r("variance_eps", var + GROUPNORM_EPS)))
        normalised = r("normalised", centred * inverse)
        scaled = r("scaled", tf.reshape(normalised, [-1, h, w, c]) * gamma)
        return r("output", tf.nn.relu(scaled + beta))

    def _forward(self, image):
        """bit.BiT.__call__, layer by layer, with a rounding point at each int8 tensor."""
        tf = self.tf
        core = self.core
        x = self._conv(image, "stem", "stem/conv", 2)
        x = self._round("stem", "pool", "stem/max_pool", tf.nn.max_pool2d(x, ksize=3, strides=2, padding="SAME"))
        for layer, u in zip(self.layers[1:-1], core.units):
            a = self._norm_relu(x, u["gn_a"], layer, "gn_a")
            shortcut = self._conv(a, layer, f"{layer}/proj", u["stride"]) if "proj" in u else x
            y = self._conv(a, layer, f"{layer}/conv1", 1)
            y = self._conv(self._norm_relu(y, u["gn_b"], layer, "gn_b"), layer, f"{layer}/conv2", u["stride"])
            y = self._conv(self._norm_relu(y, u["gn_c"], layer, "gn_c"), layer, f"{layer}/conv3", 1)
            shortcut = self._round(layer, "add", f"{layer}/add/shortcut", shortcut)
            y = self._round(layer, "add", f"{layer}/add/residual", y)
            x = self._round(layer, "add", f"{layer}/add", y + shortcut)
        x = self._norm_relu(x, core.gn_final, "final", "gn")
        return self._round("final", "pool", "final/mean", tf.reduce_mean(x, axis=[1, 2]))


def _worst(delta: np.ndarray, names: list[str], n: int = 5) -> list[dict]:
    return [{"image": names[i], "delta": float(delta[i])} for i in np.argsort(-delta)[:n]]


def measure(standin: str, calibration: Path, images: Path, out: Path, layer_images: int = 8, batch: int = 1,
            progress=print) -> dict:
    """The op-type ablation on every image of `images`, then each layer rounded alone on
    `layer_images` of them (evenly spread); written to `out/<standin>.quantsim.json` and `.md`."""
    import tensorflow as tf

    from . import standins

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
    tf.random.set_seed(standins.SEED)
    started = time.time()
    progress(f"{standin}: building the seeded network")
    sim = Simulation(standins.bit_core(standin))
    sim.calibrate(cal, batch, progress)
    progress(f"{standin}: {len(sim.ranges)} int8 tensors calibrated on {len(cal)} images, "
             f"{len(sim.weights)} convolutions, {len(sim.layers)} layers ({time.time() - started:.0f} s)")
    reference = sim.embed(xs, FLOAT, batch, progress, "float reference")
    ablation = []
    for label, kinds, weights in ABLATION:
        delta = head_view_delta(sim.embed(xs, Selection(kinds, weights), batch, progress, label), reference)
        row = {"variant": label, "kinds": sorted(kinds), "weights": weights, **stats(delta), "worst": _worst(delta, names)}
        ablation.append(row)
        progress(f"{label}: delta median {row['delta_median']:.3f} p99 {row['delta_p99']:.3f}")
    picked = spread(np.arange(len(xs)), min(layer_images, len(xs)))
    sub, sub_names = xs[picked], [names[i] for i in picked]
    sub_reference = reference[picked]
    layers = []
    for n, layer in enumerate(sim.layers, 1):
        selection = Selection(frozenset(KINDS), True, frozenset({layer}))
        delta = head_view_delta(sim.embed(sub, selection, batch), sub_reference)
        layers.append({"layer": layer, **stats(delta)})
        progress(f"  layer {n}/{len(sim.layers)} {layer}: delta median {layers[-1]['delta_median']:.3f} "
                 f"({time.time() - started:.0f} s)")
    result = {
        "standin": standin, "simulated": True,
        "definition": "delta = |P(c) - P(r)| / |P(r)|, P(x) = x/|x| - mean of the normalised float embeddings",
        "calibration": str(calibration), "calibration_images": cal_names,
        "images": str(images), "image_names": names, "layer_images": sub_names,
        "int8_tensors": len(sim.ranges), "convolutions": len(sim.weights),
        "ablation": ablation,
        "layers_ranked": sorted(layers, key=lambda r: r["delta_median"], reverse=True),
        "seconds": round(time.time() - started, 1),
    }
    write(out, result)
    return result


def write(out: Path, result: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = result["standin"]
    (out / f"{name}.quantsim.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {name}: simulated int8 (TensorFlow, fake quantisation)", "",
             f"Calibrated on {len(result['calibration_images'])} images ({result['calibration']}); "
             f"ablation on {len(result['image_names'])} images ({result['images']}); each layer alone on "
             f"{len(result['layer_images'])} of them. {result['int8_tensors']} int8 tensors, "
             f"{result['convolutions']} convolutions. {result['definition']}.", "",
             "| variant | δ median | δ mean | δ p99 | worst images |", "|---|---:|---:|---:|---|"]
    for r in result["ablation"]:
        worst = ", ".join(f"{w['image']} {w['delta']:.3f}" for w in r["worst"][:3])
        lines.append(f"| {r['variant']} | {r['delta_median']:.3f} | {r['delta_mean']:.3f} | {r['delta_p99']:.3f} | {worst} |")
    lines += ["", "| layer rounded alone | δ median | δ mean | δ p99 |", "|---|---:|---:|---:|"]
    for r in result["layers_ranked"]:
        lines.append(f"| {r['layer']} | {r['delta_median']:.4f} | {r['delta_mean']:.4f} | {r['delta_p99']:.4f} |")
    (out / f"{name}.quantsim.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dermedge_export.quantsim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("standin", help="the BiT stand-in: df-mini or df-r101x3")
    p.add_argument("--calibration", required=True, type=Path, help="inputs .npz (`inputs --standin`) to calibrate on")
    p.add_argument("--images", required=True, type=Path, help="inputs .npz to measure the embedding on")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--layer-images", type=int, default=8, help="images each layer is measured alone on")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass")
    args = p.parse_args(argv)
    try:
        result = measure(args.standin, args.calibration, args.images, args.out, args.layer_images, args.batch,
                         progress=lambda line: print(line, flush=True))
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / (result['standin'] + '.quantsim.md')} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
