"""Quantisation-aware fine-tuning of lesion-x448 by distillation from its own float model.

Post-training levers leave lesion-x448's full-int8 export at about twice the δ gate: each
convolution's output errs by 7-8 % RMS of float's, rounding noise that no bias or range removes
(docs/QUANTISATION.md). Fine-tuning with that rounding in the forward pass lets the weights
settle where the noise hurts the embedding least. No labels are needed: the target of each image
is the float model's own embedding, and the loss is the gated metric itself, δ² in the head's
view (`sensitivity.head_view_delta`, centred on the training set's mean).

The Keras core runs with int8 rounding wherever the converted graph holds an int8 tensor: each
convolution's weights per output channel, symmetric in [-127, 127] (the same as rounding the
batch-norm-folded weights, since a per-channel scale factors out); the output of every op the
converter keeps as its own tensor, at a per-tensor asymmetric range chosen by int8 MSE on the
calibration images (`sensitivity.mse_range`, as the `*-mse` recipes choose theirs): a
separable convolution's depthwise half, a convolution's output after its folded batch norm (or
after the ReLU fused into it), every add, standalone ReLU and the global average pool. Max pools
keep their input's range. Rounding passes gradients straight through inside the range.

The result is a float SavedModel; the int8 file is made from it by the usual recipes and judged
against the *original* float model (never the fine-tuned one):

    python -m dermedge_export.qat --calibration cal.npz --validation wide-32.npz --out DIR \\
        [--epochs 12] [--learning-rate 3e-5] [--batch 2] [--recalibrate-every 0] [--loss-power 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from .errors import ExportError
from .sensitivity import head_view_delta, load_inputs, mse_range, stats

# Values of each tensor sampled per calibration image for its MSE range (as sensitivity.mse_ranges).
RANGE_SAMPLES_PER_IMAGE = 4096
# The eight symmetries of the square: 4 rotations, each mirrored or not. A skin image has no up.
VIEWS = 8


def round_weights(w: tf.Tensor, channel_axis: int) -> tf.Tensor:
    """Per-channel symmetric int8 rounding in [-127, 127], gradients passed straight through."""
    axes = [a for a in range(len(w.shape)) if a != channel_axis % len(w.shape)]
    scale = tf.reduce_max(tf.abs(w), axis=axes, keepdims=True) / 127.0
    scale = tf.where(scale > 0, scale, tf.ones_like(scale))
    q = tf.clip_by_value(tf.round(w / scale), -127.0, 127.0) * scale
    return w + tf.stop_gradient(q - w)


def view(x: np.ndarray, k: int) -> np.ndarray:
    """Symmetry k (0..7) of a batch of NHWC images: k % 4 quarter turns, mirrored when k >= 4."""
    x = np.rot90(x, k % 4, axes=(1, 2))
    return np.ascontiguousarray(x[:, :, ::-1] if k >= 4 else x)


class Simulated:
    """A Keras core (input -> normalisation -> nested Xception) run op by op, optionally with int8
    rounding where the converted graph holds int8 tensors."""

    def __init__(self, core):
        import keras

        self.keras = keras
        self.core = core
        nested = [layer for layer in core.layers if isinstance(layer, keras.Model)]
        if len(nested) != 1:
            raise ExportError(f"{core.name}: expected one nested backbone model, found {len(nested)}")
        self.backbone = nested[0]
        self.preprocess = [layer for layer in core.layers
                           if layer is not self.backbone and not isinstance(layer, keras.layers.InputLayer)]
        self.consumers = self._consumers(self.backbone)
        self.ranges: dict[str, tuple[float, float]] = {}
        self.mode = "float"  # float | record | int8
        self.activations, self.weights = True, True  # what int8 mode rounds
        self._record: dict[str, list] = {}

    @staticmethod
    def _consumers(model) -> dict[str, list]:
        consumers = {op.name: [] for op in model.operations}
        for op in model.operations:
            for node in op._inbound_nodes:
                for parent in node.parent_nodes:
                    consumers.setdefault(parent.operation.name, []).append(op)
        return consumers

    # --- which outputs are int8 tensors of their own in the converted graph ---------------------
    def _folded_away(self, op) -> bool:
        L = self.keras.layers
        users = self.consumers.get(op.name, [])
        if isinstance(op, (L.Conv2D, L.SeparableConv2D, L.DepthwiseConv2D)):
            return len(users) == 1 and isinstance(users[0], L.BatchNormalization)  # the BN folds in
        if isinstance(op, L.BatchNormalization):
            return len(users) == 1 and _is_relu(users[0])  # the ReLU fuses into the convolution
        return isinstance(op, (L.MaxPooling2D, L.InputLayer))  # max pool keeps its input's range

    def _round(self, name: str, x):
        if self.mode == "record":
            a = x.numpy().reshape(len(x), -1)
            rng = self._rng
            entry = self._record.setdefault(name, [np.inf, -np.inf, []])
            entry[0], entry[1] = min(entry[0], float(a.min())), max(entry[1], float(a.max()))
            for row in a:
                entry[2].append(row[rng.integers(0, row.size, min(RANGE_SAMPLES_PER_IMAGE, row.size))])
            return x
        if self.mode == "int8" and self.activations:
            lo, hi = self.ranges[name]
            return tf.quantization.fake_quant_with_min_max_args(x, min=lo, max=hi, num_bits=8)
        return x

    def _weights(self, w, channel_axis: int):
        return round_weights(w, channel_axis) if self.mode == "int8" and self.weights else w

    def _run(self, op, *args, **kwargs):
        L = self.keras.layers
        x = args[0]
        if isinstance(op, L.SeparableConv2D):
            strides = (1, *op.strides, 1)
            y = tf.nn.depthwise_conv2d(x, self._weights(op.depthwise_kernel, 2), strides, op.padding.upper(),
                                       dilations=op.dilation_rate)
            y = self._round(op.name + "/depthwise", y)
            y = tf.nn.conv2d(y, self._weights(op.pointwise_kernel, -1), 1, "VALID")
            if op.use_bias:
                y = y + op.bias
            if op.activation is not self.keras.activations.linear:
                raise ExportError(f"{op.name}: a separable convolution with its own activation is not modelled")
        elif isinstance(op, L.Conv2D) and not isinstance(op, L.SeparableConv2D):
            if op.groups != 1 or op.activation is not self.keras.activations.linear:
                raise ExportError(f"{op.name}: grouped or activated convolutions are not modelled")
            y = tf.nn.conv2d(x, self._weights(op.kernel, -1), (1, *op.strides, 1), op.padding.upper(),
                             dilations=op.dilation_rate)
            if op.use_bias:
                y = y + op.bias
        elif isinstance(op, L.BatchNormalization):
            y = op(x, training=False)
        elif isinstance(op, (L.Activation, L.ReLU, L.Add, L.MaxPooling2D, L.GlobalAveragePooling2D, L.InputLayer)):
            y = op(*args, **kwargs)
        else:
            raise ExportError(f"{op.name}: layer type {type(op).__name__} is not modelled")
        return y if self._folded_away(op) else self._round(op.name, y)

    def __call__(self, x):
        for layer in self.preprocess:
            x = layer(x)
        x = self._round("input", x)
        return self.backbone._run_through_graph(x, operation_fn=lambda op: (lambda *a, **k: self._run(op, *a, **k)))

    # --- calibration --------------------------------------------------------------------------
    def calibrate(self, images: np.ndarray, batch: int = 2) -> dict:
        """Each rounded tensor's range: int8 MSE over a sample of its float values on `images`."""
        self.mode, self._record, self._rng = "record", {}, np.random.default_rng(0)
        try:
            for i in range(0, len(images), batch):
                self(tf.constant(images[i:i + batch]))
        finally:
            self.mode = "float"
        self.ranges = {}
        for name, (lo, hi, parts) in self._record.items():
            self.ranges[name] = mse_range(np.concatenate(parts), lo, hi) if hi > lo else (min(lo, 0.0), max(hi, 0.0) + 1e-6)
        self._record = {}
        return self.ranges


