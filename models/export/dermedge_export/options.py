"""The export's settings, checked once where they come in (the command line or models/models.toml).

`ExportOptions` is what `export.export` takes; `TargetFidelity` adds the int8 recipe search. Both
are frozen and refuse a bad value when they are made, with an ExportError naming the field. The
SavedModel and the image directories are not checked here: `export` says what is wrong with them
(contents included), and `build` makes them only after its options are checked.
"""
from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ExportError

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_DERMEDGE = str(ROOT / "target" / "release" / "dermedge")
INPUT_TYPES = ("float32", "uint8", "int8")
CALIBRATION_SAMPLING = ("stratified", "sorted")
RECIPE_NAMES = ("int8-plain", "int8-integer-groupnorm", "ablation-conv", "ablation-conv-add", "ablation-conv-add-norm",
                "int8-affine", "int8-calibration-x4",
                "int8-calibration-x4-affine", "int8-selective-5", "int8-selective-20", "dynamic-range-int8", "fp16",
                "int16x8", "aeq-int8", "aeq-int8-bias-corrected", "aeq-int8-bias-corrected-affine",
                "aeq-int8-bias-corrected-mse", "aeq-int8-cle-bias-corrected-mse", "aeq-int8-gptq-mse",
                "aeq-int8-activation-corrected-mse", "aeq-int8-gptq-activation-corrected-mse", "aeq-int8-adapted-mse",
                "aeq-int8-weights-gptq",
                "aeq-mixed-8",
                "aeq-mixed-32", "aeq-mixed-gptq-mse-8", "aeq-mixed-gptq-mse-32", "aeq-int8-qat-mse",
                "aeq-int8-qat-mse-affine", "aeq-a16w8")


def _set(obj, name: str, value):
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass's own field


def _count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ExportError(f"{name}: expected {expected}, got {value!r}")
    return value


