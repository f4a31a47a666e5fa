"""`dermedge_export inputs`: preprocessed images for the quantizer venv's tools, with textures made
from mosaics."""
import tempfile
import unittest
from pathlib import Path

import numpy as np
from PIL import Image

from dermedge_export.errors import ExportError
from dermedge_export.export import manifest_preprocessing, write_inputs


class Inputs(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        d = Path(self.dir.name)
        self.images = d / "images"
        self.images.mkdir()
        rng = np.random.default_rng(0)
        self.mosaics = []
        for k in range(2):
            px = rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)
            Image.fromarray(px).save(self.images / f"mosaic-{k:03d}.png")
            self.mosaics.append(px)
        Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(self.images / "photo-a-00.png")
        self.manifest = d / "m.toml"
        self.manifest.write_text("[input]\nheight = 448\nwidth = 448\nscale = 1.0\noffset = 0.0\n")

    def tearDown(self):
        self.dir.cleanup()

    def test_textures_are_a_mosaic_quadrant_tiled_two_by_two(self):
        out = Path(self.dir.name) / "x.npz"
        self.assertEqual(write_inputs(manifest_preprocessing(self.manifest), out, images=self.images, textures=2), 5)
        saved = np.load(out)
        names = list(saved["names"])
        self.assertEqual(names[3:], ["texture-of-mosaic-000.png", "texture-of-mosaic-001.png"])
        first, second = self.mosaics
        np.testing.assert_array_equal(saved["inputs"][3], np.tile(first[:224, :224], (2, 2, 1)).astype(np.float32))
        np.testing.assert_array_equal(saved["inputs"][4], np.tile(second[224:, 224:], (2, 2, 1)).astype(np.float32))
        np.testing.assert_array_equal(saved["inputs"][names.index("mosaic-000.png")], first.astype(np.float32))

    def test_more_textures_than_mosaics_or_a_negative_count_is_refused(self):
        out = Path(self.dir.name) / "x.npz"
        with self.assertRaisesRegex(ExportError, "--textures 3 needs as many mosaics among the images; there are 2"):
            write_inputs(manifest_preprocessing(self.manifest), out, images=self.images, textures=3)
        with self.assertRaisesRegex(ExportError, "--textures must be 0 or more, not -1"):
            write_inputs(manifest_preprocessing(self.manifest), out, images=self.images, textures=-1)
        self.assertFalse(out.exists())


if __name__ == "__main__":
    unittest.main()