def _is_relu(op) -> bool:
    import keras

    if isinstance(op, keras.layers.ReLU):
        return op.max_value is None and not op.negative_slope and not op.threshold
    return isinstance(op, keras.layers.Activation) and op.activation is keras.activations.relu


def centred(e: tf.Tensor, mean: tf.Tensor) -> tf.Tensor:
    return e / tf.maximum(tf.norm(e, axis=1, keepdims=True), 1e-30) - mean


def embed(sim: Simulated, images: np.ndarray, batch: int = 2) -> np.ndarray:
    return np.concatenate([sim(tf.constant(images[i:i + batch])).numpy() for i in range(0, len(images), batch)])


def float_targets(sim: Simulated, calibration: np.ndarray, validation: np.ndarray, batch: int,
                  cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The float core's embeddings of every view of the calibration images [view, image, dim] and
    of the validation images; kept in `cache`, keyed by the inputs and the weights."""
    digest = hashlib.sha256(f"views={VIEWS}".encode())
    for a in (calibration, validation, *[v.numpy() for v in sim.core.weights]):
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype}{a.shape}".encode())
        digest.update(a.tobytes())
    key = digest.hexdigest()
    if cache is not None and cache.is_file():
        try:
            with np.load(cache) as z:
                if str(z["key"]) == key:
                    return z["views"], z["validation"]
        except (OSError, ValueError, KeyError, EOFError):
            pass  # unreadable: computed again and rewritten
    views = np.stack([embed(sim, view(calibration, k), batch) for k in range(VIEWS)])
    targets_valid = embed(sim, validation, batch)
    if cache is not None:
        np.savez(cache, key=key, views=views, validation=targets_valid)
    return views, targets_valid


def power_loss(delta2: tf.Tensor, power: float) -> tf.Tensor:
    """(mean δ^p)^(2/p) of a batch's δ²: mean δ² at p = 2, towards max δ² as p grows; equal
    errors give δ² at any p, so the learning rate means the same for every p."""
    # Floored: the gradient of x^y is infinite at x = 0 (an exact image, or δ^p underflowing).
    floor = 1e-12
    return tf.maximum(tf.reduce_mean(tf.maximum(delta2, floor) ** (power / 2)), floor) ** (2 / power)


def fine_tune(core, calibration: np.ndarray, validation: np.ndarray, epochs: int, learning_rate: float,
              batch: int, out: Path, progress=print, seed: int = 0, targets_cache: Path | None = None,
              recalibrate_every: int = 0, loss_power: float = 2.0) -> dict:
    """Fine-tunes `core` in place with int8 rounding in its forward pass, towards the float
    embeddings the untouched core gives every view of the calibration images. Returns the
    record of the run; the weights of the epoch with the lowest validation δ p99 are kept.
    The activation ranges are the float model's, chosen again every `recalibrate_every` epochs
    (0: never). The converter chooses its own on the fine-tuned model; with fixed ranges the
    simulation matched the converted file on lesion-x448 (δ p99 0.476 simulated, 0.477 converted).
    Whether choosing them again during training helps is not settled (docs/QUANTISATION.md).
    The loss is the batch's power mean of δ, squared: (mean δ^p)^(2/p). At p = 2 that is mean δ²;
    a larger p weighs the worst images more, as the gate (δ p99) does, at the same scale."""
    sim = Simulated(core)
    t0 = time.time()
    views, targets_valid = float_targets(sim, calibration, validation, batch, targets_cache)
    progress(f"float targets of {VIEWS} views x {len(calibration)} images ({time.time() - t0:.0f} s)")
    norm = views / np.linalg.norm(views, axis=2, keepdims=True)
    mean = tf.constant(norm.reshape(-1, norm.shape[-1]).mean(0)[None], tf.float32)

    variables = core.trainable_variables
    # Cosine decay to zero: the rounding makes every step's gradient noisy, and the last epochs
    # settle instead of jumping (a constant rate let δ p99 jump from 0.48 to 0.93 in one epoch).
    steps = epochs * -(-len(calibration) // batch)
    optimizer = sim.keras.optimizers.Adam(sim.keras.optimizers.schedules.CosineDecay(learning_rate, steps))

    def calibrated_step():
        """Ranges chosen again for the weights as they are now (the converter calibrates the
        fine-tuned model, not the original), and a training step traced with them."""
        sim.calibrate(calibration, batch)
        sim.mode = "int8"

        @tf.function(reduce_retracing=True)
        def step(x, target):
            with tf.GradientTape() as tape:
                c, r = centred(sim(x), mean), centred(target, mean)
                delta2 = tf.reduce_sum((c - r) ** 2, 1) / tf.reduce_sum(r ** 2, 1)
                loss = power_loss(delta2, loss_power)
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return tf.reduce_mean(delta2)

        return step

    step = calibrated_step()
    progress(f"ranges of {len(sim.ranges)} int8 tensors chosen on {len(calibration)} images ({time.time() - t0:.0f} s)")

    def validate() -> dict:
        return stats(head_view_delta(embed(sim, validation, batch), targets_valid))

    history = [{"epoch": 0, "validation": validate(), "seconds": round(time.time() - t0)}]
    progress(f"epoch 0 (before): validation δ {history[-1]['validation']}")
    best = (history[-1]["validation"]["delta_p99"], 0, [v.numpy() for v in variables])
    rng = np.random.default_rng(seed)
    for epoch in range(1, epochs + 1):
        if recalibrate_every and epoch > 1 and (epoch - 1) % recalibrate_every == 0:
            step = calibrated_step()
        order = rng.permutation(len(calibration))
        losses = []
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            k = int(rng.integers(VIEWS))
            losses.append(float(step(tf.constant(view(calibration[idx], k)), tf.constant(views[k, idx]))))
        history.append({"epoch": epoch, "training_delta2": float(np.mean(losses)), "validation": validate(),
                        "seconds": round(time.time() - t0)})
        progress(f"epoch {epoch}: training δ² {history[-1]['training_delta2']:.4f}, "
                 f"validation δ {history[-1]['validation']} ({history[-1]['seconds']} s)")
        if history[-1]["validation"]["delta_p99"] < best[0]:
            best = (history[-1]["validation"]["delta_p99"], epoch, [v.numpy() for v in variables])
        (out / "qat.json").write_text(json.dumps({"history": history}, indent=1) + "\n")
    for v, value in zip(variables, best[2]):
        v.assign(value)
    sim.mode = "float"
    drift = float(np.median(head_view_delta(embed(sim, validation, batch), targets_valid)))
    record = {"epochs": epochs, "learning_rate": learning_rate, "schedule": "cosine decay to 0", "batch": batch,
              "views": VIEWS, "seed": seed, "recalibrate_every": recalibrate_every, "loss_power": loss_power,
              "calibration_images": len(calibration), "validation_images": len(validation),
              "kept_epoch": best[1], "history": history,
              "float_drift_delta_median": drift}
    (out / "qat.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def write_float_tflite(core, path: Path, size: int) -> None:
    """The fine-tuned core as a float .tflite with the signature dermedge's exports have (input
    `image` [1, size, size, 3], output `embedding`), for the quantising recipes to start from."""
    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name="image")])
    def serving_default(x):
        return {"embedding": core(x, training=False)}

    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # Frozen, then wrapped again: converted with its variables, the file would read every weight
    # from a runtime variable (VAR_HANDLE), and a frozen function alone loses the signature the
    # quantiser runs.
    frozen = convert_variables_to_constants_v2(serving_default.get_concrete_function())

    @tf.function(input_signature=[tf.TensorSpec([1, size, size, 3], tf.float32, name="image")])
    def signature(x):
        return {"embedding": frozen(x)[0]}

    holder = tf.Module()
    holder.signature = signature
    converter = tf.lite.TFLiteConverter.from_concrete_functions([signature.get_concrete_function()], holder)
    path.write_bytes(converter.convert())


# The written float file against the Keras core, relative L2 per image: float32 arithmetic in
# another order differs by ~1e-7; a lost weight or normalisation by orders of magnitude more.
FLOAT_FILE_TOLERANCE = 1e-4


def check_float_tflite(core, path: Path, inputs: np.ndarray) -> float:
    """The worst relative L2 error of `path` (LiteRT) against `core` (Keras) on `inputs`; an
    ExportError naming the file when it exceeds FLOAT_FILE_TOLERANCE, since every recipe made
    from that file would silently quantise another model."""
    from .runner import run_tflite

    want = core(inputs, training=False).numpy()
    got = run_tflite(path, [x[None] for x in inputs])
    errors = np.linalg.norm(got - want, axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-30)
    worst = float(np.max(errors))  # NaN, from either side, stays NaN and is refused
    if not worst <= FLOAT_FILE_TOLERANCE:
        raise ExportError(f"{path}: computes {worst:.3g} (relative L2) away from the fine-tuned Keras model it was "
                          f"written from; at most {FLOAT_FILE_TOLERANCE} expected")
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dermedge_export.qat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", required=True, type=Path, help="inputs .npz (`dermedge_export inputs`) to train on")
    p.add_argument("--validation", required=True, type=Path, help="inputs .npz to choose the epoch on")
    p.add_argument("--out", required=True, type=Path,
                   help="directory: savedmodel/, lesion-x448.fp32.tflite, qat.json and the cached float-targets.npz")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--learning-rate", type=float, default=3e-5, help="the first step's; it decays to 0 (cosine)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--recalibrate-every", type=int, default=0,
                   help="choose the activation ranges again every N epochs (default 0: keep the float model's)")
    p.add_argument("--loss-power", type=float, default=2.0,
                   help="p of the loss (mean δ^p)^(2/p): 2 is mean δ²; larger weighs the worst images more")
    args = p.parse_args(argv)
    from .standins import SIZE, lesion_parts, save_lesion

    try:
        calibration, _ = load_inputs(args.calibration)
        validation, _ = load_inputs(args.validation)
        for path, inputs in ((args.calibration, calibration), (args.validation, validation)):
            if tuple(inputs.shape[1:]) != (SIZE, SIZE, 3):
                raise ExportError(f"{path}: inputs of shape {list(inputs.shape[1:])}, but lesion-x448 takes "
                                  f"{[SIZE, SIZE, 3]} (made for another model?)")
        if len(validation) < 2:
            raise ExportError(f"{args.validation}: the head view needs at least 2 validation images, got {len(validation)}")
        if args.out.exists() and not args.out.is_dir():
            raise ExportError(f"--out {args.out}: exists and is not a directory")
        if (args.epochs < 1 or args.batch < 1 or not 0 < args.learning_rate < float("inf")
                or args.recalibrate_every < 0):
            raise ExportError("--epochs and --batch must be >= 1, --learning-rate > 0 and --recalibrate-every >= 0")
        if not 1.0 <= args.loss_power <= 16.0:
            raise ExportError(f"--loss-power {args.loss_power}: expected a power from 1 to 16")
        args.out.mkdir(parents=True, exist_ok=True)
        core, trained = lesion_parts()
        record = fine_tune(core, calibration, validation, args.epochs, args.learning_rate, args.batch, args.out,
                           progress=lambda line: print(line, flush=True),
                           targets_cache=args.out / "float-targets.npz", recalibrate_every=args.recalibrate_every,
                           loss_power=args.loss_power)
        save_lesion(core, trained, args.out / "savedmodel",
                    "lesion-x448, fine-tuned for int8 by distillation from its float model "
                    f"(epoch {record['kept_epoch']} kept)")
        # Written aside and checked before it takes the name the recipes read.
        unchecked = args.out / "lesion-x448.fp32.tflite.unchecked"
        write_float_tflite(core, unchecked, SIZE)
        try:
            worst = check_float_tflite(core, unchecked, validation[:2])
        except ExportError:
            unchecked.unlink()
            raise
        unchecked.replace(args.out / "lesion-x448.fp32.tflite")
        print(f"lesion-x448.fp32.tflite computes what the fine-tuned Keras model does (relative L2 at most {worst:.2g})")
        print(f"wrote {args.out}/savedmodel, lesion-x448.fp32.tflite and qat.json")
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
