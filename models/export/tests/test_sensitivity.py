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

    def test_bad_inputs_files_are_named(self):
        bad = Path(self.dir.name) / "bad.npz"
        np.savez(bad, inputs=np.zeros((2, 4), np.float32), names=np.array(["a", "b"]))
        with self.assertRaisesRegex(ExportError, "bad.npz"):
            S.load_inputs(bad)
        not_npz = Path(self.dir.name) / "text.npz"
        not_npz.write_text("not an archive")
        with self.assertRaisesRegex(ExportError, "text.npz"):
            S.load_inputs(not_npz)


if __name__ == "__main__":
    unittest.main()
