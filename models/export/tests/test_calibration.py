"""The calibration sample: stratified by kind in proportion, seeded, and recorded as drawn."""
import tempfile
import unittest
from pathlib import Path

from dermedge_export.calibration import calibration_sample, image_kind
from dermedge_export.export import validation_subset
from dermedge_export.options import ExportOptions


def options(**changes) -> ExportOptions:
    fields = dict(savedmodel=Path("sm"), name="m", out=Path("out"), calibration=Path("cal"), evaluation=Path("eval"))
    return ExportOptions(**{**fields, **changes})


# The calibration directory's make-up: 96 mosaics and 16 photo crops of two photos.
FILES = sorted([Path(f"mosaic-{i:03d}.png") for i in range(96)]
               + [Path(f"photo-astronaut-{i:02d}.png") for i in range(8)]
               + [Path(f"photo-immunohistochemistry-{i:02d}.png") for i in range(8)])


class Calibration(unittest.TestCase):
    def test_kinds_are_the_first_word_of_the_name(self):
        self.assertEqual([image_kind(Path(p)) for p in ("mosaic-001.png", "photo-retina-03.png", "x.png")],
                         ["mosaic", "photo", "x"])

    def test_each_kind_gets_its_share_and_photos_are_not_left_out(self):
        chosen, how = calibration_sample(FILES, options(calibration_count=64))
        kinds = [image_kind(p) for p in chosen]
        self.assertEqual(len(chosen), 64)
        self.assertEqual(len(set(chosen)), 64)
        # 64 x 96/112 = 54.9 mosaics and 9.1 photos.
        self.assertEqual((kinds.count("mosaic"), kinds.count("photo")), (55, 9))
        self.assertEqual(chosen, sorted(chosen))
        self.assertIn("55 of 96 mosaic", how)
        self.assertIn("9 of 16 photo", how)
        # Not the first 55 mosaics: drawn at random.
        self.assertNotEqual([p for p in chosen if image_kind(p) == "mosaic"], FILES[:55])

    def test_the_same_seed_draws_the_same_sample_and_another_seed_another(self):
        a, _ = calibration_sample(FILES, options(calibration_count=32))
        b, _ = calibration_sample(FILES, options(calibration_count=32))
        c, _ = calibration_sample(FILES, options(calibration_count=32, calibration_seed=7))
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    def test_a_rare_kind_gets_one_image_and_the_count_is_kept(self):
        files = [Path(f"mosaic-{i:03d}.png") for i in range(99)] + [Path("texture-000.png")]
        chosen, _ = calibration_sample(files, options(calibration_count=8))
        self.assertEqual(len(chosen), 8)
        self.assertIn(Path("texture-000.png"), chosen)

    def test_more_than_there_are_takes_them_all_and_sorted_takes_the_first(self):
        chosen, _ = calibration_sample(FILES, options(calibration_count=500))
        self.assertEqual(chosen, FILES)
        chosen, how = calibration_sample(FILES, options(calibration_count=5, calibration_sampling="sorted"))
        self.assertEqual(chosen, FILES[:5])
        self.assertIn("first 5", how)

    def test_a_bad_sampling_or_seed_is_refused_by_name(self):
        from dermedge_export.errors import ExportError
        with self.assertRaisesRegex(ExportError, "^calibration_sampling: expected one of stratified, sorted"):
            options(calibration_sampling="random")
        with self.assertRaisesRegex(ExportError, "^calibration_seed: "):
            options(calibration_seed=-1)



class ValidationSubset(unittest.TestCase):
    def test_a_search_judges_every_kind_not_the_first_files_in_sorted_order(self):
        with tempfile.TemporaryDirectory() as d:
            source = Path(d) / "wide"
            source.mkdir()
            names = ([f"mosaic-{i:03d}.png" for i in range(40)] + [f"photo-retina-{i:02d}.png" for i in range(10)]
                     + [f"texture-{i:03d}.png" for i in range(14)])
            for n in names:
                (source / n).write_bytes(n.encode())
            files = sorted(source.iterdir())
            stale = Path(d) / "subset"
            stale.mkdir()
            (stale / "mosaic-999.png").write_bytes(b"an earlier run's")
            subset = validation_subset(files, 16, 448, stale)
            chosen = sorted(p.name for p in subset.iterdir())
            kinds = [image_kind(Path(n)) for n in chosen]
            # 16 x 40/64 = 10 mosaics, 2.5 photos, 3.5 textures.
            self.assertEqual(len(chosen), 16)
            self.assertEqual(kinds.count("mosaic"), 10)
            self.assertEqual(kinds.count("photo") + kinds.count("texture"), 6)
            self.assertGreaterEqual(min(kinds.count("photo"), kinds.count("texture")), 2)
            self.assertNotIn("mosaic-999.png", chosen)
            self.assertTrue(all((subset / n).read_bytes() == n.encode() for n in chosen))
            self.assertEqual(chosen, sorted(p.name for p in validation_subset(files, 16, 448, stale).iterdir()))


if __name__ == "__main__":
    unittest.main()
