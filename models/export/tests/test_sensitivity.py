"""The per-layer sensitivity tool and its conversions, on the committed df-mini fixture.

Runs in the quantizer venv (`scripts/python-env.sh --venv quantizer -m unittest
models/export/tests/test_sensitivity.py`); skipped where the AI Edge Quantizer is not installed.
"""
import importlib.util
import json
import os
import tempfile
import unittest
from pathlib import Path

import numpy as np

from dermedge_export import sensitivity as S
from dermedge_export.errors import ExportError

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "tests" / "fixtures" / "df-mini" / "df-mini.fp32.tflite"
HAVE_QUANTIZER = importlib.util.find_spec("ai_edge_quantizer") is not None
# scripts/test.sh sets this: there the quantizer venv must be whole, not skipped.
if os.environ.get("DERMEDGE_REQUIRE_QUANTIZER") and not HAVE_QUANTIZER:
    raise ImportError("DERMEDGE_REQUIRE_QUANTIZER is set but ai_edge_quantizer does not import")


def inputs(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, inputs=rng.uniform(0, 255, (n, 448, 448, 3)).astype(np.float32),
             names=np.array([f"x{i}" for i in range(n)]))
    return path


def renamed(model: bytes) -> bytes:
    """`model` with every tensor renamed (what a quantizer that renamed activations would give)."""
    from ai_edge_litert.tools import flatbuffer_utils as fu
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    flat = fb.read_model(bytearray(model))
    for t in flat.subgraphs[0].tensors:
        t.name = S._tensor_name(t).encode() + b"/renamed"
    return bytes(fu.convert_object_to_bytearray(flat))


