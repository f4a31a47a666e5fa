"""Quantisation-aware fine-tuning: the simulation rounds where the converted graph holds int8
tensors, runs exactly the float network when it rounds nothing, and keeps the best epoch."""
import tempfile
import unittest
from unittest import mock
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from dermedge_export.qat import (VIEWS, Simulated, embed, fine_tune, float_targets, power_loss, round_weights, view,
                                 write_float_tflite, check_float_tflite)
from dermedge_export.sensitivity import head_view_delta


def tiny_core(seed: int = 0):
    """Normalisation + a nested backbone with every layer kind Xception has: a convolution with a
    batch norm and a fused ReLU, a separable convolution, a residual 1x1 convolution, max pool,
    add, a standalone ReLU and global average pooling."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False, name="stem")(inp)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Activation("relu", name="stem_act")(x)
    residual = keras.layers.Conv2D(12, 1, strides=2, padding="same", use_bias=False, name="res")(x)
    residual = keras.layers.BatchNormalization(name="res_bn")(residual)
    y = keras.layers.SeparableConv2D(12, 3, padding="same", use_bias=False, name="sep")(x)
    y = keras.layers.BatchNormalization(name="sep_bn")(y)
    y = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool")(y)
    y = keras.layers.Add(name="add")([y, residual])
    y = keras.layers.Activation("relu", name="add_act")(y)
    y = keras.layers.GlobalAveragePooling2D(name="gap")(y)
    backbone = keras.Model(inp, y, name="backbone")
    for layer in backbone.layers:  # batch norms with statistics of their own, not the identity
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            rng = np.random.default_rng(len(layer.name))
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), rng.normal(0, 0.1, n),
                               rng.uniform(0.5, 2.0, n)])
    top = keras.Input((16, 16, 3))
    norm = keras.layers.Normalization(axis=-1, mean=[100.0, 110.0, 120.0], variance=[900.0, 800.0, 700.0])
    return keras.Model(top, backbone(norm(top)))


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 16, 16, 3)).astype(np.float32)


class RoundWeights(unittest.TestCase):
    def test_per_channel_symmetric_grid_with_straight_through_gradient(self):
        w = tf.Variable(np.random.default_rng(1).normal(0, 1, (3, 3, 4, 5)).astype(np.float32))
        with tf.GradientTape() as tape:
            q = round_weights(w, -1)
            total = tf.reduce_sum(q * 2.0)
        q = q.numpy()
        for c in range(5):
            scale = np.abs(w.numpy()[..., c]).max() / 127
            steps = q[..., c] / scale
            np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
            self.assertAlmostEqual(float(np.abs(steps).max()), 127.0, places=3)
        np.testing.assert_allclose(tape.gradient(total, w).numpy(), 2.0)

    def test_an_all_zero_channel_stays_zero(self):
        w = np.zeros((1, 1, 2, 3), np.float32)
        w[..., 1] = 0.5
        self.assertTrue(np.all(np.isfinite(round_weights(tf.constant(w), -1).numpy())))
        np.testing.assert_allclose(round_weights(tf.constant(w), -1).numpy(), w)


class Views(unittest.TestCase):
    def test_eight_distinct_symmetries_and_the_first_is_the_image(self):
        x = images(1, 2)
        np.testing.assert_array_equal(view(x, 0), x)
        seen = {view(x, k).tobytes() for k in range(VIEWS)}
        self.assertEqual(len(seen), VIEWS)


class Simulation(unittest.TestCase):
    def setUp(self):
        self.core = tiny_core()
        self.sim = Simulated(self.core)
        self.x = images(6, 3)

    def test_rounding_nothing_is_the_float_network(self):
        np.testing.assert_array_equal(embed(self.sim, self.x), self.core(self.x, training=False).numpy())

    def test_rounds_where_the_converted_graph_holds_int8_tensors(self):
        ranges = self.sim.calibrate(self.x)
        # Folded away: convolutions into their batch norms, the stem's batch norm into its ReLU,
        # and the max pool (its input's range). The separable convolution's depthwise half is its own.
        self.assertEqual(sorted(ranges), ["add", "add_act", "gap", "input", "res_bn", "sep/depthwise", "sep_bn",
                                          "stem_act"])
        self.assertEqual(ranges["stem_act"][0], 0.0)  # a fused ReLU's range starts at zero
        self.sim.mode = "int8"
        rounded = embed(self.sim, self.x)
        reference = self.core(self.x, training=False).numpy()
        self.assertFalse(np.array_equal(rounded, reference))
        self.assertLess(float(np.median(head_view_delta(rounded, reference))), 0.5)
        self.sim.activations = False  # the weights alone are rounded too
        self.assertFalse(np.array_equal(embed(self.sim, self.x), reference))
        self.sim.weights = False
        np.testing.assert_array_equal(embed(self.sim, self.x), reference)

    def test_an_unmodelled_layer_is_named(self):
        inp = keras.Input((8, 8, 3))
        backbone = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(keras.layers.UpSampling2D(name="up")(inp)))
        top = keras.Input((8, 8, 3))
        with self.assertRaisesRegex(Exception, "up: layer type UpSampling2D"):
            Simulated(keras.Model(top, backbone(top)))(tf.constant(images(1, 4)[:, :8, :8]))


class FloatFile(unittest.TestCase):
    def test_the_float_file_carries_its_weights_computes_the_core_and_is_checked_against_it(self):
        from ai_edge_litert.interpreter import Interpreter

        from dermedge_export.errors import ExportError

        core = tiny_core(12)
        x = images(2, 13)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "m.fp32.tflite"
            write_float_tflite(core, path, 16)
            interp = Interpreter(model_path=str(path))
            ops = {op["op_name"] for op in interp._get_ops_details()}
            self.assertFalse(ops & {"VAR_HANDLE", "READ_VARIABLE"}, ops)
            out = interp.get_signature_runner("serving_default")(image=x[:1])["embedding"]
            np.testing.assert_allclose(out, core(x[:1], training=False).numpy(), rtol=1e-4, atol=1e-5)
            self.assertLess(check_float_tflite(core, path, x), 1e-5)
            # A model that no longer matches its file (a weight changed after writing) is named.
            stem = core.layers[-1].get_layer("stem")
            stem.kernel.assign(stem.kernel * 1.5)
            with self.assertRaisesRegex(ExportError, "m.fp32.tflite: computes .* away from the fine-tuned"):
                check_float_tflite(core, path, x)
            # Nor does a NaN output pass (NaN compares false with every bound).
            x[1, 0, 0, 0] = np.nan
            with self.assertRaisesRegex(ExportError, "computes nan"):
                check_float_tflite(core, path, x)


class FineTune(unittest.TestCase):
    def test_the_power_loss_is_mean_delta2_at_2_leans_to_the_worst_image_above_and_keeps_its_scale(self):
        d2 = tf.constant([0.01, 0.04, 0.25])
        self.assertAlmostEqual(float(power_loss(d2, 2.0)), 0.1, places=6)
        self.assertGreater(float(power_loss(d2, 8.0)), float(power_loss(d2, 4.0)))
        self.assertGreater(float(power_loss(d2, 4.0)), 0.1)
        self.assertLess(float(power_loss(d2, 16.0)), 0.25)
        for p in (1.0, 2.0, 6.0):
            self.assertAlmostEqual(float(power_loss(tf.constant([0.09, 0.09]), p)), 0.09, places=6)
        # The worst image's share of the gradient grows with p.
        shares = []
        for p in (2.0, 8.0):
            x = tf.Variable([0.01, 0.25])
            with tf.GradientTape() as tape:
                loss = power_loss(x, p)
            g = tape.gradient(loss, x).numpy()
            shares.append(g[1] / g.sum())
        self.assertGreater(shares[1], shares[0])
        # An exact image (δ² = 0) leaves every gradient finite, at any allowed power.
        for p in (1.0, 2.0, 16.0):
            for d2 in ([0.0, 0.04], [0.0, 0.0], [1e-7, 1e-7]):
                x = tf.Variable(d2)
                with tf.GradientTape() as tape:
                    loss = power_loss(x, p)
                self.assertTrue(np.all(np.isfinite(tape.gradient(loss, x).numpy())), (p, d2))

    def test_the_kept_weights_are_the_best_validation_epochs(self):
        core = tiny_core(5)
        untouched = [v.numpy() for v in core.trainable_variables]
        with tempfile.TemporaryDirectory() as d:
            record = fine_tune(core, images(8, 6), images(6, 7), epochs=3, learning_rate=1e-2, batch=2, out=Path(d),
                               progress=lambda line: None)
            self.assertTrue((Path(d) / "qat.json").is_file())
        p99 = [h["validation"]["delta_p99"] for h in record["history"]]
        self.assertEqual(record["kept_epoch"], int(np.argmin(p99)))
        changed = any(not np.array_equal(a, v.numpy()) for a, v in zip(untouched, core.trainable_variables))
        self.assertEqual(changed, record["kept_epoch"] > 0)

    def test_ranges_chosen_again_during_training_and_targets_kept_in_their_cache(self):
        core = tiny_core(8)
        with tempfile.TemporaryDirectory() as d:
            cache = Path(d) / "targets.npz"
            with mock.patch.object(Simulated, "calibrate", autospec=True, side_effect=Simulated.calibrate) as chosen:
                record = fine_tune(core, images(4, 9), images(4, 10), epochs=2, learning_rate=1e-3, batch=2,
                                   out=Path(d), progress=lambda line: None, targets_cache=cache, recalibrate_every=1)
            self.assertEqual([h["epoch"] for h in record["history"]], [0, 1, 2])
            self.assertEqual(chosen.call_count, 2)  # before training, and again before epoch 2
            with mock.patch("dermedge_export.qat.embed", side_effect=AssertionError("computed again")):
                # The same inputs and untrained weights (the core above has trained): read from the cache.
                self.assertEqual(float_targets(Simulated(tiny_core(8)), images(4, 9), images(4, 10), 2, cache)[0].shape,
                                 (VIEWS, 4, 12))
            with np.load(cache) as z:
                self.assertEqual(z["views"].shape, (VIEWS, 4, 12))
                kept = str(z["key"])
            # Other weights are another model: its targets are computed again, not read.
            fine_tune(tiny_core(11), images(4, 9), images(4, 10), epochs=1, learning_rate=1e-3, batch=2, out=Path(d),
                      progress=lambda line: None, targets_cache=cache)
            with np.load(cache) as z:
                self.assertNotEqual(str(z["key"]), kept)



class CommandLine(unittest.TestCase):
    """Refusals come before the model is loaded or anything is computed, with exit status 2."""

    def refused(self, *argv: str) -> str:
        import contextlib
        import io

        from dermedge_export.qat import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(main(list(argv)), 2)
        return err.getvalue()

    def test_bad_inputs_and_options_are_refused_by_name(self):
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            small = d / "small.npz"
            np.savez(small, inputs=images(2, 1), names=np.array(["a", "b"]))
            right = d / "right.npz"
            np.savez(right, inputs=np.zeros((2, 448, 448, 3), np.float32), names=np.array(["a", "b"]))
            one = d / "one.npz"
            np.savez(one, inputs=np.zeros((1, 448, 448, 3), np.float32), names=np.array(["a"]))
            (d / "file").write_text("")
            common = ["--calibration", str(right), "--validation", str(right), "--out"]
            self.assertIn("/etc/passwd", self.refused("--calibration", "/etc/passwd", "--validation", str(right),
                                                      "--out", str(d / "o")))
            self.assertIn(f"{small}: inputs of shape [16, 16, 3]",
                          self.refused("--calibration", str(small), "--validation", str(right), "--out", str(d / "o")))
            self.assertIn("at least 2 validation images",
                          self.refused("--calibration", str(right), "--validation", str(one), "--out", str(d / "o")))
            self.assertIn("is not a directory", self.refused(*common, str(d / "file")))
            self.assertIn("--epochs", self.refused(*common, str(d / "o"), "--epochs", "0"))
            for rate in ("inf", "nan", "0"):
                self.assertIn("--learning-rate", self.refused(*common, str(d / "o"), "--learning-rate", rate))
            for power in ("0.5", "17", "nan"):
                self.assertIn(f"--loss-power {float(power)}", self.refused(*common, str(d / "o"), "--loss-power", power))
            self.assertFalse((d / "o").exists(), "nothing written for a refused run")

if __name__ == "__main__":
    unittest.main()
