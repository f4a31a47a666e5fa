"""BiT (Big Transfer) ResNet-v2 in plain TensorFlow: pre-activation bottleneck units, GroupNorm and
weight-standardised convolutions -- the architecture of Derm Foundation (BiT-M ResNet101x3)."""
import numpy as np
import tensorflow as tf

GROUPNORM_EPS = 1e-5


class BiT(tf.Module):
    """Seeded BiT ResNet-v2. `stages` lists (mid channels, out channels, stride, units)."""

    def __init__(self, seed: int, stem: int, stages, groups: int = 32, name=None):
        super().__init__(name=name)
        self._rng = np.random.default_rng(seed)
        self.groups = groups
        self.stem = self._conv(7, 3, stem)
        self.units = []
        cin = stem
        for mid, cout, stride, n_units in stages:
            for u in range(n_units):
                s = stride if u == 0 else 1
                unit = {
                    "gn_a": self._gn(cin), "conv1": self._conv(1, cin, mid),
                    "gn_b": self._gn(mid), "conv2": self._conv(3, mid, mid),
                    "gn_c": self._gn(mid), "conv3": self._conv(1, mid, cout),
                    "stride": s,
                }
                if s != 1 or cin != cout:
                    unit["proj"] = self._conv(1, cin, cout)
                self.units.append(unit)
                cin = cout
        self.gn_final = self._gn(cin)
        self.out_dim = cin

    def _conv(self, k, cin, cout):
        w = self._rng.normal(0.0, 1.0, size=(k, k, cin, cout)).astype(np.float32)
        return tf.Variable(w, trainable=False)

    def _gn(self, c):
        gamma = self._rng.uniform(0.6, 1.4, size=(c,)).astype(np.float32)
        beta = self._rng.normal(0.0, 0.2, size=(c,)).astype(np.float32)
        return (tf.Variable(gamma, trainable=False), tf.Variable(beta, trainable=False))

    @staticmethod
    def standardised(w):
        """Weight standardisation: each output channel's kernel to zero mean, unit variance."""
        mean, var = tf.nn.moments(w, axes=[0, 1, 2], keepdims=True)
        return (w - mean) / tf.sqrt(var + 1e-10)

    @staticmethod
    def std_conv(x, w, stride=1):
        return tf.nn.conv2d(x, BiT.standardised(w), strides=stride, padding="SAME")

    def group_norm(self, x, params, eps=GROUPNORM_EPS):
        gamma, beta = params
        _, h, w, c = x.shape
        g = min(self.groups, c)
        xg = tf.reshape(x, [-1, h, w, g, c // g])
        mean, var = tf.nn.moments(xg, axes=[1, 2, 4], keepdims=True)
        xg = (xg - mean) * tf.math.rsqrt(var + eps)
        return tf.reshape(xg, [-1, h, w, c]) * gamma + beta

    def __call__(self, image):
        """image: [N, H, W, 3] float in the model's input range -> [N, out_dim]."""
        x = self.std_conv(image, self.stem, stride=2)
        x = tf.nn.max_pool2d(x, ksize=3, strides=2, padding="SAME")
        for u in self.units:
            a = tf.nn.relu(self.group_norm(x, u["gn_a"]))
            shortcut = self.std_conv(a, u["proj"], u["stride"]) if "proj" in u else x
            y = self.std_conv(a, u["conv1"])
            y = self.std_conv(tf.nn.relu(self.group_norm(y, u["gn_b"])), u["conv2"], u["stride"])
            y = self.std_conv(tf.nn.relu(self.group_norm(y, u["gn_c"])), u["conv3"])
            x = y + shortcut
        x = tf.nn.relu(self.group_norm(x, self.gn_final))
        return tf.reduce_mean(x, axis=[1, 2])


def mini(seed: int) -> BiT:
    """df-mini: one unit per stage, narrow, 6144-d output; a few MB as TFLite."""
    return BiT(seed, stem=32, stages=[(32, 64, 1, 1), (32, 128, 2, 1), (64, 128, 2, 1), (64, 6144, 2, 1)])


def r101x3(seed: int) -> BiT:
    """BiT-M ResNet101x3, Derm Foundation's architecture: units [3, 4, 23, 3], width x3, 6144-d."""
    w = 3
    return BiT(seed, stem=64 * w, stages=[
        (64 * w, 256 * w, 1, 3),
        (128 * w, 512 * w, 2, 4),
        (256 * w, 1024 * w, 2, 23),
        (512 * w, 2048 * w, 2, 3),
    ])