def check_patches(test, model: bytes, x: np.ndarray, only: str | None = None) -> int:
    """Assert that act(patches · Wᵀ + b) is each convolution's output (every position, fused
    NONE or RELU); returns how many convolutions were checked."""
    from unittest import mock

    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    flat = fb.read_model(bytearray(model))
    graph = flat.subgraphs[0]
    interp = next(S.calibration_runs(model, x))
    checked = 0
    with mock.patch.object(S, "GPTQ_POSITIONS_PER_IMAGE", 10**9):  # every position, in order
        for op in graph.operators:
            conv = S._conv_weights(flat, graph, op)
            activation = getattr(op.builtinOptions, "fusedActivationFunction", 0)
            if not conv or (only and conv[0] != only) or activation not in (0, 1):
                continue
            name, w, b, _ = conv
            p = S._patches(interp.get_tensor(int(op.inputs[0])), w.shape, op.builtinOptions, np.random.default_rng(0))
            if name == "CONV_2D":
                y = p.reshape(len(p), -1).astype(np.float64) @ w.reshape(w.shape[0], -1).T.astype(np.float64)
            else:
                p = np.repeat(p, w.shape[3] // p.shape[3], axis=3)
                y = np.einsum("pkc,kc->pc", p.reshape(len(p), -1, p.shape[3]).astype(np.float64),
                              w.reshape(-1, w.shape[3]).astype(np.float64))
            y = y + (0.0 if b is None else b)
            y = np.maximum(y, 0.0) if activation == 1 else y
            out = interp.get_tensor(int(op.outputs[0])).reshape(len(y), -1)
            np.testing.assert_allclose(y, out, rtol=1e-3, atol=1e-3 * (np.abs(out).max() + 1e-6))
            checked += 1
    test.assertGreater(checked, 0)
    return checked


class HeadViewDelta(unittest.TestCase):
    def test_a_gain_is_no_error_and_a_shift_of_the_image_part_is(self):
        rng = np.random.default_rng(0)
        reference = rng.normal(size=(8, 16)) + 5.0
        self.assertLess(S.head_view_delta(reference * 0.7, reference).max(), 1e-12)
        swapped = reference[::-1]
        self.assertGreater(np.median(S.head_view_delta(swapped, reference)), 0.5)

    def test_int8_weight_error_is_within_half_a_step_per_channel(self):
        w = np.random.default_rng(1).normal(size=(4, 3, 3, 5)).astype(np.float32)
        w[2] *= 100.0  # one channel's range must not set another's step
        error = S.int8_weight_error(w, 0)
        step = np.abs(w).reshape(4, -1).max(1) / 127.0
        self.assertTrue(np.all(np.abs(error).reshape(4, -1).max(1) <= step / 2 + 1e-6))
        self.assertLess(np.abs(error[0]).max(), step[2] / 100)


class MseRange(unittest.TestCase):
    def test_uniform_values_keep_their_range_and_an_outlier_is_clipped(self):
        rng = np.random.default_rng(2)
        uniform = rng.uniform(0.0, 6.0, 20000)
        lo, hi = S.mse_range(uniform, 0.0, 6.0)
        self.assertEqual(lo, 0.0)
        self.assertGreater(hi, 5.5)
        # Post-ReLU values whose observed maximum (40, from a pixel the sample missed) is far out
        # in the tail: min/max would spend most of the 256 steps on values that hardly occur.
        tailed = np.abs(rng.laplace(0.0, 1.0, 200000))
        lo, hi = S.mse_range(tailed, 0.0, 40.0)
        self.assertLess(hi, 20.0)
        self.assertLess(S.int8_range_error(tailed, lo, hi), S.int8_range_error(tailed, 0.0, 40.0) / 2)

    def test_zero_stays_representable(self):
        lo, hi = S.mse_range(np.linspace(2.0, 3.0, 100), 2.0, 3.0)
        self.assertEqual(lo, 0.0)
        self.assertGreater(hi, 2.9)


class Gptq(unittest.TestCase):
    def test_columns_are_rounded_to_the_grid_and_the_output_error_is_less_than_nearest_rounding(self):
        rng = np.random.default_rng(3)
        # Correlated inputs (a shared component), as activations are: what GPTQ exploits.
        x = rng.normal(size=(4000, 12)) + rng.normal(size=(4000, 1)) * 2.0
        w = rng.normal(size=(6, 12))
        h = (x.T @ x / len(x))[None]
        scale = np.abs(w).max(1)[None] / 127.0
        rounded = S._gptq(w[None], h, scale)[0]
        steps = rounded / scale[0][:, None]
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
        self.assertLessEqual(np.abs(steps).max(), 127 + 1e-9)
        nearest = np.round(w / scale[0][:, None]) * scale[0][:, None]
        gptq_error = np.mean(((rounded - w) @ x.T) ** 2)
        nearest_error = np.mean(((nearest - w) @ x.T) ** 2)
        self.assertLess(gptq_error, nearest_error / 2)


@unittest.skipUnless(HAVE_QUANTIZER, "the AI Edge Quantizer venv: scripts/python-env.sh --venv quantizer")
class OnTheFixture(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        d = Path(cls.dir.name)
        cls.model = MODEL.read_bytes()
        cls.cal = inputs(d / "cal.npz", 2, 0)
        cls.images = inputs(d / "images.npz", 3, 1)

    @classmethod
    def tearDownClass(cls):
        cls.dir.cleanup()

    def test_conversions_keep_float_input_and_output_and_run(self):
        xs, _ = S.load_inputs(self.images)
        reference = S.Runner(self.model).embed(xs)
        out = Path(self.dir.name) / "int8.tflite"
        done = S.convert(MODEL, self.cal, "int8", out)
        self.assertEqual(done["calibration_count"], 2)
        runner = S.Runner(out.read_bytes())
        self.assertEqual(runner.input_detail["dtype"], np.float32)
        self.assertEqual(runner.output_detail["dtype"], np.float32)
        candidate = runner.embed(xs)
        self.assertEqual(candidate.shape, reference.shape)
        self.assertTrue(np.all(np.isfinite(candidate)))
        self.assertFalse(np.array_equal(candidate, reference), "int8 gave the float model's embeddings exactly")

    def test_bias_correction_changes_only_biases_by_the_weights_error_times_the_input_mean(self):
        cal, _ = S.load_inputs(self.cal)
        corrected = S.bias_corrected(self.model, cal)
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

        before, after = fb.read_model(bytearray(self.model)), fb.read_model(bytearray(corrected))
        convs = [(S._conv_weights(before, before.subgraphs[0], a), S._conv_weights(after, after.subgraphs[0], b))
                 for a, b in zip(before.subgraphs[0].operators, after.subgraphs[0].operators)]
        convs = [(a, b) for a, b in convs if a]
        self.assertTrue(convs)
        for a, b in convs:
            np.testing.assert_array_equal(a[1], b[1])
        self.assertTrue(any(not np.array_equal(a[2], b[2]) for a, b in convs), "no bias moved")
        # The first convolution reads the graph's input, whose per-channel mean the test knows:
        # its bias moved by exactly -(Q(W) - W) . E[x].
        graph = before.subgraphs[0]
        first = next((op for op in graph.operators
                      if S._conv_weights(before, graph, op) and op.inputs[0] == graph.inputs[0]), None)
        self.assertIsNotNone(first, "df-mini's first convolution reads the input")
        name, w, b, axis = S._conv_weights(before, graph, first)
        mean = cal.reshape(-1, cal.shape[-1]).mean(0)
        error = S.int8_weight_error(w, axis)
        expected = b - (np.einsum("ohwi,i->o", error, mean) if name == "CONV_2D"
                        else error.sum((0, 1, 2)) * np.repeat(mean, w.shape[3] // mean.shape[0]))
        index = graph.operators.index(first)
        moved = S._conv_weights(after, after.subgraphs[0], after.subgraphs[0].operators[index])[2]
        np.testing.assert_allclose(moved, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
        # An op kept float keeps its bias: correcting it would add the error the correction removes.
        kept = fb.read_model(bytearray(S.bias_corrected(self.model, cal, kept_float={index})))
        unmoved = S._conv_weights(kept, kept.subgraphs[0], kept.subgraphs[0].operators[index])[2]
        np.testing.assert_array_equal(unmoved, b)

    def test_judge_writes_each_conversion_and_its_delta(self):
        out = Path(self.dir.name) / "judged"
        result = S.judge(MODEL, self.cal, self.images, out, ["int8", "int8-weights-gptq"], progress=lambda _: None)
        rows = {r["conversion"]: r for r in result["judged"]}
        self.assertEqual(set(rows), {"int8", "int8-weights-gptq"})
        for conversion, row in rows.items():
            self.assertTrue((out / f"df-mini.{conversion}.tflite").is_file())
            self.assertTrue(0 < row["delta_median"] <= row["delta_p99"] < 10, row)
            profile = row["activation_error"]
            self.assertGreater(profile["convolutions"], 0)
            self.assertTrue(0 <= profile["bias_share_median"] <= profile["bias_share_max"] <= 1, profile)
        # int8 activations err more at each convolution than float ones behind int8 weights.
        self.assertGreater(rows["int8"]["activation_error"]["relative_rms_error_median"],
                           rows["int8-weights-gptq"]["activation_error"]["relative_rms_error_median"])
        self.assertLess(rows["int8-weights-gptq"]["delta_p99"], rows["int8"]["delta_p99"])
        written = json.loads((out / "df-mini.judged.json").read_text())
        self.assertEqual([r["conversion"] for r in written["judged"]], ["int8", "int8-weights-gptq"])
        self.assertIn("| int8-weights-gptq |", (out / "df-mini.judged.md").read_text())
        with self.assertRaisesRegex(ExportError, "--judge: expected conversions from .*got int4"):
            S.judge(MODEL, self.cal, self.images, out, ["int8", "int4"])
        with self.assertRaisesRegex(ExportError, "got an empty name"):  # "int8," on the command line
            S.judge(MODEL, self.cal, self.images, out, ["int8", ""])
        with self.assertRaisesRegex(ExportError, "the mixed ones need a ranking.*got mixed"):
            S.judge(MODEL, self.cal, self.images, out, ["int8", "mixed"])
        # A fine-tuned copy is judged against the original: the same conversion, another reference.
        original = Path(self.dir.name) / "original.tflite"
        original.write_bytes(S.with_weight_noise(self.model, 0.05))
        against = S.judge(MODEL, self.cal, self.images, Path(self.dir.name) / "against", ["int8"],
                          progress=lambda _: None, reference_model=original)
        self.assertEqual((against["model"], against["reference"]), (str(MODEL), str(original)))
        self.assertNotAlmostEqual(against["judged"][0]["delta_median"], rows["int8"]["delta_median"], places=4)
        self.assertEqual(S.main([str(MODEL), "--calibration", str(self.cal), "--images", str(self.images),
                                 "--out", str(out), "--reference", str(original)]), 2)  # only for --judge

    def _output_errors(self, quantised: bytes, cal: np.ndarray) -> dict:
        """Each convolution's mean output error per channel, quantised against float, over `cal`
        (divided by float's active positions where it has a fused ReLU, as the correction is)."""
        from ai_edge_litert.interpreter import Interpreter
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

        flat = fb.read_model(bytearray(self.model))
        convs = {S._tensor_name(flat.subgraphs[0].tensors[op.outputs[0]]):
                 getattr(op.builtinOptions, "fusedActivationFunction", 0) != 0
                 for op in flat.subgraphs[0].operators if S._conv_weights(flat, flat.subgraphs[0], op)}
        q_interp = Interpreter(model_content=quantised, experimental_preserve_all_tensors=True)
        q_run = q_interp.get_signature_runner(S.SIGNATURE)
        q_detail = {d["name"]: d for d in q_interp.get_tensor_details()}
        input_name = S.Runner(self.model).input
        error, count = {n: 0.0 for n in convs}, {n: 0.0 for n in convs}
        for x, interp in zip(cal, S.calibration_runs(self.model, cal)):
            q_run(**{input_name: x[None]})
            index = {d["name"]: d["index"] for d in interp.get_tensor_details()}
            for n, relu in convs.items():
                f = interp.get_tensor(index[n])
                f = f.reshape(-1, f.shape[-1])
                q = S._dequantised(q_interp, q_detail[n]).reshape(f.shape)
                error[n] = error[n] + (q - f).sum(0)
                count[n] = count[n] + ((f > 0).sum(0) if relu else len(f))
        return {n: np.abs(error[n] / np.maximum(count[n], 1)).mean() for n in convs}

    def test_activation_correction_centres_every_output_and_moves_only_biases(self):
        cal, _ = S.load_inputs(self.cal)
        quantiser = S.Quantiser(self.model, cal, S.Runner(self.model).input, 8, ranges="mse")
        quantised = quantiser.all_but([])
        shifts, done = S.activation_bias_corrections(self.model, quantised, cal)
        self.assertEqual(done["activation_correction_convolutions"], len(shifts))
        corrected = S.with_bias_shifts(self.model, shifts)
        before = self._output_errors(quantised, cal)
        after = self._output_errors(quantiser.all_but([], corrected), cal)
        # On the images it was measured on, the convolutions' outputs are centred on float's again
        # (what is left: the shifts' rounding to whole bias steps and ReLU's boundary).
        self.assertEqual(set(before), set(shifts))
        self.assertLess(sum(after.values()), 0.03 * sum(before.values()), (before, after))
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

        a, b = fb.read_model(bytearray(self.model)), fb.read_model(bytearray(corrected))
        for x, y in zip(a.subgraphs[0].operators, b.subgraphs[0].operators):
            old, new = S._conv_weights(a, a.subgraphs[0], x), S._conv_weights(b, b.subgraphs[0], y)
            if old:
                np.testing.assert_array_equal(old[1], new[1])
                name = S._tensor_name(a.subgraphs[0].tensors[x.outputs[0]])
                np.testing.assert_allclose(new[2], old[2] - shifts[name], rtol=1e-5, atol=1e-6)
        with self.assertRaisesRegex(ExportError, "no such convolution"):
            S.with_bias_shifts(self.model, {"not/a/tensor": np.zeros(1)})
        # A kept op is not corrected; a quantised graph whose names differ is refused, not compared silently.
        ops = a.subgraphs[0].operators
        first = next(i for i, op in enumerate(ops) if S._conv_weights(a, a.subgraphs[0], op))
        kept, _ = S.activation_bias_corrections(self.model, quantised, cal[:1], kept_float={first})
        self.assertNotIn(S._tensor_name(a.subgraphs[0].tensors[ops[first].outputs[0]]), kept)
        self.assertEqual(len(kept), len(shifts) - 1)
        with self.assertRaisesRegex(ExportError, "not in the quantised graph"):
            S.activation_bias_corrections(self.model, renamed(quantised), cal[:1])
        # Only no activation and ReLU are corrected: a RELU6 (or TANH) would need another model of the mean.
        from ai_edge_litert.tools import flatbuffer_utils as fu

        relu6 = fb.read_model(bytearray(self.model))
        relu6.subgraphs[0].operators[first].builtinOptions.fusedActivationFunction = 3
        with self.assertRaisesRegex(ExportError, "has fused activation 3"):
            S.activation_bias_corrections(bytes(fu.convert_object_to_bytearray(relu6)), quantised, cal[:1])

    def test_adaptation_changes_only_weights_and_biases_and_fits_what_it_measured(self):
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

        cal, _ = S.load_inputs(self.cal)
        quantised = S.Quantiser(self.model, cal, S.Runner(self.model).input, 8, ranges="mse").all_but([])
        adapted, done = S.adapted_weights(self.model, quantised, cal)
        flat = fb.read_model(bytearray(self.model))
        convs = [op for op in flat.subgraphs[0].operators if S._conv_weights(flat, flat.subgraphs[0], op)]
        self.assertEqual(done["adapted_convolutions"], len(convs))
        self.assertGreater(done["adaptation_mean_steps_moved"], 0.0)
        # Same file layout; only the convolutions' int8 weights and int32 biases differ (scales and
        # activation ranges stay as calibrated).
        before, after = fb.read_model(bytearray(quantised)), fb.read_model(bytearray(adapted))
        g0, g1 = before.subgraphs[0], after.subgraphs[0]
        edited = {int(i) for op in g0.operators if len(op.inputs) > 2 for i in op.inputs[1:3]
                  if S._tensor_name(g0.tensors[op.outputs[0]]) in {S._tensor_name(flat.subgraphs[0].tensors[c.outputs[0]])
                                                                   for c in convs}}
        changed = set()
        for i, (t0, t1) in enumerate(zip(g0.tensors, g1.tensors)):
            q0, q1 = t0.quantization, t1.quantization
            if q0 is not None:
                np.testing.assert_array_equal(q0.scale, q1.scale, err_msg=S._tensor_name(t0))
                np.testing.assert_array_equal(q0.zeroPoint, q1.zeroPoint, err_msg=S._tensor_name(t0))
            d0, d1 = before.buffers[t0.buffer].data, after.buffers[t1.buffer].data
            if d0 is not None and len(d0) and not np.array_equal(d0, d1):
                changed.add(i)
        self.assertTrue(changed, "nothing was refitted")
        self.assertLessEqual(changed, edited, "a constant other than a convolution's weights or bias changed")
        # Fitted on these images, it is closer to float on them than the graph it started from.
        reference = S.Runner(self.model).embed(cal)
        error = {name: float(np.linalg.norm(S.Runner(g).embed(cal) - reference)) for name, g in
                 (("before", quantised), ("after", adapted))}
        self.assertLess(error["after"], 0.95 * error["before"], error)
        # A quantised graph whose names differ, or whose weights are not int8, is refused by name.
        with self.assertRaisesRegex(ExportError, "weight adaptation: the convolutions .* are not in the quantised graph"):
            S.adapted_weights(self.model, renamed(quantised), cal[:1])
        with self.assertRaisesRegex(ExportError, "weight adaptation: the weights or bias of .* are not int8"):
            S.adapted_weights(self.model, S.weights_only(self.model), cal[:1])
        # A constant another tensor also stands on would be edited for both: refused.
        from ai_edge_litert.tools import flatbuffer_utils as fu

        shared = fb.read_model(bytearray(quantised))
        g = shared.subgraphs[0]
        qconvs = [op for op in g.operators if S._tensor_name(g.tensors[op.outputs[0]]) in
                  {S._tensor_name(flat.subgraphs[0].tensors[c.outputs[0]]) for c in convs}]
        g.tensors[qconvs[1].inputs[1]].buffer = g.tensors[qconvs[0].inputs[1]].buffer
        with self.assertRaisesRegex(ExportError, "not int8 / int32 constants of its own"):
            S.adapted_weights(self.model, bytes(fu.convert_object_to_bytearray(shared)), cal[:1])
        # A name that is not a convolution's output in the quantised graph is refused, not edited.
        other = next(S._tensor_name(g.tensors[op.outputs[0]]) for op in g.operators
                     if op not in qconvs and len(op.inputs) >= 2)
        with self.assertRaisesRegex(ExportError, "is not the output of a convolution"):
            S._quantised_convolutions(bytearray(quantised), [other], "weight adaptation")

    def test_mixed_keeps_the_ranked_ops_float_and_refuses_another_models_ranking(self):
        ops = S.quantisable_ops(self.model)
        ranking = Path(self.dir.name) / "df-mini.sensitivity.json"
        ranking.write_text(json.dumps({"alone": [{"index": op.index, "op": op.name, "scope": op.scope} for op in ops[:3]]}))
        out = Path(self.dir.name) / "mixed.tflite"
        done = S.convert(MODEL, self.cal, "mixed", out, ranking, 2)
        self.assertEqual(done["kept_float"], [op.scope for op in ops[:2]])
        # In the written file the kept ops read float32 activations; the next one reads int8.
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

        written = fb.read_model(bytearray(out.read_bytes()))
        by_output = {fb.get_tensor_name(written.subgraphs[0].tensors[o.outputs[0]]): o
                     for o in written.subgraphs[0].operators}
        input_type = {}
        for op in ops[:3]:
            name = op.scope.rstrip(";").split(";")[0]
            match = [o for n, o in by_output.items() if n == name or n.startswith(name)]
            self.assertTrue(match, name)
            input_type[op.index] = written.subgraphs[0].tensors[match[0].inputs[0]].type
        self.assertEqual([input_type[op.index] for op in ops[:2]], [0, 0])  # FLOAT32
        self.assertEqual(input_type[ops[2].index], 9)  # INT8
        ranking.write_text(json.dumps({"alone": [{"index": 0, "op": "CONV_2D", "scope": "another/model;"}]}))
        with self.assertRaisesRegex(ExportError, "another model"):
            S.convert(MODEL, self.cal, "mixed", out, ranking, 1)
        with self.assertRaisesRegex(ExportError, "--float-ops"):
            S.convert(MODEL, self.cal, "mixed", out, ranking, 0)
        ranking.write_text(json.dumps({"model_sha256": "0" * 64, "alone": [
            {"index": op.index, "op": op.name, "scope": op.scope} for op in ops[:3]]}))
        with self.assertRaisesRegex(ExportError, "sha256 differs"):
            S.convert(MODEL, self.cal, "mixed", out, ranking, 1)

    def test_gptq_puts_weights_on_the_quantizers_grid_and_leaves_kept_ops_alone(self):
        cal, _ = S.load_inputs(self.cal)
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

        rounded = S.gptq_rounded(self.model, cal)
        before, after = fb.read_model(bytearray(self.model)), fb.read_model(bytearray(rounded))
        graph = before.subgraphs[0]
        convs = [i for i, op in enumerate(graph.operators) if S._conv_weights(before, graph, op)]
        self.assertTrue(convs)
        for i in convs:
            name, w, _, axis = S._conv_weights(before, graph, graph.operators[i])
            new = S._conv_weights(after, after.subgraphs[0], after.subgraphs[0].operators[i])[1]
            # Quantising again changes nothing: the per-channel scale (max|w| / 127) is the
            # original's, and every weight is a whole number of steps.
            np.testing.assert_allclose(S.int8_weight_error(new, axis), 0.0, atol=1e-6 * np.abs(w).max())
            peak = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(1)
            new_peak = np.abs(np.moveaxis(new, axis, 0)).reshape(w.shape[axis], -1).max(1)
            np.testing.assert_allclose(new_peak, peak, rtol=1e-6)
        # An op kept float keeps its weights and bias.
        kept = fb.read_model(bytearray(S.gptq_rounded(self.model, cal, kept_float={convs[0]})))
        a = S._conv_weights(before, graph, graph.operators[convs[0]])
        b = S._conv_weights(kept, kept.subgraphs[0], kept.subgraphs[0].operators[convs[0]])
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[2], b[2])

    def test_mse_ranges_stay_within_the_observed_ones_and_gptq_mse_converts(self):
        cal, _ = S.load_inputs(self.cal)
        q = S.Quantiser(self.model, cal, S.Runner(self.model).input, 8, ranges="minmax")
        mse = S.mse_ranges(self.model, q.qsvs, cal)
        narrower = 0
        for name, qsv in mse.items():
            self.assertTrue(np.all(np.isfinite(qsv["min"])) and np.all(np.isfinite(qsv["max"])), name)
            self.assertEqual(np.shape(qsv["min"]), np.shape(q.qsvs[name]["min"]), name)
            self.assertLessEqual(float(np.max(qsv["min"])), 0.0, name)
            self.assertGreaterEqual(float(np.min(qsv["max"])), 0.0, name)
            narrower += float(np.max(qsv["max"])) < float(np.max(q.qsvs[name]["max"])) - 1e-6
        self.assertGreater(narrower, 0, "no range was narrowed")
        out = Path(self.dir.name) / "gptq-mse.tflite"
        done = S.convert(MODEL, self.cal, "int8-gptq-mse", out)
        self.assertEqual((done["ranges"], done["gptq_images"]), ("mse", 2))
        xs, _ = S.load_inputs(self.images)
        self.assertTrue(np.all(np.isfinite(S.Runner(out.read_bytes()).embed(xs))))

    def test_every_conversion_runs_and_keeps_float_input_and_output(self):
        xs, _ = S.load_inputs(self.images)
        reference = S.Runner(self.model).embed(xs)
        error = {}
        for name, spec in S.CONVERSIONS.items():
            if spec.mixed:
                continue  # the mixed ones need a ranking: their own test
            with self.subTest(conversion=name):
                out = Path(self.dir.name) / f"{name}.tflite"
                done = S.convert(MODEL, self.cal, name, out)
                if spec.activation_correction:
                    self.assertGreater(done["activation_correction_convolutions"], 0, done)
                    self.assertEqual(done["activation_correction_images"], 2, done)
                if spec.adapted:
                    self.assertEqual(done["adaptation_images"], 2, done)
                runner = S.Runner(out.read_bytes())
                self.assertEqual((runner.input_detail["dtype"], runner.output_detail["dtype"]), (np.float32, np.float32))
                candidate = runner.embed(xs)
                self.assertTrue(np.all(np.isfinite(candidate)))
                self.assertFalse(np.array_equal(candidate, reference), "nothing was quantised")
                error[name] = float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))
        # Float activations keep only the weights' (GPTQ-rounded) error: closer than any int8 graph.
        self.assertLess(error["int8-weights-gptq"], 0.05, error)
        self.assertLess(error["int8-weights-gptq"], min(v for k, v in error.items() if k != "int8-weights-gptq"), error)
        with self.assertRaisesRegex(ExportError, "conversion int8: --sensitivity and --float-ops are for the mixed"):
            S.convert(MODEL, self.cal, "int8", Path(self.dir.name) / "x.tflite", Path("ranking.json"), 2)
        with self.assertRaisesRegex(ExportError, "conversion mixed-gptq-mse: needs --sensitivity"):
            S.convert(MODEL, self.cal, "mixed-gptq-mse", Path(self.dir.name) / "x.tflite")
        with self.assertRaises(ValueError):
            S.Conversion(weights="gtpq")
        with self.assertRaisesRegex(ValueError, "int8 activations only"):
            S.Conversion(activation_bits=16, activation_correction=True)
        with self.assertRaisesRegex(ValueError, "not with activation_correction"):
            S.Conversion(adapted=True, activation_correction=True)

    def test_patches_times_the_weights_are_the_convolutions_outputs(self):
        """GPTQ's Hessians are built from `_patches`: their layout, padding and strides must be the
        convolution's own, checked against the interpreter's outputs for every convolution."""
        check_patches(self, self.model, S.load_inputs(self.images)[0][:1])

    def test_bad_inputs_files_are_named(self):
        bad = Path(self.dir.name) / "bad.npz"
        np.savez(bad, inputs=np.zeros((2, 4), np.float32), names=np.array(["a", "b"]))
        with self.assertRaisesRegex(ExportError, "bad.npz"):
            S.load_inputs(bad)
        not_npz = Path(self.dir.name) / "text.npz"
        not_npz.write_text("not an archive")
        with self.assertRaisesRegex(ExportError, "text.npz"):
            S.load_inputs(not_npz)
        nan = Path(self.dir.name) / "nan.npz"
        values = np.zeros((2, 448, 448, 3), np.float32)
        values[1, 5, 5, 0] = np.nan
        np.savez(nan, inputs=values, names=np.array(["a", "b"]))
        with self.assertRaisesRegex(ExportError, "nan.npz: 1 input values are not finite"):
            S.load_inputs(nan)
        # Inputs preprocessed for another model's size are refused before any conversion runs.
        small = Path(self.dir.name) / "small.npz"
        np.savez(small, inputs=np.zeros((2, 224, 224, 3), np.float32), names=np.array(["a", "b"]))
        for call in (lambda: S.convert(MODEL, small, "int8", Path(self.dir.name) / "x.tflite"),
                     lambda: S.judge(MODEL, self.cal, small, Path(self.dir.name), ["int8"])):
            with self.assertRaisesRegex(ExportError, r"small.npz: inputs of shape \[224, 224, 3\], but the model takes "
                                                     r"\[448, 448, 3\]"):
                call()


LESION = ROOT / ".cache" / "models" / "lesion-x448" / "lesion-x448.fp32.tflite"
# scripts/test.sh builds lesion-x448 before these tests and names it here: there it must be present.
if "lesion-x448" in os.environ.get("DERMEDGE_REQUIRE_MODELS", "").split(",") and not LESION.is_file():
    raise FileNotFoundError(f"DERMEDGE_REQUIRE_MODELS names lesion-x448 but {LESION} is missing")


@unittest.skipUnless(HAVE_QUANTIZER and LESION.is_file(), "lesion-x448 (dermedge models build lesion-x448) and the quantizer venv")
class OnLesion(unittest.TestCase):
    """Depthwise convolutions (cross-layer equalisation's pairs, GPTQ's per-channel path):
    lesion-x448 (Xception) has them; df-mini has none."""

    def test_depthwise_patches_and_gptq(self):
        model = LESION.read_bytes()
        x = np.random.default_rng(5).uniform(0, 255, (1, 448, 448, 3)).astype(np.float32)
        self.assertGreater(check_patches(self, model, x, only="DEPTHWISE_CONV_2D"), 10)
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

        before = fb.read_model(bytearray(model))
        # The depthwise path only (the 1×1 convolutions, df-mini's kind, are most of the time).
        pointwise = {i for i, op in enumerate(before.subgraphs[0].operators)
                     if (c := S._conv_weights(before, before.subgraphs[0], op)) and c[0] == "CONV_2D"}
        after = fb.read_model(bytearray(S.gptq_rounded(model, x, kept_float=pointwise)))
        depthwise = 0
        for a, b in zip(before.subgraphs[0].operators, after.subgraphs[0].operators):
            old = S._conv_weights(before, before.subgraphs[0], a)
            if not old or old[0] != "DEPTHWISE_CONV_2D":
                continue
            new = S._conv_weights(after, after.subgraphs[0], b)[1]
            np.testing.assert_allclose(S.int8_weight_error(new, 3), 0.0, atol=1e-6 * np.abs(old[1]).max())
            np.testing.assert_allclose(np.abs(new).max((0, 1, 2)), np.abs(old[1]).max((0, 1, 2)), rtol=1e-6)
            depthwise += 1
        self.assertGreater(depthwise, 10)

    def test_the_float_function_is_unchanged_and_the_pairs_are_balanced(self):
        model = LESION.read_bytes()
        x = np.random.default_rng(4).uniform(0, 255, (1, 448, 448, 3)).astype(np.float32)
        reference = S.Runner(model).embed(x)
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

        for mode in S.EQUALISATION_MODES:
            equalised = S.equalised(model, x, mode)
            out = S.Runner(equalised).embed(x)
            np.testing.assert_allclose(out, reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max())
            flat = fb.read_model(bytearray(equalised))
            graph = flat.subgraphs[0]
            changed = 0
            for op in graph.operators:
                dw = S._conv_weights(flat, graph, op)
                if not dw or dw[0] != "DEPTHWISE_CONV_2D":
                    continue
                reader = next(o for o in graph.operators if op.outputs[0] in list(o.inputs))
                pw = S._conv_weights(flat, graph, reader)
                if mode == "weights" and pw and pw[0] == "CONV_2D":
                    # Nagel et al.: both ranges become √(r1 r2), so they are equal.
                    np.testing.assert_allclose(np.abs(dw[1]).max((0, 1, 2)), np.abs(pw[1]).max((0, 1, 2)), rtol=1e-4)
                    changed += 1
            if mode == "weights":
                self.assertGreater(changed, 10)
        with self.assertRaisesRegex(ExportError, "equalisation 'both'"):
            S.equalised(model, x, "both")


if __name__ == "__main__":
    unittest.main()
