"""The recipe search's own logic: which layers stay in float, the calibration augmentation, and
how results are chosen and reported (the conversions themselves run in the documented search)."""
import json
import re
import tempfile
import unittest
from unittest import mock
from pathlib import Path

import numpy as np

from dermedge_export import recipes
from dermedge_export.errors import ExportError
from dermedge_export.options import RECIPE_NAMES


def context(**given) -> recipes.Context:
    """A search context with placeholder paths; a test gives what it uses."""
    fields = dict(core_dir=Path("c"), integer_core_dir=None, name="m", version="1", out=Path("o"), pre=None, dim=4,
                  cal_inputs=[], plain_int8=Path("p"), fp32_manifest=Path("f"), fp32_tflite=Path("f"),
                  layer_errors=Path("l"), debug_count=1, dermedge="d", validation=Path("v"), holdout=None,
                  threads=2, latency_budget=1.2, bench_runs=1)
    return recipes.Context(**{**fields, **given})


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

    def test_a_non_square_input_is_flipped_but_not_rotated(self):
        x = np.zeros((1, 4, 6, 3), dtype=np.float32)
        out = recipes.augmented([x])
        self.assertEqual([a.shape for a in out], [x.shape] * 3)

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
        self.assertIn("| int8-plain | 1.0 | – | 0.100 | 1.00x | – | – | 0.5000 |", text)

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
        ctx = context(integer_core_dir=Path("i"), only=("dynamic-range-int8",))
        self.assertEqual([r.name for r in recipes.selected(ctx)], ["int8-plain", "dynamic-range-int8"])
        ctx.only = None
        without = [n for n in RECIPE_NAMES if not n.startswith(("aeq-mixed-", "aeq-int8-qat-mse"))]
        self.assertEqual([r.name for r in recipes.selected(ctx)], without)
        # The mixed-precision recipes need a sensitivity run's ranking, and say so when asked for.
        ctx.only = ("aeq-mixed-8",)
        with self.assertRaisesRegex(ExportError, "aeq-mixed-8 needs --sensitivity"):
            recipes.selected(ctx)
        ctx.sensitivity = Path("m.sensitivity.json")
        self.assertEqual([r.name for r in recipes.selected(ctx)], ["int8-plain", "aeq-mixed-8"])
        # So does the fine-tuned one: it quantises a fine-tuning run's float file.
        ctx.only = ("aeq-int8-qat-mse",)
        with self.assertRaisesRegex(ExportError, "aeq-int8-qat-mse needs --qat"):
            recipes.selected(ctx)
        ctx.only = ("aeq-int8-qat-mse", "aeq-int8-qat-mse-affine")
        with self.assertRaisesRegex(ExportError, "aeq-int8-qat-mse-affine needs --qat"):
            recipes.selected(ctx)
        ctx.qat = Path("qat/m.fp32.tflite")
        picked = recipes.selected(ctx)
        self.assertEqual([r.name for r in picked], ["int8-plain", "aeq-int8-qat-mse", "aeq-int8-qat-mse-affine"])
        # The corrected twin ships a correction and converts once with the plain one (shared).
        self.assertEqual([r.corrected for r in picked[1:]], [False, True])
        self.assertEqual({r.source for r in picked[1:]}, {ctx.qat})
        calls = []
        with mock.patch.object(recipes, "_quantizer", lambda *a, **k: calls.append(k) or b"model"):
            self.assertEqual([r.convert() for r in picked[1:]], [b"model", b"model"])
        self.assertEqual(calls, [{"source": ctx.qat}])
        ctx.only = None
        self.assertEqual([r.name for r in recipes.selected(ctx)], list(RECIPE_NAMES))

    def test_a_recipe_from_a_fine_tuned_copy_names_that_copy_and_its_checksum_in_the_manifest(self):
        from dermedge_export.manifest import Preprocessing, sha256
        work = Path(tempfile.mkdtemp())
        tuned = work / "tuned.fp32.tflite"
        tuned.write_bytes(b"fine-tuned float model")
        pre = Preprocessing("DecodePng", "ResizeBilinear", 8, 8, 1 / 255, 0.0, "x", [], True)
        ctx = context(out=work, pre=pre, qat=tuned)
        made = {r.name: r for r in recipes.recipes(ctx)}
        entry = {}
        _, manifest = recipes.write_recipe(ctx, made["aeq-int8-qat-mse"], b"converted", work, entry)
        text = manifest.read_text()
        self.assertIn(f'source = "{tuned} (a fine-tuned copy', text)
        self.assertIn(f'source_sha256 = "{sha256(tuned)}"', text)
        # A recipe of the fp32 export itself names no copy.
        _, manifest = recipes.write_recipe(ctx, made["aeq-int8"], b"converted", work, {})
        self.assertIn('source = "the exporter\'s core SavedModel"', manifest.read_text())
        self.assertNotIn("source_sha256", manifest.read_text())

    def test_the_output_correction_is_fitted_against_the_original_fp32_not_a_fine_tuned_copy(self):
        work = Path(tempfile.mkdtemp())
        ctx = context(out=work, cal_inputs=[np.zeros((1, 4, 4, 3), np.float32)] * 3,
                      fp32_tflite=Path("original.fp32.tflite"), qat=Path("tuned.fp32.tflite"))
        rng = np.random.default_rng(3)
        original = rng.normal(0, 1, (12, 4)).astype(np.float32)
        runs = []

        def run_tflite(path, samples):
            runs.append(Path(path).name)
            return original if Path(path).name == "original.fp32.tflite" else original * 2.0 + 1.0

        with mock.patch.object(recipes, "run_tflite", run_tflite):
            fit = recipes.fit_correction(ctx, work / "m.aeq-int8-qat-mse-affine.tflite", work / "c.npy")
        self.assertEqual(runs, ["original.fp32.tflite", "m.aeq-int8-qat-mse-affine.tflite"])
        self.assertLess(fit["relative_error_after"], 0.05 * fit["relative_error_before"])

    def test_the_choice_is_the_fastest_pass_within_budget_else_the_fastest_pass_said_over_budget(self):
        def entry(name, verdict, seconds, within):
            gates = {"centred_cosine_p1": {"value": 0.99 if verdict == "PASS" else 0.5, "min": 0.95,
                                           "pass": verdict == "PASS"}}
            return {"recipe": name, "invoke_median_s": seconds, "within_budget": within,
                    "fidelity": {"verdict": verdict, "gates": gates}}
        tried = [entry("int8-plain", "FAIL", 0.1, True), entry("int8-affine", "PASS", 0.11, True),
                 entry("fp16", "PASS", 0.3, False), entry("dynamic-range-int8", "PASS", 0.12, True)]
        self.assertEqual(recipes.choose(tried), {"chosen": "int8-affine", "over_budget": False})
        self.assertEqual(recipes.choose([tried[0], tried[2]]), {"chosen": "fp16", "over_budget": True})
        self.assertEqual(recipes.choose([tried[0]]), {"chosen": None, "best_tradeoff": "int8-plain"})
        text = recipes.markdown("m", {"validation": "v", "threads": 2, "latency_budget": 1.2, "recipes": [],
                                      "chosen": "fp16", "over_budget": True, "faithful": "m.fp16-faithful.toml"})
        self.assertIn("none passes within the latency budget", text)
        self.assertIn("m.fp16-faithful.toml", text)

    def test_each_ablation_step_keeps_later_op_types_and_pooling_in_float(self):
        self.assertEqual(recipes.ablation_denylist("ablation-conv-add-norm"), ["AVERAGE_POOL_2D", "MAX_POOL_2D", "MEAN"])
        first = recipes.ablation_denylist("ablation-conv")
        self.assertIn("ADD", first)
        self.assertIn("RELU", first)
        self.assertNotIn("CONV_2D", first)
        self.assertNotIn("ADD", recipes.ablation_denylist("ablation-conv-add"))

    def test_the_frontier_plots_every_judged_recipe(self):
        def entry(name, lat, delta, verdict):
            return {"recipe": name, "a76_vs_plain_int8": lat,
                    "fidelity": {"verdict": verdict, "gates": {"head_view_delta_p99": {"value": delta}}}}
        svg = recipes.frontier_svg("m", {"latency_budget": 1.2, "recipes": [
            entry("int8-plain", 1.0, 2.1, "FAIL"), entry("fp16", 2.9, 0.009, "PASS"),
            {"recipe": "int16x8", "fidelity": None}]})
        self.assertTrue(svg.startswith("<svg") and svg.rstrip().endswith("</svg>"))
        self.assertEqual(svg.count("<circle"), 2)
        self.assertIn("fp16: 2.90x", svg)
        self.assertIn("budget 1.2x", svg)
        # Recipes at nearly the same point get labels on different lines.
        svg = recipes.frontier_svg("m", {"latency_budget": 1.2, "recipes": [
            entry("int8-plain", 1.0, 1.09, "FAIL"), entry("ablation-conv-add-norm", 1.01, 1.086, "FAIL"),
            entry("fp16", 2.7, 0.056, "PASS")]})
        labels = {m[2]: (float(m[0]), float(m[1]))
                  for m in re.findall(r'<text x="([0-9.]+)" y="([0-9.]+)">([a-z0-9-]+)</text>', svg)}
        self.assertEqual(set(labels), {"int8-plain", "ablation-conv-add-norm", "fp16"})
        self.assertGreaterEqual(abs(labels["int8-plain"][1] - labels["ablation-conv-add-norm"][1]), 12)
        # One column, in the points' order from the top, each label joined to its point.
        self.assertEqual(len({lx for lx, _ in labels.values()}), 1)
        self.assertLess(labels["int8-plain"][1], labels["ablation-conv-add-norm"][1])
        self.assertLess(labels["ablation-conv-add-norm"][1], labels["fp16"][1])
        self.assertEqual(svg.count("<line") - 4, 3)  # besides the two axes, the gate and the budget
        # However many recipes, every label stays inside the picture, one line apart.
        svg = recipes.frontier_svg("m", {"latency_budget": 1.2, "recipes": [
            entry(f"r{i}", 1.0, 0.5 + i / 100, "FAIL") for i in range(60)]})
        height = float(re.search(r'<svg [^>]*height="([0-9.]+)"', svg).group(1))
        baselines = sorted(float(m) for m in re.findall(r'<text x="[0-9.]+" y="([0-9.]+)">r[0-9]+</text>', svg))
        self.assertEqual(len(baselines), 60)
        self.assertLessEqual(baselines[-1], height)
        self.assertGreaterEqual(min(b - a for a, b in zip(baselines, baselines[1:])), 12 - 1e-6)
        self.assertEqual(recipes.frontier_svg("m", {"latency_budget": 1.2, "recipes": []}).count("<circle"), 0)
        # A NaN or infinite δ is drawn at the top edge; a recipe with no finite latency is left out.
        svg = recipes.frontier_svg("m", {"latency_budget": 1.2, "recipes": [
            entry("broken", 1.0, float("nan"), "FAIL"), entry("huge", 1.0, float("inf"), "FAIL"),
            entry("untimed", float("nan"), 0.5, "FAIL"), entry("fine", 1.0, 0.5, "FAIL")]})
        self.assertNotRegex(svg, r'="[^"]*nan')  # no coordinate is NaN; the title still says what was measured
        self.assertIn("broken: 1.00x, δ p99 nan", svg)
        self.assertNotIn("untimed", svg)
        circle = r'<circle cx="[0-9.]+" cy="([0-9.]+)"[^>]*><title>([a-z]+):'
        tops = {name: float(cy) for cy, name in re.findall(circle, svg)}
        self.assertEqual(tops["broken"], tops["huge"])
        self.assertLess(tops["broken"], tops["fine"])

    def test_searches_merge_with_each_recipe_once_as_first_judged(self):
        def entry(name, delta):
            return {"recipe": name, "a76_vs_plain_int8": 1.0,
                    "fidelity": {"verdict": "FAIL", "gates": {"head_view_delta_p99": {"value": delta}}}}
        with tempfile.TemporaryDirectory() as d:
            a, b = Path(d, "a"), Path(d, "b")
            a.mkdir()
            b.mkdir()
            (a / "m.recipes.json").write_text(json.dumps({"latency_budget": 1.2, "recipes": [
                entry("int8-plain", 2.1), entry("x", 0.5)]}))
            (b / "m.recipes.json").write_text(json.dumps({"latency_budget": 2.0, "recipes": [
                entry("int8-plain", 9.9), entry("y", 0.4)]}))
            result = recipes.merged([a, b], "m")
            self.assertEqual([(e["recipe"], e["fidelity"]["gates"]["head_view_delta_p99"]["value"])
                              for e in result["recipes"]], [("int8-plain", 2.1), ("x", 0.5), ("y", 0.4)])
            self.assertEqual(result["latency_budget"], 1.2)
            with self.assertRaisesRegex(ExportError, "c/m.recipes.json"):
                recipes.merged([a, Path(d, "c")], "m")


