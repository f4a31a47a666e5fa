"""dermedge model tooling.

    python -m dermedge_export standin {df-mini,df-r101x3,lesion-x448} --out DIR
    python -m dermedge_export images --out DIR
    python -m dermedge_export export SAVEDMODEL --name NAME --out DIR --calibration DIR --evaluation DIR
    python -m dermedge_export build NAME            # per models/models.toml, into .cache/models/
    python -m dermedge_export recipes-report OUT --name NAME   # re-estimate a finished search
    python -m dermedge_export frontier OUT [OUT ...] --name NAME --svg FILE   # one plot of several searches
    python -m dermedge_export inputs (MANIFEST | --standin NAME) (--images DIR [--count N] | --calibration-record JSON) --out X.npz

Run it through scripts/python-env.sh (or models/export/dermedge-export), which provides the
pinned tensorflow-cpu venv.
"""
import argparse
import sys
from pathlib import Path

from . import registry
from .errors import ExportError
from .options import DEFAULT_DERMEDGE, ExportOptions, TargetFidelity


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["baseline"]:
        # The pipelines users would run instead of dermedge, for the side-by-side benchmark.
        from . import baseline
        return baseline.main(argv[1:])
    parser = argparse.ArgumentParser(prog="dermedge-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("standin", help="build a stand-in SavedModel with Derm Foundation's serving signature")
    p.add_argument("name", choices=["df-mini", "df-r101x3", "lesion-x448"])
    p.add_argument("--out", required=True, type=Path)

    p = sub.add_parser("images", help="build calibration/evaluation image sets from real sources")
    p.add_argument("--out", required=True, type=Path)

    p = sub.add_parser("export", help="export a SavedModel to fp32 + int8 TFLite with manifests and reports")
    p.add_argument("savedmodel", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--version", default="1")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--calibration", required=True, type=Path, help="directory of calibration images")
    p.add_argument("--evaluation", required=True, type=Path, help="directory of evaluation images (disjoint)")
    p.add_argument("--calibration-count", type=int, default=64)
    p.add_argument("--evaluation-count", type=int, default=None,
                   help="compare against the SavedModel on the first N evaluation images (default: all)")
    p.add_argument("--debug-count", type=int, default=4, help="images for the per-layer quantisation error; 0 skips it (it holds every "
                        "intermediate tensor: the export's memory peak)")
    p.add_argument("--input-type", choices=["float32", "uint8", "int8"], default="float32",
                   help="int8 model's input tensor type (default: float in, float out)")
    p.add_argument("--image-tensor", help="cut the graph at this tensor instead of the recovered one")
    p.add_argument("--size", type=int)
    p.add_argument("--scale", type=float)
    p.add_argument("--offset", type=float)
    p.add_argument("--calibration-sampling", choices=["stratified", "sorted"], default="stratified",
                   help="stratified (default): a seeded random sample, each image kind in proportion; sorted: the first N")
    p.add_argument("--calibration-seed", type=int, default=448)
    p.add_argument("--faithful-recipe", help="also convert this recipe (chosen by an earlier search) and keep it as "
                                            "<name>.<precision>-faithful.*")
    p.add_argument("--target-fidelity", action="store_true",
                   help="also search int8 recipes in order of cost; keep the fastest that passes dermedge's "
                        "fidelity gates as <name>.<precision>-faithful.tflite (see docs/QUANTISATION.md)")
    p.add_argument("--validation", type=Path, help="recipe search: validation images (default: --evaluation)")
    p.add_argument("--validation-count", type=int,
                   help="recipe search: judge on a seeded sample of N validation images, stratified by kind "
                        "(the calibration seed)")
    p.add_argument("--holdout", type=Path, help="recipe search: images the search never sees, to check the choice")
    p.add_argument("--dermedge", default=None, help="recipe search: the dermedge binary (default: target/release)")
    p.add_argument("--threads", type=int, default=2, help="recipe search: threads for timing and fidelity")
    p.add_argument("--latency-budget", type=float, default=1.2,
                   help="recipe search: the slowest a recipe may be, relative to the plain int8 export")
    p.add_argument("--bench-runs", type=int, default=5)
    p.add_argument("--sensitivity", type=Path,
                   help="recipe search: a per-layer sensitivity run of this model's fp32 export "
                        "(dermedge_export.sensitivity); offers the aeq-mixed-* recipes")
    p.add_argument("--qat", type=Path,
                   help="recipe search: the float .tflite of a quantisation-aware fine-tuning run of this model "
                        "(dermedge_export.qat); offers aeq-int8-qat-mse and its -affine twin, judged against "
                        "this model's own fp32")
    p.add_argument("--recipes", help="recipe search: comma-separated recipe names to try (default: all; the plain "
                                     "int8 export is always tried, as the timing baseline)")

    p = sub.add_parser("recipes-report", help="recompute a finished search's delegation and Cortex-A76 estimates "
                                              "from its files and rewrite its tables and frontier")
    p.add_argument("out", type=Path, help="the search's --out directory")
    p.add_argument("--name", required=True)

    p = sub.add_parser("frontier", help="one fidelity-against-latency plot of several finished searches "
                                        "(each recipe as the first search that judged it recorded it)")
    p.add_argument("outs", type=Path, nargs="+", help="the searches' --out directories")
    p.add_argument("--name", required=True)
    p.add_argument("--svg", required=True, type=Path)

    p = sub.add_parser("inputs", help="preprocess images as dermedge does for a model (its manifest) into an .npz, "
                                      "for tools in the quantizer venv")
    p.add_argument("manifest", type=Path, nargs="?", help="the model's dermedge manifest (.toml): input size, scale, offset")
    p.add_argument("--standin", help="instead of a manifest: a BiT stand-in's input, df-mini or df-r101x3 "
                                     "(for `dermedge_export.quantsim`)")
    p.add_argument("--images", type=Path, help="a directory of images")
    p.add_argument("--count", type=int, help="a seeded sample of this many, stratified by image kind (default: all)")
    p.add_argument("--seed", type=int, default=448)
    p.add_argument("--calibration-record", type=Path,
                   help="an export's <name>.calibration.json: exactly the images it calibrated on")
    p.add_argument("--textures", type=int, default=0,
                   help="also this many single-patch textures made from the images' mosaics (a quadrant tiled 2x2)")
    p.add_argument("--out", required=True, type=Path)

    p = sub.add_parser("build", help="build a registry model (models/models.toml) into the cache")
    p.add_argument("name")
    p.add_argument("--cache", type=Path, default=None)

    args = parser.parse_args(argv)
    try:
        # These subcommands' modules load TensorFlow, so each is imported only when its command runs.
        if args.command == "standin":
            from . import standins
            standins.build(args.name, args.out)
            print(f"wrote SavedModel {args.out}")
        elif args.command == "images":
            from . import images
            images.build(args.out)
            print(f"wrote image sets to {args.out}")
        elif args.command == "export":
            target = None
            for given, flag in ((args.sensitivity, "--sensitivity"), (args.qat, "--qat")):
                if given is not None and not args.target_fidelity:
                    raise ExportError(f"{flag} offers recipes to the search: it needs --target-fidelity")
            if args.target_fidelity:
                target = TargetFidelity(
                    dermedge=args.dermedge or DEFAULT_DERMEDGE, validation=args.validation,
                    validation_count=args.validation_count, holdout=args.holdout, threads=args.threads,
                    latency_budget=args.latency_budget, bench_runs=args.bench_runs,
                    recipes=tuple(args.recipes.split(",")) if args.recipes is not None else None,
                    sensitivity=args.sensitivity, qat=args.qat)
            options = ExportOptions(
                savedmodel=args.savedmodel, name=args.name, out=args.out, calibration=args.calibration,
                evaluation=args.evaluation, version=args.version, input_type=args.input_type,
                calibration_count=args.calibration_count, calibration_sampling=args.calibration_sampling,
                calibration_seed=args.calibration_seed, faithful_recipe=args.faithful_recipe,
                evaluation_count=args.evaluation_count,
                debug_count=args.debug_count, image_tensor=args.image_tensor, size=args.size, scale=args.scale,
                offset=args.offset, target_fidelity=target)
            from . import export
            export.export(options)
        elif args.command == "recipes-report":
            from . import recipes
            recipes.refresh(args.out, args.name)
            print(f"rewrote {args.out / (args.name + '.recipes.md')} and {args.name}.frontier.svg")
        elif args.command == "frontier":
            from . import recipes
            result = recipes.merged(args.outs, args.name)
            args.svg.write_text(recipes.frontier_svg(args.name, result))
            print(f"wrote {args.svg} ({len(result['recipes'])} recipes)")
        elif args.command == "inputs":
            from . import export
            if (args.manifest is None) == (args.standin is None):
                raise ExportError("inputs: give a manifest or --standin, not both or neither")
            if args.standin is not None:
                from . import standins
                pre = standins.bit_preprocessing(args.standin)
            else:
                pre = export.manifest_preprocessing(args.manifest)
            n = export.write_inputs(pre, args.out, images=args.images, count=args.count, seed=args.seed,
                                    calibration_record=args.calibration_record, textures=args.textures)
            print(f"wrote {n} preprocessed inputs to {args.out}")
        elif args.command == "build":
            registry.build(args.name, args.cache)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
