"""Where full-int8 GroupNorm leaves float ops, and what an export's ops run in.

    scripts/python-env.sh -m dermedge_export.groupnorm_ops              # one conv + GroupNorm layer, three ways
    scripts/python-env.sh -m dermedge_export.groupnorm_ops A.tflite ...  # float ops and (de)quantise counts

The first form converts a conv -> GroupNorm(32) -> ReLU layer (seeded weights, 8 random
calibration inputs) to full int8 with GroupNorm's variance written as `tf.nn.moments` (which
exports SquaredDifference), as `mean(d * d)`, and with a rank-4 grouping, and prints each file's op
report (docs/QUANTISATION.md).
"""
import json
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from . import opreport


def _variants():
    rng = np.random.default_rng(0)
    gamma = tf.constant(rng.uniform(0.6, 1.4, 64).astype(np.float32))
    beta = tf.constant(rng.normal(0, 0.2, 64).astype(np.float32))
    kernel = tf.constant(rng.normal(0, 0.1, (3, 3, 3, 64)).astype(np.float32))

    def moments(x):
        g = tf.reshape(x, [-1, 56, 56, 32, 2])
        mean, var = tf.nn.moments(g, axes=[1, 2, 4], keepdims=True)
        return tf.reshape((g - mean) * tf.math.rsqrt(var + 1e-5), [-1, 56, 56, 64]) * gamma + beta

    def mul(x):
        g = tf.reshape(x, [-1, 56, 56, 32, 2])
        d = g - tf.reduce_mean(g, axis=[1, 2, 4], keepdims=True)
        var = tf.reduce_mean(d * d, axis=[1, 2, 4], keepdims=True)
        return tf.reshape(d * tf.math.rsqrt(var + 1e-5), [-1, 56, 56, 64]) * gamma + beta

    def rank4(x):
        g = tf.reshape(x, [-1, 56 * 56, 32, 2])
        d = g - tf.reduce_mean(g, axis=[1, 3], keepdims=True)
        var = tf.reduce_mean(d * d, axis=[1, 3], keepdims=True)
        return tf.reshape(d * tf.math.rsqrt(var + 1e-5), [-1, 56, 56, 64]) * gamma + beta

    calibration = [rng.uniform(0, 1, (1, 56, 56, 3)).astype(np.float32) for _ in range(8)]
    for name, norm in [("tf.nn.moments", moments), ("mean(d * d)", mul), ("rank-4 grouping", rank4)]:
        fn = tf.function(lambda x, norm=norm: tf.nn.relu(norm(tf.nn.conv2d(x, kernel, 1, "SAME"))),
                         input_signature=[tf.TensorSpec([1, 56, 56, 3], tf.float32)])
        conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([x] for x in calibration)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        yield name, conv.convert()


def main(argv) -> int:
    models = [(p, Path(p).read_bytes()) for p in argv] if argv else _variants()
    for name, model in models:
        r = opreport.analyse(model)
        print(json.dumps({"model": name, "float_ops": r["float_ops"], "quantize": r["quantize_ops"],
                          "dequantize": r["dequantize_ops"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
