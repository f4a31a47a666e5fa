"""`build NAME`: build a registry model (models/models.toml) into .cache/models/NAME/, idempotently.

Steps, each skipped when its output is already there and verified: the image sets
(.cache/models/images/), the stand-in SavedModel, the export. Every built .tflite is checked
against the sha256 the registry records for it (one per CPU family a build was recorded on); a file
matching none is an error (the conversion did not reproduce).
"""
import json
import platform
import time
import tomllib
from pathlib import Path

from .errors import ExportError
from .manifest import sha256
from .options import ROOT, ExportOptions

REGISTRY = ROOT / "models" / "models.toml"
# A model table's own keys; every other key in it is an export option (options.ExportOptions).
MODEL_KEYS = ("description", "standin", "ci", "files")
FILE_KEYS = ("bytes", "sha256")


def load_registry() -> dict:
    return tomllib.loads(REGISTRY.read_text())


def recorded_digests(name: str, spec: dict) -> dict[str, str]:
    """The sha256 of each recorded build of file `name`, by the machine it was recorded on.

    `sha256 = "<hex>"` records one build; `sha256 = { <machine> = "<hex>", ... }` records one per
    CPU family whose conversions differ in the last bits (models.toml says why). None: not recorded.
    """
    if not isinstance(spec, dict):
        raise ExportError(f"{REGISTRY}: file {name!r}: expected a table such as {{ sha256 = \"<hex>\" }}, "
                          f"not {spec!r}")
    if unknown := sorted(set(spec) - set(FILE_KEYS)):
        raise ExportError(f"{REGISTRY}: file {name!r}: unknown key {unknown[0]!r} (expected {', '.join(FILE_KEYS)})")
    value = spec.get("sha256")
    if value is None:
        return {}
    digests = {"recorded": value} if isinstance(value, str) else value
    if not (isinstance(digests, dict) and digests and all(is_digest(d) for d in digests.values())):
        raise ExportError(f"{REGISTRY}: file {name!r}: sha256 must be a hex digest (64 lower-case hex "
                          f"digits) or a table of machine = hex digest, not {value!r}")
    return dict(digests)


def is_digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def this_cpu() -> str:
    """The CPU as /proc/cpuinfo names it, and its widest vector unit (what decides the last bits)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []

    def field(key):
        return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == key), "")

    model = field("model name") or platform.machine() or "an unknown CPU"
    if platform.machine() in ("aarch64", "arm64"):
        return f"{model} (features: {field('Features') or 'unknown'})"
    flags = field("flags").split()
    return f"{model} ({'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'})"


def verified(directory: Path, files: dict) -> tuple[bool, list[str]]:
    problems = []
    for name, spec in files.items():
        path = directory / name
        digests = recorded_digests(name, spec)
        size = spec.get("bytes")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise ExportError(f"{REGISTRY}: file {name!r}: bytes must be a size in bytes, not {size!r}")
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        # The digest decides; the size names what a mismatch is (a truncated copy, say) and checks
        # a file that has no digest recorded.
        digest = sha256(path) if digests else None
        actual = path.stat().st_size
        if size is not None and actual != size and digest not in digests.values():
            problems.append(f"{name}: {actual} bytes, the registry records {size}")
        elif digests and digest not in digests.values():
            recorded = ", ".join(f"{machine} {d}" for machine, d in digests.items())
            problems.append(f"{name}: sha256 {digest} matches no recorded build ({recorded}); built on {this_cpu()}")
    return not problems, problems


def export_options(name: str, spec: dict, cache: Path) -> ExportOptions:
    """The export of model `name` (its models.toml table) into `cache`; an unknown key is refused."""
    where = f"{REGISTRY}: [models.{name}]"
    missing = [k for k in ("standin", "files") if k not in spec]
    if missing:
        raise ExportError(f"{where}: missing key {missing[0]!r}")
    images = cache / "images"
    return ExportOptions.from_table(spec, where, known=MODEL_KEYS, savedmodel=cache / name / "savedmodel", name=name,
                                    out=cache / name, calibration=images / "calibration",
                                    evaluation=images / "evaluation")


def build(name: str, cache: Path | None = None) -> Path:
    registry = load_registry()
    models = registry["models"]
    if name not in models:
        raise ExportError(f"{REGISTRY}: no model {name!r}; it lists: {', '.join(models)}")
    spec = models[name]
    cache = Path(cache or ROOT / ".cache" / "models")
    options = export_options(name, spec, cache)
    out = options.out
    files = spec["files"]
    started = time.time()

    def step(message):
        print(f"[{time.time() - started:6.1f}s] {name}: {message}", flush=True)

    ok, problems = verified(out, files)
    if ok and all(recorded_digests(f, s) for f, s in files.items()):
        step(f"up to date in {out} (checksums verified)")
        return out

    # Building loads TensorFlow, so its modules are imported only past the up-to-date check.
    images = cache / "images"
    if not (images / "sets.json").is_file() or not (images / "evaluation-wide").is_dir():
        step(f"building calibration/evaluation image sets in {images}")
        from . import images as image_sets
        image_sets.build(images)
    savedmodel = options.savedmodel
    if not (savedmodel / "saved_model.pb").is_file():
        step(f"building the {spec['standin']} stand-in SavedModel")
        from . import standins
        standins.build(spec["standin"], savedmodel)
    step("exporting fp32 and int8 TFLite")
    from . import export
    export.export(options, progress=step)
    for extra in ("evaluation-upscaled",):
        (out / f"{name}.{extra}.txt").write_text(str(images / extra) + "\n")

    ok, problems = verified(out, files)
    unrecorded = {f: sha256(out / f) for f, s in files.items()
                  if not recorded_digests(f, s) and (out / f).is_file()}
    if not ok:
        raise ExportError(f"{name}: the build does not reproduce the registry's files: {'; '.join(problems)}")
    for f, digest in unrecorded.items():
        step(f"{f}: sha256 {digest} (not yet recorded in {REGISTRY.name})")
    step(f"built and verified in {out}")
    (out / "BUILT").write_text(json.dumps({f: sha256(out / f) for f in files}, indent=1) + "\n")
    return out
