"""The teacher's fold: ten Keras layers (dense, batch norm, a constant metadata branch) into three
dense layers that give the same probabilities, written as a head file dermedge reads."""
import json
import tempfile
import unittest
from pathlib import Path

import numpy as np

from dermedge_export import classifier
from dermedge_export.errors import ExportError


class Variable:
    def __init__(self, value):
        self.value = np.asarray(value, np.float32)
        self.shape = self.value.shape

    def numpy(self):
        return self.value


class Layer:
    """What a restored Keras layer shows of itself: its variables as trackable children."""

    def __init__(self, **variables):
        self.variables = variables

    def _trackable_children(self):
        # Restored dense layers name their kernel `_kernel`; the fold must read both spellings.
        return {("_kernel" if k == "kernel" else k): Variable(v) for k, v in self.variables.items()}


def teacher(rng, dim=6, hidden=5, meta_hidden=4, branch=3, top=4, classes=7):
    def dense(n_in, n_out):
        return Layer(kernel=rng.normal(size=(n_in, n_out)), bias=rng.normal(size=n_out))

    def batch_norm(n):
        return Layer(gamma=rng.uniform(0.5, 2, n), beta=rng.normal(size=n),
                     moving_mean=rng.normal(size=n), moving_variance=rng.uniform(0.1, 3, n))

    meta = len(classifier.TEACHER_METADATA)
    return [dense(dim, hidden), batch_norm(hidden), dense(meta, meta_hidden), batch_norm(meta_hidden),
            dense(meta_hidden, branch), batch_norm(branch), Layer(), dense(hidden + branch, top), batch_norm(top),
            dense(top, classes)]


def keras_forward(layers, embeddings):
    """The teacher as Keras runs it, unfolded, in float64."""
    v = {name: {k: np.asarray(a, np.float64) for k, a in layer.variables.items()}
         for name, layer in zip(classifier.TEACHER_LAYERS, layers)}

    def bn(x, p):
        return (x - p["moving_mean"]) / np.sqrt(p["moving_variance"] + classifier.BN_EPSILON) * p["gamma"] + p["beta"]

    def dense_relu(x, p):
        return np.maximum(x @ p["kernel"] + p["bias"], 0)

    image = bn(dense_relu(embeddings, v["dense"]), v["batch_normalization_4"])
    meta = np.tile(classifier.TEACHER_METADATA, (len(embeddings), 1))
    branch = bn(dense_relu(bn(dense_relu(meta, v["dense_1"]), v["batch_normalization_5"]), v["dense_2"]),
                v["batch_normalization_6"])
    top = bn(dense_relu(np.concatenate([image, branch], axis=1), v["dense_3"]), v["batch_normalization_7"])
    logits = top @ v["dense_4"]["kernel"] + v["dense_4"]["bias"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class Fold(unittest.TestCase):
    def test_three_layers_give_the_unfolded_teachers_probabilities(self):
        rng = np.random.default_rng(7)
        layers = teacher(rng)
        folded = classifier.fold_teacher(layers)
        self.assertEqual([l["activation"] for l in folded], ["relu", "relu", "identity"])
        self.assertEqual([l["weights"].shape for l in folded], [(5, 6), (4, 5), (7, 4)])
        embeddings = rng.normal(size=(64, 6))
        expected = keras_forward(layers, embeddings)
        head = {"layers": [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in l.items()}
                           for l in folded]}
        np.testing.assert_allclose(classifier.predict(head, embeddings), expected, atol=1e-5)
        # Not a trivial case: the images do not all get one class.
        self.assertGreater(len(set(expected.argmax(axis=1))), 1)

    def test_the_fold_is_the_same_bytes_every_time(self):
        layers = teacher(np.random.default_rng(1))
        first, second = classifier.fold_teacher(layers), classifier.fold_teacher(layers)
        for a, b in zip(first, second):
            self.assertEqual(a["weights"].tobytes(), b["weights"].tobytes())
            self.assertEqual(a["bias"].tobytes(), b["bias"].tobytes())

    def test_a_teacher_of_another_shape_is_refused(self):
        layers = teacher(np.random.default_rng(2))
        with self.assertRaisesRegex(ExportError, "tracked layers"):
            classifier.fold_teacher(layers[:-1])
        # dense_3 expecting a branch wider than the metadata branch gives.
        rng = np.random.default_rng(3)
        layers[7] = Layer(kernel=rng.normal(size=(5 + 9, 4)), bias=rng.normal(size=4))
        with self.assertRaisesRegex(ExportError, "dense_3 has 14 inputs"):
            classifier.fold_teacher(layers)


class Loaded:
    """A SavedModel as `write_teacher` sees it."""

    def __init__(self, layers, signatures=("serving_default", "teacher")):
        self.signatures = dict.fromkeys(signatures)
        self.head_layers = layers


class Write(unittest.TestCase):
    def test_the_head_file_is_what_dermedge_reads(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.teacher.json"
            self.assertEqual(classifier.write_teacher(Loaded(teacher(np.random.default_rng(4))), "m", 6, path), path)
            head = json.loads(path.read_text())
            self.assertEqual((head["format"], head["name"], head["model_id"], head["embedding_dim"], head["kind"]),
                             ("dermedge-mlp-head/1", "m-teacher", "m", 6, "softmax"))
            self.assertEqual(head["classes"], classifier.TEACHER_CLASSES)
            self.assertEqual([len(l["weights"][0]) for l in head["layers"]], [6, 5, 4])
            # Every number is a float32 value, so Rust parses back exactly what was written.
            for layer in head["layers"]:
                w = np.asarray(layer["weights"], np.float64)
                self.assertTrue(np.array_equal(w, w.astype(np.float32).astype(np.float64)))

    def test_no_teacher_signature_means_no_file_and_a_wrong_width_is_refused(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.teacher.json"
            layers = teacher(np.random.default_rng(5))
            self.assertIsNone(classifier.write_teacher(Loaded(layers, ("serving_default",)), "m", 6, path))
            self.assertFalse(path.exists())
            with self.assertRaisesRegex(ExportError, "6-d embeddings; the model gives 8-d"):
                classifier.write_teacher(Loaded(layers), "m", 8, path)


if __name__ == "__main__":
    unittest.main()