class Correction(unittest.TestCase):
    def test_a_per_dimension_gain_and_offset_is_recovered_and_written_for_the_engine(self):
        from dermedge_export import correction
        rng = np.random.default_rng(1)
        reference = rng.normal(size=(256, 8)).astype(np.float32)
        gain = np.linspace(0.5, 1.5, 8, dtype=np.float32)
        candidate = (reference - 0.3) / gain
        scale, offset = correction.fit_affine(candidate, reference, shrink=0.0)
        np.testing.assert_allclose(scale, gain, rtol=1e-4)
        np.testing.assert_allclose(correction.apply(candidate, scale, offset), reference, atol=1e-4)
        path = correction.write(Path(tempfile.mkdtemp()) / "c.npy", scale, offset)
        stored = np.load(path)
        self.assertEqual((stored.shape, stored.dtype.str), ((2, 8), "<f4"))

    def test_a_constant_dimension_keeps_its_slope_and_moves_by_its_mean(self):
        from dermedge_export import correction
        rng = np.random.default_rng(2)
        candidate = rng.normal(size=(64, 3)).astype(np.float32)
        candidate[:, 1] = 2.0
        reference = candidate.copy()
        reference[:, 1] = 2.5
        scale, offset = correction.fit_affine(candidate, reference)
        self.assertAlmostEqual(float(scale[1]), 1.0, places=3)
        self.assertAlmostEqual(float(candidate[0, 1] * scale[1] + offset[1]), 2.5, places=3)
        with self.assertRaises(ValueError):
            correction.fit_affine(candidate, reference[:, :2])
        with self.assertRaises(ValueError):
            correction.write(Path(tempfile.mkdtemp()) / "c.npy", np.array([np.nan], np.float32), scale[:1])
        with self.assertRaisesRegex(ValueError, "refuses"):
            correction.write(Path(tempfile.mkdtemp()) / "c.npy", np.array([2e6], np.float32), scale[:1])


