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
from dermedge_export.quantsim import FLOAT, KINDS, Selection, Simulation, int8_per_tensor, per_channel


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

    def test_the_output_lies_on_its_int8_grid_when_pooling_is_rounded(self):
        out = self.sim.embed(images(2), Selection(frozenset({"pool"}), False))
        lo, hi = self.sim.ranges["final/mean"]
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        steps = (out - lo) / ((hi - lo) / 255)
        np.testing.assert_allclose(steps, np.round(steps), atol=2e-3)
        self.assertLessEqual(len(np.unique(out)), 256)

    def rounded(self, selection, x):
        """The tensors a selection rounds, with the range each is rounded at."""
        seen = {}
        original = Simulation._round

        def spy(sim, layer, kind, name, t, shares=None):
            if sim._selection.bits(layer, kind) is not None:
                seen[name] = shares or name
            return original(sim, layer, kind, name, t, shares)

        Simulation._round = spy
        try:
            self.sim.embed(x, selection)
        finally:
            Simulation._round = original
        return seen

    def test_a_layer_alone_rounds_its_own_tensors_and_reads_its_input_as_int8(self):
        x = images(2)
        reference = self.sim.embed(x, FLOAT)
        alone = Selection(frozenset(KINDS), True, frozenset({"unit02"}))
        self.assertGreater(np.abs(self.sim.embed(x, alone) - reference).max(), 0)
        seen = self.rounded(alone, x)
        self.assertTrue(seen)
        self.assertTrue(all(name.startswith("unit02/") for name in seen), seen)
        # Its input is unit01's output: read at unit01's range, not a new one.
        self.assertEqual(seen["unit02/gn_a/input"], "unit01/add")
        every = self.rounded(Selection(frozenset(KINDS), True), x)
        self.assertEqual({n.split("/")[0] for n in every}, set(self.sim.layers))
        # A selection of no layer at all rounds nothing.
        np.testing.assert_array_equal(self.sim.embed(x, Selection(frozenset(KINDS), True, frozenset())), reference)

    def test_ranges_are_shared_where_the_converter_shares_them(self):
        every = self.rounded(Selection(frozenset(KINDS), True), images(2))
        self.assertEqual(every["stem/max_pool"], "stem/conv/output")
        self.assertEqual(every["unit01/gn_a/input"], "stem/conv/output")
        self.assertEqual(every["unit01/conv3/output"], "unit01/add")
        self.assertEqual(every["unit01/gn_a/variance_eps"], "unit01/gn_a/variance")
        # Without int8 adds the branch's last convolution keeps a range of its own.
        convs = self.rounded(Selection(frozenset({"conv"}), True), images(2))
        self.assertEqual(convs["unit01/conv3/output"], "unit01/conv3/output")
        self.assertNotIn("unit01/add", convs)

    def test_statistics_kept_float_still_reach_the_int8_sub_and_mul_as_int8(self):
        seen = self.rounded(Selection(frozenset(KINDS) - {"statistics"}, True), images(2))
        # The int8 SUB and MUL read mean and rsqrt as int8 tensors...
        self.assertIn("unit01/gn_a/mean", seen)
        self.assertIn("unit01/gn_a/rsqrt", seen)
        # ...while the square, variance and variance + eps stay float.
        for part in ("square", "variance", "variance_eps"):
            self.assertNotIn(f"unit01/gn_a/{part}", seen)

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
        q = per_channel(w)
        peak = np.abs(w[..., :4]).max(axis=(0, 1, 2))
        np.testing.assert_allclose(np.abs(q[..., :4]).max(axis=(0, 1, 2)), peak, rtol=1e-6)
        steps = q[..., :4] / (peak / 127)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)
        np.testing.assert_array_equal(q[..., 4], 0.0)
        # int10 rounds four times finer.
        error8, error10 = np.abs(q - w).max(), np.abs(per_channel(w, 10) - w).max()
        self.assertLess(error10, error8 / 3)

    def test_gamma_and_beta_are_int8_per_tensor_with_zero_exact(self):
        v = np.array([0.6, 0.9, 1.4, 0.0], np.float32)
        q = int8_per_tensor(v)
        scale = 1.4 / 255
        self.assertEqual(q[3], 0.0)
        np.testing.assert_allclose(q, v, atol=scale / 2 + 1e-7)
        self.assertLessEqual(len(np.unique(np.round((q / scale)).astype(int))), 4)
        levels = len(np.unique(int8_per_tensor(np.linspace(-1, 1, 1000).astype(np.float32))))
        self.assertGreaterEqual(levels, 255)
        self.assertLessEqual(levels, 256)


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
        # Asked twice or out of order, a part is still one part, in the usual order.
        again = quantsim.measure("df-mini", cal, xs, self.d / "out", parts=("levers", " levers"), progress=lambda _: None)
        self.assertEqual(again["parts"], ["levers"])
        self.assertEqual(json.loads((self.d / "out" / "df-mini.quantsim.json").read_text()), saved)

    def test_the_cli_refuses_inputs_of_the_other_standin_without_a_traceback(self):
        rng = np.random.default_rng(4)
        path = self.d / "r101.npz"
        np.savez(path, inputs=rng.uniform(-1, 1, (2, 448, 448, 3)).astype(np.float32), names=np.array(["a", "b"]),
                 scale=np.float64(1 / 127.5), offset=np.float64(-1.0))
        with self.assertRaisesRegex(ExportError, r"r101.npz: inputs made with scale 0.00784314 and offset -1, but "
                                                 r"df-mini takes scale 0.00392157 and offset 0"):
            quantsim.measure("df-mini", path, path, self.d / "out", progress=lambda _: None)
        np.save(self.d / "plain.npy", np.zeros((2, 448, 448, 3), np.float32))
        self.assertEqual(quantsim.main(["df-mini", "--calibration", str(self.d / "plain.npy"), "--images", str(path),
                                        "--out", str(self.d / "out")]), 2)
        (self.d / "a-file").write_text("")
        with self.assertRaisesRegex(ExportError, "a-file/out: cannot write the results there"):
            quantsim.measure("df-r101x3", path, path, self.d / "a-file" / "out", progress=lambda _: None)

    def test_standin_preprocessing_is_what_the_serving_graph_computes(self):
        from dermedge_export.standins import bit_preprocessing

        mini, r101 = bit_preprocessing("df-mini"), bit_preprocessing("df-r101x3")
        self.assertEqual((mini.height, mini.width), (448, 448))
        np.testing.assert_allclose((mini.scale, mini.offset), (1 / 255, 0.0), rtol=1e-12)
        np.testing.assert_allclose((r101.scale, r101.offset), (1 / 127.5, -1.0), rtol=1e-12)

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
