"""`dermedge_export.quantsim`: the simulated network is the BiT network when nothing is rounded, and
rounds exactly the tensors a selection picks."""
import json
import tempfile
import unittest
from pathlib import Path

import numpy as np
import tensorflow as tf

from dermedge_export import bit, quantsim
from dermedge_export.errors import ExportError
from dermedge_export.quantsim import FLOAT, KINDS, Selection, Simulation, int8_per_channel


def tiny_bit():
    return bit.BiT(7, stem=8, stages=[(8, 16, 1, 1), (8, 32, 2, 1)], groups=4)


def images(n, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


class Simulated(unittest.TestCase):
    def setUp(self):
        self.core = tiny_bit()
        self.sim = Simulation(self.core)
        self.sim.calibrate(images(4, seed=1))

    def test_nothing_rounded_is_the_bit_network(self):
        x = images(3)
        np.testing.assert_allclose(self.sim.embed(x, FLOAT), self.core(tf.constant(x)).numpy(), rtol=1e-5, atol=1e-6)

    def test_layers_and_convolutions_are_named_as_the_network_has_them(self):
        self.assertEqual(self.sim.layers, ["stem", "unit01", "unit02", "final"])
        self.assertEqual(sorted(self.sim.weights), ["stem/conv", "unit01/conv1", "unit01/conv2", "unit01/conv3",
                                                    "unit01/proj", "unit02/conv1", "unit02/conv2", "unit02/conv3",
                                                    "unit02/proj"])
        for lo, hi in self.sim.ranges.values():
            self.assertLessEqual(lo, hi)

    def test_the_output_lies_on_its_int8_grid_when_pooling_is_rounded(self):
        out = self.sim.embed(images(2), Selection(frozenset({"pool"}), False))
        lo, hi = self.sim.ranges["final/mean"]
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        steps = (out - lo) / ((hi - lo) / 255)
        np.testing.assert_allclose(steps, np.round(steps), atol=2e-3)
        self.assertLessEqual(len(np.unique(out)), 256)

    def test_a_layer_alone_leaves_the_others_float(self):
        x = images(3)
        reference = self.sim.embed(x, FLOAT)
        full = self.sim.embed(x, Selection(frozenset(KINDS), True))
        alone = self.sim.embed(x, Selection(frozenset(KINDS), True, frozenset({"unit02"})))
        self.assertGreater(np.abs(full - reference).max(), 0)
        self.assertGreater(np.abs(alone - reference).max(), 0)
        self.assertGreater(np.abs(full - alone).max(), 0)
        # A selection of no layer at all rounds nothing.
        np.testing.assert_array_equal(self.sim.embed(x, Selection(frozenset(KINDS), True, frozenset())), reference)

    def test_int16_statistics_move_the_embedding_far_less_than_int8(self):
        x = images(4, seed=1)  # the calibration images: nothing clipped, all the error is rounding
        reference = self.sim.embed(x, FLOAT)
        int8 = np.abs(self.sim.embed(x, Selection(frozenset({"statistics"}), False)) - reference).max()
        int16 = np.abs(self.sim.embed(x, Selection(frozenset({"statistics"}), False, wide=frozenset({"statistics"})))
                       - reference).max()
        self.assertGreater(int8, 0)
        self.assertLess(int16, int8 / 20)

    def test_rounding_before_calibration_is_refused(self):
        with self.assertRaisesRegex(ExportError, "calibrate before rounding"):
            Simulation(self.core).embed(images(1), Selection(frozenset({"conv"}), False))

    def test_per_channel_weights_keep_each_channels_largest_value_on_a_127_step_grid(self):
        w = np.random.default_rng(2).normal(size=(3, 3, 4, 5)).astype(np.float32)
        w[..., 4] = 0.0
        q = int8_per_channel(w)
        peak = np.abs(w[..., :4]).max(axis=(0, 1, 2))
        np.testing.assert_allclose(np.abs(q[..., :4]).max(axis=(0, 1, 2)), peak, rtol=1e-6)
        steps = q[..., :4] / (peak / 127)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
        np.testing.assert_array_equal(q[..., 4], 0.0)


class Measure(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.d = Path(self.dir.name)

    def tearDown(self):
        self.dir.cleanup()

    def save(self, name, x):
        path = self.d / name
        np.savez(path, inputs=x, names=np.array([f"img-{k}" for k in range(len(x))]))
        return path

    def test_df_mini_ablation_and_layers_are_written(self):
        rng = np.random.default_rng(3)
        cal = self.save("cal.npz", rng.uniform(0, 1, (2, 448, 448, 3)).astype(np.float32))
        xs = self.save("eval.npz", rng.uniform(0, 1, (3, 448, 448, 3)).astype(np.float32))
        result = quantsim.measure("df-mini", cal, xs, self.d / "out", layer_images=2, progress=lambda _: None)
        saved = json.loads((self.d / "out" / "df-mini.quantsim.json").read_text())
        self.assertEqual(saved["standin"], "df-mini")
        self.assertEqual([r["variant"] for r in saved["ablation"]], [v[0] for v in quantsim.ABLATION])
        self.assertEqual([r["variant"] for r in saved["levers"]], [v[0] for v in quantsim.LEVERS])
        self.assertEqual({r["layer"] for r in saved["layers_ranked"]}, {"stem", "unit01", "unit02", "unit03", "unit04", "final"})
        self.assertEqual(len(saved["layer_images"]), 2)
        by_variant = {r["variant"]: r for r in result["ablation"]}
        weights, full = by_variant["int8 weights, float arithmetic"], by_variant["+ pooling: every op int8"]
        self.assertGreater(weights["delta_median"], 0)
        self.assertGreater(full["delta_median"], weights["delta_median"])
        self.assertEqual(len(full["worst"]), 3)
        self.assertIn("Each layer rounded alone", (self.d / "out" / "df-mini.quantsim.md").read_text())
        only = quantsim.measure("df-mini", cal, xs, self.d / "out", parts=("levers",), progress=lambda _: None)
        self.assertNotIn("ablation", only)
        self.assertNotIn("layers_ranked", only)
        # The same simulation gives the same numbers, and a partial run does not overwrite the full one.
        self.assertEqual(only["levers"], result["levers"])
        self.assertTrue((self.d / "out" / "df-mini.quantsim-levers.json").is_file())
        self.assertEqual(json.loads((self.d / "out" / "df-mini.quantsim.json").read_text()), saved)

    def test_bad_inputs_are_refused_by_name(self):
        small = self.save("small.npz", images(2))
        with self.assertRaisesRegex(ExportError, r"small.npz: inputs of shape \[32, 32, 3\], but df-mini takes \[448, 448, 3\]"):
            quantsim.measure("df-mini", small, small, self.d / "out", progress=lambda _: None)
        with self.assertRaisesRegex(ExportError, "'df-huge' is not a BiT stand-in"):
            quantsim.measure("df-huge", small, small, self.d / "out", progress=lambda _: None)
        with self.assertRaisesRegex(ExportError, "--only takes a comma-separated subset of ablation, levers, layers, not 'levers,everything'"):
            quantsim.measure("df-mini", small, small, self.d / "out", parts=("levers", "everything"), progress=lambda _: None)
        with self.assertRaisesRegex(ExportError, "--layer-images must be at least 2"):
            quantsim.measure("df-mini", small, small, self.d / "out", layer_images=1, progress=lambda _: None)
        (self.d / "junk.npz").write_bytes(b"not an npz")
        with self.assertRaisesRegex(ExportError, "junk.npz: not an inputs file"):
            quantsim.measure("df-mini", self.d / "junk.npz", small, self.d / "out", progress=lambda _: None)
        self.assertFalse((self.d / "out").exists())


if __name__ == "__main__":
    unittest.main()