class CostModel(unittest.TestCase):
    """The Cortex-A76 estimate on one-op graphs built with the converter: int8 convolutions come out
    2-3x faster than float32 ones, and the work counted is the convolution's."""

    @staticmethod
    def conv_model(int8: bool) -> bytes:
        import tensorflow as tf
        rng = np.random.default_rng(0)
        weights = tf.constant(rng.normal(size=(3, 3, 16, 32)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([1, 32, 32, 16], tf.float32)])
        def f(x):
            return tf.nn.relu(tf.nn.conv2d(x, weights, 1, "SAME"))

        conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()])
        if int8:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ([rng.normal(size=(1, 32, 32, 16)).astype(np.float32)] for _ in range(4))
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        return conv.convert()

    def test_int8_convolutions_cost_a_third_to_a_half_of_float_ones(self):
        from dermedge_export import costmodel
        fp32 = costmodel.estimate(self.conv_model(False), threads=1)
        int8 = costmodel.estimate(self.conv_model(True), threads=1)
        macs = 32 * 32 * 32 * 3 * 3 * 16
        self.assertAlmostEqual(fp32["by_arithmetic"]["float32"]["gmacs"], round(macs / 1e9, 3))
        self.assertAlmostEqual(int8["by_arithmetic"]["int8"]["gmacs"], round(macs / 1e9, 3))
        ratio = fp32["seconds"] / int8["seconds"]
        self.assertTrue(2.0 <= ratio <= 3.0, ratio)
        self.assertIn("estimate", fp32["target"])
        # XNNPACK's fp16 arithmetic halves the float convolution's cost; int8 ops are unchanged.
        fp16 = costmodel.estimate(self.conv_model(False), threads=1, float_arithmetic="float16")
        self.assertAlmostEqual(fp32["seconds"] / fp16["seconds"], 2.0, places=6)
        self.assertIn("fp16 arithmetic", fp16["target"])
        self.assertEqual(costmodel.estimate(self.conv_model(True), threads=1, float_arithmetic="float16")
                         ["by_arithmetic"]["int8"], int8["by_arithmetic"]["int8"])
        with self.assertRaises(ValueError):
            costmodel.estimate(self.conv_model(False), float_arithmetic="bfloat16")

    def test_delegation_counts_xnnpack_partitions(self):
        from dermedge_export.runner import delegation
        path = Path(tempfile.mkdtemp()) / "conv.tflite"
        path.write_bytes(self.conv_model(False))
        d = delegation(path, threads=1)
        self.assertEqual((d["partitions"], d["outside"]), (1, {}))
        self.assertGreaterEqual(d["nodes"], 1)


if __name__ == "__main__":
    unittest.main()
