"""The exporter's refusals: each bad input is a clear ExportError, never a traceback."""
import json
import tempfile
import unittest
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from dermedge_export import export
from dermedge_export.errors import ExportError
from dermedge_export.options import ExportOptions


class Tiny(tf.Module):
    def __init__(self, output_key="embedding", signature="serving_default"):
        super().__init__()
        self.w = tf.Variable(tf.ones([3, 4]))
        self.output_key = output_key
        self.signature = signature

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def serve(self, inputs):
        img = tf.io.decode_image(tf.io.parse_example(inputs, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})
                                 ["image/encoded"][0], channels=3, expand_animations=False)
        x = tf.expand_dims(tf.image.resize(img, [8, 8]), 0) / 255.0
        return {self.output_key: tf.reduce_mean(x, axis=[1, 2]) @ self.w}


class Standardised(Tiny):
    """Weights standardised at call time inside a nested function, as BiT's convolutions are: the
    inlined graph passes each variable handle through an Identity."""

    @tf.function
    def core(self, x):
        w = (self.w - tf.reduce_mean(self.w)) * tf.math.rsqrt(tf.math.reduce_variance(self.w) + 1e-5)
        return tf.reduce_mean(x, axis=[1, 2]) @ w

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def serve(self, inputs):
        img = tf.io.decode_image(tf.io.parse_example(inputs, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})
                                 ["image/encoded"][0], channels=3, expand_animations=False)
        x = tf.expand_dims(tf.image.resize(img, [8, 8]), 0) / 127.5 - 1.0
        return {"embedding": self.core(x)}


class ReadsTheStringToo(Tiny):
    """An embedding that depends on the serialized example itself, not only on the image."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def serve(self, inputs):
        img = tf.io.decode_image(tf.io.parse_example(inputs, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})
                                 ["image/encoded"][0], channels=3, expand_animations=False)
        x = tf.expand_dims(tf.image.resize(img, [8, 8]), 0) / 255.0
        length = tf.cast(tf.strings.length(inputs[0]), tf.float32)
        return {"embedding": tf.reduce_mean(x, axis=[1, 2]) @ self.w * length}


def save(module: Tiny, directory: Path) -> Path:
    tf.saved_model.save(module, str(directory), signatures={module.signature: module.serve})
    return directory


class ExportErrors(unittest.TestCase):
    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp())
        self.images = self.tmp / "images"
        self.images.mkdir()
        for i in range(3):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(self.images / f"img{i}.png")
        self.eval = self.tmp / "eval"
        self.eval.mkdir()
        Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(self.eval / "e.png")

    def run_export(self, savedmodel, calibration=None, **options):
        return export.export(ExportOptions(savedmodel, "tiny", self.tmp / "out", calibration or self.images, self.eval,
                                           **options), progress=lambda _: None)

    def assertRefused(self, savedmodel, *fragments, calibration=None):
        with self.assertRaises(ExportError) as caught:
            self.run_export(savedmodel, calibration)
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))

    def test_directory_that_is_not_a_savedmodel(self):
        self.assertRefused(self.images, "not a SavedModel directory")

    def test_savedmodel_without_serving_default(self):
        sm = save(Tiny(signature="predict"), self.tmp / "sm")
        self.assertRefused(sm, "no `serving_default`", "predict")

    def test_output_not_named_embedding(self):
        sm = save(Tiny(output_key="logits"), self.tmp / "sm")
        self.assertRefused(sm, "logits", "not `embedding`")

    def test_calibration_directory_without_readable_images(self):
        sm = save(Tiny(), self.tmp / "sm")
        empty = self.tmp / "junk"
        empty.mkdir()
        (empty / "notes.png").write_text("not an image")
        self.assertRefused(sm, "no readable images", calibration=empty)

    def test_missing_calibration_directory(self):
        sm = save(Tiny(), self.tmp / "sm")
        self.assertRefused(sm, "does not exist", calibration=self.tmp / "absent")

    def test_calibration_overlapping_evaluation(self):
        sm = save(Tiny(), self.tmp / "sm")
        self.assertRefused(sm, "disjoint", calibration=self.eval)

    def test_recovers_preprocessing_of_a_small_graph(self):
        sm = save(Tiny(), self.tmp / "sm")
        report = self.run_export(sm)
        pre = report["preprocessing"]
        self.assertEqual((pre["height"], pre["width"]), (8, 8))
        self.assertAlmostEqual(pre["scale"], 1 / 255)
        self.assertGreater(report["fp32_tflite_vs_savedmodel_cosine"]["min"], 0.9999)

    def test_debug_count_zero_skips_the_per_layer_errors(self):
        sm = save(Tiny(), self.tmp / "sm")
        (self.tmp / "out").mkdir()
        stale = self.tmp / "out" / "tiny.int8.layer-errors.csv"
        stale.write_text("from an earlier export\n")
        report = self.run_export(sm, debug_count=0)
        self.assertGreater(report["fp32_tflite_vs_savedmodel_cosine"]["min"], 0.9999)
        self.assertFalse(stale.exists(), "a stale per-layer error file must not pass for this export's")

    def test_weights_become_constants_and_their_standardisation_is_folded(self):
        module = Standardised()
        module.w.assign(tf.reshape(tf.range(12, dtype=tf.float32), [3, 4]))
        sm = save(module, self.tmp / "sm")
        report = self.run_export(sm)
        self.assertAlmostEqual(report["preprocessing"]["offset"], -1.0)
        self.assertGreater(report["fp32_tflite_vs_savedmodel_cosine"]["min"], 0.9999)
        ops = json.loads((self.tmp / "out" / "tiny.ops.json").read_text())
        for precision in ("fp32", "int8"):
            self.assertEqual(ops[precision]["variables_read"], 0, ops[precision]["op_counts"])
            self.assertNotIn("VAR_HANDLE", ops[precision]["op_counts"])
            self.assertTrue(ops[precision]["weight_standardisation_folded"], ops[precision])

    def test_a_cut_that_leaves_the_string_input_connected_is_refused(self):
        sm = save(ReadsTheStringToo(), self.tmp / "sm")
        self.assertRefused(sm, "does not separate the image from the embedding", "inputs")

    def test_an_image_tensor_that_is_not_in_the_graph_is_refused(self):
        sm = save(Tiny(), self.tmp / "sm")
        with self.assertRaises(ExportError) as caught:
            self.run_export(sm, image_tensor="no/such/tensor:0", size=8, scale=1.0, offset=0.0)
        self.assertIn("no tensor named 'no/such/tensor:0'", str(caught.exception))

if __name__ == "__main__":
    unittest.main()
