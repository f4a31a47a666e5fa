"""The recipe search's own logic: which layers stay in float, the calibration augmentation, and
how results are chosen and reported (the conversions themselves run in the documented search)."""
import tempfile
import unittest
from pathlib import Path

import numpy as np

from dermedge_export import recipes
from dermedge_export.options import RECIPE_NAMES


class Recipes(unittest.TestCase):
    def test_worst_layers_rank_by_error_relative_to_the_quantisation_step(self):
        csv = Path(tempfile.mkdtemp()) / "layer-errors.csv"
        csv.write_text(
            "op_name,tensor_idx,num_elements,stddev,mean_error,max_abs_error,mean_squared_error,scale,zero_point,tensor_name\n"
            "CONV_2D,1,10,0,0,0,4.0,1.0,0,big-absolute-small-relative\n"  # rmse/step 2.0
            "CONV_2D,2,10,0,0,0,1.0,0.1,0,worst\n"                        # rmse/step 10.0
            "ADD,3,10,0,0,0,0.25,0.1,0,second\n"                          # rmse/step 5.0
            "MUL,4,10,0,0,0,nan,0.1,0,not-finite\n"
            "MUL,5,10,0,0,0,1.0,0.0,0,no-step\n")
        self.assertEqual(recipes.worst_layers(csv, 2), ["worst", "second"])
        self.assertEqual(recipes.worst_layers(csv, 10), ["worst", "second", "big-absolute-small-relative"])

    def test_augmented_calibration_keeps_shape_and_adds_flips_and_rotation(self):
        x = np.arange(1 * 4 * 4 * 3, dtype=np.float32).reshape(1, 4, 4, 3)
        out = recipes.augmented([x, x + 1])
        self.assertEqual(len(out), 8)
        for a in out:
            self.assertEqual(a.shape, x.shape)
        np.testing.assert_array_equal(out[1], x[:, :, ::-1, :])
        np.testing.assert_array_equal(out[2], x[:, ::-1, :, :])
        np.testing.assert_array_equal(out[3], np.rot90(x, axes=(1, 2)))

    def test_margin_names_the_worst_gate(self):
        gates = {"centred_cosine_p1": {"value": 0.9, "pass": False}, "sqnr_db_p1": {"value": 14.0, "pass": False},
                 "top10_overlap_mean": {"value": 0.95, "pass": True}}
        self.assertAlmostEqual(recipes.margin(gates), 0.7)

    def test_margin_follows_each_gates_direction_and_an_undefined_value_is_worst(self):
        gates = {"centred_cosine_p1": {"value": 0.9, "min": 0.95, "pass": False},
                 "head_view_delta_p99": {"value": 0.66, "max": 0.33, "pass": False}}
        self.assertAlmostEqual(recipes.margin(gates), -1.0)
        gates["head_view_delta_p99"] = {"value": None, "max": 0.33, "pass": False}
        self.assertEqual(recipes.margin(gates), float("-inf"))
        entry = {"recipe": "int8-plain", "fidelity": {"verdict": "FAIL", "gates": gates}}
        self.assertIn("head_view_delta_p99 undefined", recipes.summary_line(entry))

    def test_report_without_a_passing_recipe_says_so_and_names_the_best(self):
        gates = {k: {"value": 0.5, "pass": False} for k in recipes.GATE_KEYS}
        entry = {"recipe": "int8-plain", "how": "plain", "bytes": 2**20, "invoke_median_s": 0.1,
                 "latency_vs_plain_int8": 1.0, "fidelity": {"verdict": "FAIL", "gates": gates}}
        slow = {"recipe": "int16x8", "how": "wide", "bytes": 2**21, "invoke_median_s": 4.0,
                "latency_vs_plain_int8": 40.0, "fidelity": None, "skipped": "not judged: 40.00x"}
        text = recipes.markdown("m", {"validation": "v", "threads": 2, "latency_budget": 1.2,
                                      "recipes": [entry, slow], "chosen": None, "best_tradeoff": "int8-plain"})
        self.assertIn("No recipe passes the gates", text)
        self.assertIn("**int8-plain**", text)
        self.assertIn("not judged: 40.00x", text)
        self.assertIn("| int8-plain | 1.0 | 0.100 | 1.00x | 0.5000 |", text)

    def test_squares_are_rewritten_as_multiplications_with_the_same_values(self):
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
        from dermedge_export.export import integer_friendly

        @tf.function(input_signature=[tf.TensorSpec([1, 4, 4, 8], tf.float32)])
        def group_norm(x):
            g = tf.reshape(x, [1, 4, 4, 2, 4])
            mean, var = tf.nn.moments(g, axes=[1, 2, 4], keepdims=True)  # SquaredDifference
            return tf.reshape((g - mean) * tf.math.rsqrt(var + 1e-5), [1, 4, 4, 8]) + tf.square(x)

        frozen = convert_variables_to_constants_v2(group_norm.get_concrete_function())
        gd = frozen.graph.as_graph_def()
        before = [n.op for n in gd.node]
        self.assertIn("SquaredDifference", before)
        self.assertIn("Square", before)
        self.assertEqual(integer_friendly(gd), 2)
        self.assertFalse({"Square", "SquaredDifference"} & {n.op for n in gd.node})
        inp, out = frozen.inputs[0].name, frozen.outputs[0].name
        rewritten = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(gd, name=""), [])
        run = rewritten.prune(feeds=[rewritten.graph.get_tensor_by_name(inp)],
                              fetches=rewritten.graph.get_tensor_by_name(out))
        x = tf.constant(np.random.default_rng(1).normal(size=(1, 4, 4, 8)).astype(np.float32))
        np.testing.assert_allclose(run(x).numpy(), group_norm(x).numpy(), rtol=1e-5, atol=1e-5)

    def test_only_squares_on_the_image_path_are_rewritten(self):
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
        from dermedge_export.export import integer_friendly

        w = tf.Variable(np.arange(8, dtype=np.float32).reshape(8, 1))

        @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32)])
        def layer(x):
            standardised = (w - tf.reduce_mean(w)) / tf.sqrt(tf.reduce_mean(tf.square(w)))  # on weights
            return tf.square(x) @ standardised

        frozen = convert_variables_to_constants_v2(layer.get_concrete_function())
        gd = frozen.graph.as_graph_def()
        image = frozen.inputs[0].name.split(":")[0]
        self.assertEqual(integer_friendly(gd, image=image), 1)
        self.assertEqual([n.op for n in gd.node].count("Square"), 1, "the weights' Square is left for folding")

    def test_a_search_without_the_dermedge_binary_is_a_clear_error(self):
        import contextlib
        import io
        from dermedge_export.__main__ import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["export", "/nonexistent-savedmodel", "--name", "m", "--out", tempfile.mkdtemp(),
                         "--calibration", "c", "--evaluation", "e", "--target-fidelity",
                         "--dermedge", "/nonexistent/dermedge"])
        self.assertEqual(code, 2)
        self.assertIn("/nonexistent/dermedge", err.getvalue())
        self.assertIn("cargo build --release", err.getvalue())


    def test_recipe_selection_keeps_the_plain_baseline(self):
        ctx = recipes.Context(core_dir=Path("c"), integer_core_dir=Path("i"), name="m", version="1", out=Path("o"),
                              pre=None, dim=4, cal_inputs=[], plain_int8=Path("p"), fp32_manifest=Path("f"),
                              layer_errors=Path("l"), debug_count=1, dermedge="d", validation=Path("v"), holdout=None,
                              threads=2, latency_budget=1.2, bench_runs=1, only=("dynamic-range-int8",))
        self.assertEqual([r.name for r in recipes.selected(ctx)], ["int8-plain", "dynamic-range-int8"])
        ctx.only = None
        self.assertEqual([r.name for r in recipes.selected(ctx)], list(RECIPE_NAMES))


if __name__ == "__main__":
    unittest.main()
