"""weight_diff pairs a conversion's buffers with another's and measures how far the others moved."""
import tempfile
import unittest
from pathlib import Path

import numpy as np

from dermedge_export import weight_diff

FIXTURE = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "df-mini" / "df-mini.fp32.tflite"


class WeightDiff(unittest.TestCase):
    def test_a_file_against_itself_is_identical_and_a_nudged_weight_is_measured(self):
        same = weight_diff.compare(FIXTURE, FIXTURE)
        self.assertGreater(same["buffers"], 10)
        self.assertEqual((same["identical"], same["differ"], same["largest_relative_difference"]),
                         (same["buffers"], 0, 0.0))

        data = bytearray(FIXTURE.read_bytes())
        kind, raw = max(weight_diff.buffers(FIXTURE).values(), key=lambda b: len(b[1]))
        self.assertEqual(kind, weight_diff.FLOAT32)
        at = data.find(raw)
        values = np.frombuffer(raw, np.float32).copy()
        scale = float(np.abs(values).max())
        values[0] += np.float32(1e-3 * scale)
        data[at:at + len(raw)] = values.tobytes()
        with tempfile.TemporaryDirectory() as tmp:
            nudged = Path(tmp) / "nudged.tflite"
            nudged.write_bytes(bytes(data))
            moved = weight_diff.compare(FIXTURE, nudged)
        self.assertEqual((moved["identical"], moved["differ"]), (same["buffers"] - 1, 1))
        self.assertAlmostEqual(moved["largest_relative_difference"], 1e-3, delta=1e-5)


if __name__ == "__main__":
    unittest.main()
