"""The export's options: checked when made, each bad value refused with an ExportError naming its
field, and a models.toml key that is no option refused by name."""
import dataclasses
import sys
import tempfile
import tomllib
import unittest
from pathlib import Path

from dermedge_export import registry
from dermedge_export.errors import ExportError
from dermedge_export.options import RECIPE_NAMES, ExportOptions, TargetFidelity

BINARY = sys.executable  # any existing file stands in for the dermedge binary


def options(**changes) -> ExportOptions:
    fields = dict(savedmodel=Path("sm"), name="m", out=Path("out"), calibration=Path("cal"), evaluation=Path("eval"))
    return ExportOptions(**{**fields, **changes})


class Options(unittest.TestCase):
    def assertRefused(self, make, field, *fragments):
        with self.assertRaises(ExportError) as caught:
            make()
        message = str(caught.exception)
        self.assertTrue(message.startswith(f"{field}: "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_defaults_are_the_command_line_defaults(self):
        o = options()
        self.assertEqual((o.version, o.input_type, o.calibration_count, o.evaluation_count, o.debug_count),
                         ("1", "float32", 64, None, 4))
        self.assertIsNone(o.image_tensor)
        self.assertIsNone(o.target_fidelity)

    def test_valid_options_are_normalised_and_frozen(self):
        o = options(savedmodel="sm", version="2", input_type="uint8", calibration_count=8, evaluation_count=3,
                    debug_count=0, image_tensor="x:0", size=8, scale=1, offset=0)
        self.assertEqual(o.savedmodel, Path("sm"))
        self.assertEqual((o.scale, o.offset), (1.0, 0.0))
        self.assertIsInstance(o.scale, float)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            o.debug_count = 1

    def test_a_valid_recipe_search(self):
        with tempfile.TemporaryDirectory() as d:
            t = TargetFidelity(dermedge=BINARY, validation=d, validation_count=4, holdout=Path(d), threads=4,
                               latency_budget=2, bench_runs=1, recipes=["int8-plain", "int16x8"])
            self.assertEqual(t.recipes, ("int8-plain", "int16x8"))
            self.assertEqual(t.validation, Path(d))
            self.assertEqual(t.latency_budget, 2.0)
            self.assertIs(options(target_fidelity=t).target_fidelity, t)

    def test_each_bad_field_is_refused_by_name(self):
        cases = [
            ("savedmodel", dict(savedmodel=None), "expected a path"),
            ("out", dict(out=""), "expected a path"),
            ("calibration", dict(calibration=3), "expected a path"),
            ("evaluation", dict(evaluation=None), "expected a path"),
            ("name", dict(name=""), "non-empty string"),
            ("name", dict(name="a/b"), "file-name stem"),
            ("version", dict(version=2), "non-empty string"),
            ("input_type", dict(input_type="float16"), "float32, uint8, int8", "'float16'"),
            ("calibration_count", dict(calibration_count=0), "positive int"),
            ("calibration_count", dict(calibration_count=-1), "positive int"),
            ("calibration_count", dict(calibration_count=True), "positive int"),
            ("calibration_count", dict(calibration_count=1.5), "positive int"),
            ("calibration_count", dict(calibration_count="64"), "positive int", "'64'"),
            ("evaluation_count", dict(evaluation_count=0), "positive int"),
            ("debug_count", dict(debug_count=-1), "int >= 0"),
            ("image_tensor", dict(image_tensor="x:0"), "needs size, scale and offset", "size, scale, offset"),
            ("image_tensor", dict(image_tensor="x:0", size=8, scale=1.0), "missing: offset"),
            ("image_tensor", dict(image_tensor="", size=8, scale=1.0, offset=0.0), "non-empty string"),
            ("size", dict(size=8), "image_tensor, which is not set"),
            ("offset", dict(offset=0.0), "image_tensor, which is not set"),
            ("size", dict(image_tensor="x:0", size=0, scale=1.0, offset=0.0), "positive int"),
            ("scale", dict(image_tensor="x:0", size=8, scale=0.0, offset=0.0), "non-zero"),
            ("scale", dict(image_tensor="x:0", size=8, scale=float("nan"), offset=0.0), "finite"),
            ("offset", dict(image_tensor="x:0", size=8, scale=1.0, offset=float("inf")), "finite"),
            ("offset", dict(image_tensor="x:0", size=8, scale=1.0, offset="0"), "finite number"),
            ("target_fidelity", dict(target_fidelity={"dermedge": BINARY}), "expected TargetFidelity"),
            ("input_type", dict(input_type="uint8", target_fidelity=TargetFidelity(dermedge=BINARY)), "float32 only"),
        ]
        for field, changes, *fragments in cases:
            with self.subTest(field=field, changes=changes):
                self.assertRefused(lambda: options(**changes), field, *fragments)

    def test_each_bad_search_field_is_refused_by_name(self):
        missing = str(Path(tempfile.mkdtemp()) / "absent")
        cases = [
            ("dermedge", dict(dermedge="/nonexistent/dermedge"), "/nonexistent/dermedge", "cargo build --release"),
            ("dermedge", dict(dermedge=None), "dermedge binary"),
            ("validation", dict(validation=missing), "existing directory", missing),
            ("validation", dict(validation=BINARY), "existing directory"),
            ("holdout", dict(holdout=missing), "existing directory"),
            ("validation_count", dict(validation_count=0), "positive int"),
            ("threads", dict(threads=0), "positive int"),
            ("bench_runs", dict(bench_runs=2.0), "positive int"),
            ("latency_budget", dict(latency_budget=0), "positive number"),
            ("latency_budget", dict(latency_budget="1.2"), "positive number"),
            ("recipes", dict(recipes=["int8-plain", "int4"]), "unknown recipe int4", ", ".join(RECIPE_NAMES)),
            ("recipes", dict(recipes=[""]), "unknown recipe ''"),
            ("recipes", dict(recipes="int16x8"), "a list of recipe names"),
            ("qat", dict(qat=missing), "not a .tflite file", missing),
            ("qat", dict(qat=BINARY), "not a .tflite file", "dermedge_export.qat"),
        ]
        for field, changes, *fragments in cases:
            with self.subTest(field=field, changes=changes):
                self.assertRefused(lambda: TargetFidelity(**{"dermedge": BINARY, **changes}), field, *fragments)

    def test_the_command_line_refuses_a_bad_option_before_loading_a_model(self):
        import contextlib
        import io
        from dermedge_export.__main__ import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["export", "/nonexistent-savedmodel", "--name", "m", "--out", "o", "--calibration", "c",
                         "--evaluation", "e", "--calibration-count", "0"])
        self.assertEqual(code, 2)
        self.assertIn("calibration_count: expected a positive int, got 0", err.getvalue())


class Tables(unittest.TestCase):
    fixed = dict(savedmodel=Path("sm"), name="m", out=Path("out"), calibration=Path("cal"), evaluation=Path("eval"))

    def test_a_table_sets_options_and_passes_the_callers_keys(self):
        o = ExportOptions.from_table({"calibration_count": 32, "debug_count": 2, "standin": "x"}, "[models.m]",
                                     known=("standin",), **self.fixed)
        self.assertEqual((o.calibration_count, o.debug_count, o.evaluation_count), (32, 2, None))

    def test_an_unknown_key_is_refused_by_name(self):
        for key in ("calibration_cuont", "target_fidelity", "name"):
            with self.subTest(key=key):
                with self.assertRaises(ExportError) as caught:
                    ExportOptions.from_table({key: 1}, "[models.m]", known=("standin",), **self.fixed)
                message = str(caught.exception)
                self.assertIn(f"[models.m]: unknown key {key!r}", message)
                self.assertIn("calibration_count", message)
                self.assertIn("standin", message)

    def test_a_bad_value_names_the_table_and_the_field(self):
        with self.assertRaises(ExportError) as caught:
            ExportOptions.from_table({"debug_count": -2}, "[models.m]", **self.fixed)
        self.assertEqual(str(caught.exception), "[models.m]: debug_count: expected an int >= 0, got -2")


class Registry(unittest.TestCase):
    def test_every_registry_model_has_valid_export_options(self):
        models = registry.load_registry()["models"]
        self.assertTrue(models)
        for name, spec in models.items():
            with self.subTest(model=name):
                o = registry.export_options(name, spec, Path("cache"))
                self.assertEqual((o.name, o.out, o.savedmodel), (name, Path("cache") / name, Path("cache") / name / "savedmodel"))
                self.assertEqual(o.calibration_count, spec.get("calibration_count", 64))
                self.assertEqual(o.evaluation_count, spec.get("evaluation_count"))
                self.assertEqual(o.debug_count, spec.get("debug_count", 4))

    def test_an_unknown_key_in_a_model_table_is_refused(self):
        spec = tomllib.loads('standin = "df-mini"\ndescription = "d"\nevaluation_cuont = 16\n[files]\n')
        with self.assertRaises(ExportError) as caught:
            registry.export_options("df-mini", spec, Path("cache"))
        self.assertIn("[models.df-mini]: unknown key 'evaluation_cuont'", str(caught.exception))

    def test_a_model_table_without_its_stand_in_is_refused(self):
        with self.assertRaises(ExportError) as caught:
            registry.export_options("m", {"files": {}}, Path("cache"))
        self.assertIn("[models.m]: missing key 'standin'", str(caught.exception))

    def test_every_recorded_digest_is_a_hex_digest(self):
        for name, spec in registry.load_registry()["models"].items():
            for file, file_spec in spec["files"].items():
                with self.subTest(model=name, file=file):
                    for digest in registry.recorded_digests(file, file_spec).values():
                        self.assertRegex(digest, r"^[0-9a-f]{64}$")

    def test_a_build_matching_any_recorded_machine_is_verified_and_others_are_named(self):
        import hashlib
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            (directory / "m.tflite").write_bytes(b"model")
            digest = hashlib.sha256(b"model").hexdigest()
            other = "0" * 64
            one = {"m.tflite": {"sha256": digest}}
            several = {"m.tflite": {"sha256": {"xeon-avx512": other, "epyc-avx2": digest}}}
            unrecorded = {"m.tflite": {"bytes": 5}}
            for files in (one, several, unrecorded):
                self.assertEqual(registry.verified(directory, files), (True, []))
            ok, problems = registry.verified(directory, {"m.tflite": {"sha256": {"xeon-avx512": other}}})
            self.assertFalse(ok)
            self.assertIn(f"m.tflite: sha256 {digest} matches no recorded build (xeon-avx512 {other}); built on",
                          problems[0])
            ok, problems = registry.verified(directory, {"gone.tflite": {"sha256": digest}})
            self.assertEqual((ok, problems), (False, ["gone.tflite: missing"]))
            for bad in ({}, {"x": 3}, 7, "", "A" * 64, {"xeon-avx512": digest[:-1]}):
                with self.assertRaises(ExportError) as caught:
                    registry.verified(directory, {"m.tflite": {"sha256": bad}})
                self.assertIn("'m.tflite': sha256 must be", str(caught.exception))
            with self.assertRaises(ExportError) as caught:
                registry.verified(directory, {"m.tflite": digest})
            self.assertIn("'m.tflite': expected a table", str(caught.exception))
            # The size checks a file without a digest, and names what a digest mismatch is; the digest decides.
            for files in ({"m.tflite": {"bytes": 6}}, {"m.tflite": {"bytes": 6, "sha256": other}}):
                self.assertEqual(registry.verified(directory, files),
                                 (False, ["m.tflite: 5 bytes, the registry records 6"]), files)
            self.assertEqual(registry.verified(directory, {"m.tflite": {"bytes": 6, "sha256": digest}}), (True, []))
            for bad in (-5, "5", 5.0, True):
                with self.assertRaises(ExportError) as caught:
                    registry.verified(directory, {"m.tflite": {"bytes": bad}})
                self.assertIn("'m.tflite': bytes must be a size in bytes", str(caught.exception))
            with self.assertRaises(ExportError) as caught:
                registry.verified(directory, {"m.tflite": {"sha265": digest}})
            self.assertIn("'m.tflite': unknown key 'sha265'", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