def _number(name: str, value, positive: bool = False, nonzero: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (positive and value <= 0) or (nonzero and value == 0):
        expected = "a positive number" if positive else "a finite, non-zero number" if nonzero else "a finite number"
        raise ExportError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


def _text(name: str, value) -> str:
    if not isinstance(value, str) or not value:
        raise ExportError(f"{name}: expected a non-empty string, got {value!r}")
    return value


def _path(name: str, value, directory: bool = False) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ExportError(f"{name}: expected a path, got {value!r}")
    path = Path(value)
    if directory and not path.is_dir():
        raise ExportError(f"{name}: expected an existing directory, got {str(path)!r}")
    return path


@dataclass(frozen=True)
class TargetFidelity:
    """`--target-fidelity`: also search int8 recipes and keep the fastest that passes dermedge's gates."""
    dermedge: str = DEFAULT_DERMEDGE  # the binary that times and judges each recipe
    validation: Path | None = None  # None: the evaluation images
    validation_count: int | None = None  # judge on a stratified seeded sample of N validation images; None: all
    holdout: Path | None = None  # images the search never sees, to check its choice
    threads: int = 2
    latency_budget: float = 1.2  # the slowest a recipe may be, relative to the plain int8 export
    bench_runs: int = 5
    recipes: tuple[str, ...] | None = None  # None: all; the plain int8 export is always tried
    # A per-layer sensitivity run (dermedge_export.sensitivity) of this model's fp32 export: the
    # aeq-mixed-* recipes keep its most sensitive ops float. None: those recipes are not offered.
    sensitivity: Path | None = None
    # A quantisation-aware fine-tuning run (dermedge_export.qat) of this model: its fine-tuned float
    # .tflite, which aeq-int8-qat-mse quantises. None: that recipe is not offered.
    qat: Path | None = None

    def __post_init__(self):
        if not isinstance(self.dermedge, (str, os.PathLike)) or not os.fspath(self.dermedge):
            raise ExportError(f"dermedge: expected the path or command name of the dermedge binary, got {self.dermedge!r}")
        _set(self, "dermedge", os.fspath(self.dermedge))
        if not Path(self.dermedge).is_file() and shutil.which(self.dermedge) is None:
            raise ExportError(f"dermedge: {self.dermedge}: the dermedge binary is needed to judge recipes; build it "
                              "with `cargo build --release -p dermedge-cli` or pass --dermedge")
        for name in ("validation", "holdout"):
            if getattr(self, name) is not None:
                _set(self, name, _path(name, getattr(self, name), directory=True))
        if self.sensitivity is not None:
            _set(self, "sensitivity", _path("sensitivity", self.sensitivity))
            if not self.sensitivity.is_file():
                raise ExportError(f"sensitivity: {str(self.sensitivity)!r} is not a file (a sensitivity run's "
                                  "<name>.sensitivity.json)")
        if self.qat is not None:
            _set(self, "qat", _path("qat", self.qat))
            if not self.qat.is_file() or self.qat.suffix != ".tflite":
                raise ExportError(f"qat: {str(self.qat)!r} is not a .tflite file (a fine-tuning run's "
                                  "<name>.fp32.tflite, from dermedge_export.qat)")
        if self.validation_count is not None:
            _count("validation_count", self.validation_count)
        _count("threads", self.threads)
        _count("bench_runs", self.bench_runs)
        _set(self, "latency_budget", _number("latency_budget", self.latency_budget, positive=True))
        if self.recipes is not None:
            if isinstance(self.recipes, str) or not isinstance(self.recipes, Iterable):
                raise ExportError(f"recipes: expected a list of recipe names, got {self.recipes!r}")
            names = tuple(self.recipes)
            unknown = [repr(n) if not isinstance(n, str) or not n else n for n in names if n not in RECIPE_NAMES]
            if unknown:
                raise ExportError(f"recipes: unknown recipe {', '.join(unknown)}; the recipes are: {', '.join(RECIPE_NAMES)}")
            _set(self, "recipes", names)


@dataclass(frozen=True)
class ExportOptions:
    """What `export.export` converts, where it writes, and how."""
    savedmodel: Path
    name: str  # the stem of every file written
    out: Path
    calibration: Path  # calibration images
    evaluation: Path  # evaluation images, disjoint from calibration
    version: str = "1"
    input_type: str = "float32"  # the int8 model's input tensor type
    calibration_count: int = 64  # N calibration images, sampled as calibration_sampling says
    # "stratified": a seeded random sample, each image kind (the file name's first word: mosaic,
    # photo, texture, ...) in proportion to its share of the directory; "sorted": the first N.
    calibration_sampling: str = "stratified"
    calibration_seed: int = 448
    evaluation_count: int | None = None  # compare on the first N evaluation images; None: all
    debug_count: int = 4  # images for the per-layer quantisation error; 0 skips it
    image_tensor: str | None = None  # cut here instead of after the recovered preprocessing
    size: int | None = None  # with image_tensor, the preprocessing it stands for: size x size,
    scale: float | None = None  # value = pixel * scale + offset
    offset: float | None = None
    target_fidelity: TargetFidelity | None = None
    # Also convert this recipe (chosen by an earlier search, docs/QUANTISATION.md) and keep it as
    # <name>.<precision>-faithful.*: the export devices may ship.
    faithful_recipe: str | None = None

    def __post_init__(self):
        for name in ("savedmodel", "out", "calibration", "evaluation"):
            _set(self, name, _path(name, getattr(self, name)))
        _text("name", self.name)
        if "/" in self.name or os.sep in self.name:
            raise ExportError(f"name: expected a file-name stem, got {self.name!r}")
        _text("version", self.version)
        if self.input_type not in INPUT_TYPES:
            raise ExportError(f"input_type: expected one of {', '.join(INPUT_TYPES)}, got {self.input_type!r}")
        _count("calibration_count", self.calibration_count)
        if self.calibration_sampling not in CALIBRATION_SAMPLING:
            raise ExportError(f"calibration_sampling: expected one of {', '.join(CALIBRATION_SAMPLING)}, "
                              f"got {self.calibration_sampling!r}")
        _count("calibration_seed", self.calibration_seed, minimum=0)
        if self.evaluation_count is not None:
            _count("evaluation_count", self.evaluation_count)
        _count("debug_count", self.debug_count, minimum=0)
        stated = {"size": self.size, "scale": self.scale, "offset": self.offset}
        if self.image_tensor is None:
            given = [k for k, v in stated.items() if v is not None]
            if given:
                raise ExportError(f"{given[0]}: states the preprocessing of image_tensor, which is not set")
        else:
            _text("image_tensor", self.image_tensor)
            missing = [k for k, v in stated.items() if v is None]
            if missing:
                raise ExportError(f"image_tensor: needs size, scale and offset too (the preprocessing it stands "
                                  f"for); missing: {', '.join(missing)}")
            _count("size", self.size)
            _set(self, "scale", _number("scale", self.scale, nonzero=True))
            _set(self, "offset", _number("offset", self.offset))
        if self.faithful_recipe is not None and self.faithful_recipe not in RECIPE_NAMES:
            raise ExportError(f"faithful_recipe: expected one of {', '.join(RECIPE_NAMES)}, got {self.faithful_recipe!r}")
        if self.target_fidelity is not None:
            if not isinstance(self.target_fidelity, TargetFidelity):
                raise ExportError(f"target_fidelity: expected TargetFidelity or None, got {self.target_fidelity!r}")
            if self.input_type != "float32":
                raise ExportError(f"input_type: the recipe search (target_fidelity) is float-in/float-out, so "
                                  f"float32 only; got {self.input_type!r} (drop --input-type)")

    @classmethod
    def from_table(cls, table: Mapping, where: str, known: Iterable[str] = (), **fixed) -> ExportOptions:
        """Options from a TOML table over `fixed` (the fields the caller decides). A key that is
        neither a field the table may set nor one of `known` (the caller's own keys) is refused."""
        settable = {f.name for f in fields(cls)} - set(fixed) - {"target_fidelity"}
        known = set(known)
        for key in table:
            if key not in settable and key not in known:
                raise ExportError(f"{where}: unknown key {key!r}; it takes: {', '.join(sorted(settable | known))}")
        try:
            return cls(**fixed, **{k: v for k, v in table.items() if k in settable})
        except ExportError as e:
            raise ExportError(f"{where}: {e}") from e
