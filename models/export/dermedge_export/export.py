"""Export a Derm-Foundation-style SavedModel to fp32 and full-int8 TFLite for dermedge.

The SavedModel's `serving_default` takes serialized tf.train.Example strings (PNG bytes under
`image/encoded`) and returns `embedding`; decoding, resizing and scaling happen in its graph.
The device cannot run string parsing and PNG decoding in TFLite, so the exporter:

1. inlines every function call of `serving_default` (its variables stay variables) and finds its
   preprocessing: the image decode op, the one bilinear resize (its size and half-pixel
   attributes) and the chain of scalar affine ops after it;
2. cuts the graph after that chain, so the TFLite model takes the decoded, resized, scaled image
   tensor [1, H, W, 3], and states in the manifest exactly what dermedge's Rust preprocessing
   must do to produce it (size, bilinear half-pixel resize, value = pixel * scale + offset);
   the cut model core is saved with its variables, so the weights become constants only inside
   the converter (freezing the whole serving graph first needed more than 24 GB for R101x3; the
   fp32 conversion now peaks at 14 GB, models/README.md);
3. converts fp32 and full-int8 (representative dataset from the calibration images), and writes
   a calibration record, an op report, per-layer quantisation errors (QuantizationDebugger) and
   a comparison of the TFLite files against the SavedModel's own serving path.

If the preprocessing cannot be recovered (e.g. it runs inside a loop), name the image tensor with
--image-tensor and state the mapping with --scale/--offset/--size.
"""
import gc
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import tensor_util
# The function inlining that freezing runs, without freezing: no public API inlines a signature's
# nested function calls, and the cut needs one flat graph.
from tensorflow.python.framework.convert_to_constants import _run_inline_graph_optimization

from . import classifier, opreport, recipes
from .classifier import TEACHER_CLASSES
from .calibration import calibration_sample, image_kind, stratified_sample
from .runner import run_tflite
from .errors import ExportError
from .manifest import Preprocessing, sha256, write_manifest
from .options import ExportOptions

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass
class ServingGraph:
    """`serving_default` with every function call inlined; its variables stay variables."""
    graph_def: object  # tf.compat.v1.GraphDef: small, it holds no weights
    graph: tf.Graph  # the same graph imported, for shapes
    output_tensor: str  # the `embedding` tensor
    captures: dict  # placeholder tensor name in graph_def -> the variable handle it stands for
    variables: list


def _untangle_inlined(graph_def):
    """Two leftovers of inlining, removed in one pass. (1) Each variable reaches the inlined body
    through an Identity of its handle; the converter freezes a variable into constants only where
    ReadVariableOp reads the handle directly, and through an Identity it keeps every weight as a
    runtime variable (VAR_HANDLE). (2) Colocation hints name those removed nodes, and graph
    pruning follows hints as if they were inputs (keeping the string parsing in the cut core);
    they mean nothing to TFLite."""
    resource = tf.resource.as_datatype_enum
    source = {n.name: n.input[0] for n in graph_def.node
              if n.op == "Identity" and "T" in n.attr and n.attr["T"].type == resource}

    def resolve(name):
        while name.split(":")[0] in source:
            name = source[name.split(":")[0]]
        return name

    kept = [n for n in graph_def.node if n.name not in source]
    for node in kept:
        inputs = ["^" + resolve(i[1:]).split(":")[0] if i.startswith("^") else resolve(i) for i in node.input]
        del node.input[:]
        node.input.extend(inputs)
        if "_class" in node.attr:
            del node.attr["_class"]
    del graph_def.node[:]
    graph_def.node.extend(kept)


def inline_serving(fn) -> ServingGraph:
    graph_def = _run_inline_graph_optimization(fn, lower_control_flow=False, aggressive_inlining=True)
    _untangle_inlined(graph_def)
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    # Signature outputs follow tf.nest's flattening of the output dict (sorted keys).
    output_tensor = fn.outputs[sorted(fn.structured_outputs).index("embedding")].name
    captures = {internal.name: external for external, internal in fn.graph.captures}
    return ServingGraph(graph_def, graph, output_tensor, captures, list(fn.variables))


def load_serving(savedmodel: Path):
    savedmodel = Path(savedmodel)
    if not savedmodel.is_dir() or not (savedmodel / "saved_model.pb").is_file():
        raise ExportError(f"{savedmodel}: not a SavedModel directory (no saved_model.pb)")
    loaded = tf.saved_model.load(str(savedmodel))
    signatures = list(loaded.signatures.keys())
    if "serving_default" not in signatures:
        raise ExportError(f"{savedmodel}: no `serving_default` signature; it has: {signatures or 'none'}")
    fn = loaded.signatures["serving_default"]
    outputs = fn.structured_outputs
    if not isinstance(outputs, dict) or "embedding" not in outputs:
        names = list(outputs) if isinstance(outputs, dict) else [str(outputs)]
        raise ExportError(f"{savedmodel}: serving_default returns {names}, not `embedding`")
    inputs = [s for s in tf.nest.flatten(fn.structured_input_signature) if isinstance(s, tf.TensorSpec)]
    if len(inputs) != 1 or inputs[0].dtype != tf.string:
        raise ExportError(f"{savedmodel}: serving_default must take one string tensor of serialized "
                          f"tf.train.Example; it takes {inputs}")
    return loaded, fn


def _const_scalar(nodes, name):
    node = nodes.get(name.split(":")[0].lstrip("^"))
    if node is None or node.op != "Const":
        return None
    value = tensor_util.MakeNdarray(node.attr["value"].tensor)
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def find_preprocessing(serving: ServingGraph) -> Preprocessing:
    gd = serving.graph_def
    nodes = {n.name: n for n in gd.node}
    consumers = {}
    for n in gd.node:
        for i in n.input:
            consumers.setdefault(i.split(":")[0].lstrip("^") + (":" + i.split(":")[1] if ":" in i else ":0"), []).append(n)
    decodes = [n for n in gd.node if n.op in ("DecodePng", "DecodeImage", "DecodeJpeg", "DecodeBmp")]
    unsupported = [n for n in gd.node if n.op in ("ScaleAndTranslate", "ResizeBicubic", "ResizeArea", "ResizeNearestNeighbor")]
    resizes = [n for n in gd.node if n.op == "ResizeBilinear"]
    if unsupported:
        raise ExportError(f"the serving graph resizes with {unsupported[0].op} (antialiased or non-bilinear); "
                          "dermedge reproduces TensorFlow's bilinear resize only -- pass --image-tensor to cut after it")
    if len(resizes) != 1 or len(decodes) < 1:
        raise ExportError(f"could not recover the preprocessing: found {len(decodes)} decode and {len(resizes)} "
                          "bilinear resize ops in the top-level serving graph (preprocessing inside a loop?); "
                          "name the image tensor with --image-tensor and state --size/--scale/--offset")
    resize = resizes[0]
    if resize.attr["align_corners"].b or not resize.attr["half_pixel_centers"].b:
        raise ExportError(f"{resize.name}: bilinear resize without half-pixel centres; dermedge reproduces "
                          "tf.image.resize (half_pixel_centers=True, align_corners=False) only")
    size_node = nodes[resize.input[1].split(":")[0]]
    height, width = [int(v) for v in tensor_util.MakeNdarray(size_node.attr["value"].tensor)]
    tensor, scale, offset, chain = resize.name + ":0", 1.0, 0.0, []
    while True:
        users = consumers.get(tensor, [])
        if len(users) != 1:
            break
        op = users[0]
        others = [i for i in op.input if not i.startswith("^") and (i if ":" in i else i + ":0") != tensor]
        if op.op in ("ExpandDims", "Squeeze", "Identity", "Cast", "Reshape"):
            pass
        elif op.op in ("Mul", "RealDiv", "Sub", "AddV2", "Add") and len(others) == 1:
            c = _const_scalar(nodes, others[0])
            first = (op.input[0] if ":" in op.input[0] else op.input[0] + ":0") == tensor
            if c is None or (op.op in ("RealDiv", "Sub") and not first):
                break
            if op.op == "Mul":
                scale, offset = scale * c, offset * c
            elif op.op == "RealDiv":
                scale, offset = scale / c, offset / c
            elif op.op == "Sub":
                offset -= c
            else:
                offset += c
        else:
            break
        chain.append(f"{op.op}({op.name})")
        tensor = op.name + ":0"
    shape = serving.graph.get_tensor_by_name(tensor).shape
    if shape.rank != 4 or list(shape[1:]) != [height, width, 3]:
        raise ExportError(f"the preprocessed image tensor {tensor} has shape {shape}, not [1, {height}, {width}, 3]; "
                          "name the model's image input with --image-tensor")
    return Preprocessing(decodes[0].op, resize.name, height, width, scale, offset, tensor, chain, True)


def _downstream(gd, source: str) -> set:
    """Names of the nodes whose value depends on node `source` (data edges only)."""
    consumers = {}
    for node in gd.node:
        for i in node.input:
            if not i.startswith("^"):
                consumers.setdefault(i.split(":")[0], []).append(node.name)
    reached, todo = set(), [source]
    while todo:
        for name in consumers.get(todo.pop(), []):
            if name not in reached:
                reached.add(name)
                todo.append(name)
    return reached


def integer_friendly(gd, image: str | None = None) -> int:
    """Rewrite `Square(x)` as `Mul(x, x)` and `SquaredDifference(a, b)` as `Mul(a - b, a - b)`, in
    place; returns how many were rewritten. The same arithmetic in float, but TFLite has no integer
    SQUARE or SQUARED_DIFFERENCE kernel: left as they are, GroupNorm's variance runs in float,
    between a DEQUANTIZE and a QUANTIZE, in every layer of a full-int8 export.

    With `image` (the input node), only ops on the image's path are rewritten: weight
    standardisation's moments must stay as they are, for the converter folds those into constant
    weights (rewritten, R101x3's large kernels were left computed at run time, and a convolution
    with computed weights gets activation quantisation, which int8 kernels refuse)."""
    rewritten = 0
    extra = []
    on_path = _downstream(gd, image) if image else None
    for node in gd.node:
        if on_path is not None and node.name not in on_path:
            continue
        if node.op == "Square":
            node.op = "Mul"
            node.input.append(node.input[0])
            rewritten += 1
        elif node.op == "SquaredDifference":
            sub = type(node)()
            sub.name = node.name + "/difference"
            sub.op = "Sub"
            sub.input.extend(node.input[:2])
            sub.attr["T"].CopyFrom(node.attr["T"])
            extra.append(sub)
            node.op = "Mul"
            del node.input[:]
            node.input.extend([sub.name, sub.name])
            rewritten += 1
    gd.node.extend(extra)
    return rewritten


def _tensor_name(name: str) -> str:
    return name if ":" in name else name + ":0"


def cut(serving: ServingGraph, image_tensor: str, shape: list, rewrite_squares: bool = False):
    """The model core from `image_tensor` to `embedding`: a concrete function with the signature
    dermedge expects (input `image`, output `embedding`) that reads the loaded variables."""
    gd = type(serving.graph_def)()
    gd.CopyFrom(serving.graph_def)
    names = {n.name for n in gd.node}
    if image_tensor.split(":")[0] not in names:
        raise ExportError(f"no tensor named {image_tensor!r} in the serving graph")
    image = gd.node.add()
    image.name, image.op = "dermedge/image", "Placeholder"
    image.attr["dtype"].type = tf.float32.as_datatype_enum
    cut_at = _tensor_name(image_tensor)
    for node in gd.node:
        # Control edges (input validation asserts on the serialized strings) would tie the
        # embedding to the string input; the cut graph feeds the image directly, so they go.
        inputs = [image.name if _tensor_name(i) == cut_at else i for i in node.input if not i.startswith("^")]
        del node.input[:]
        node.input.extend(inputs)
    if rewrite_squares:
        integer_friendly(gd, image=image.name)
    core = tf.compat.v1.graph_util.extract_sub_graph(gd, [serving.output_tensor.split(":")[0]])
    del gd
    captured = {n.split(":")[0] for n in serving.captures}
    left = [n.name for n in core.node if n.op == "Placeholder" and n.name not in captured | {image.name}]
    if left:
        raise ExportError(f"cutting at {image_tensor} does not separate the image from the embedding: "
                          f"the core still reads {left}; name the model's image input with --image-tensor")
    used = {n.name for n in core.node}
    captures = [(name, handle) for name, handle in serving.captures.items() if name.split(":")[0] in used]
    # Pruned with the variables as arguments: mapping them with import_graph_def's input_map would
    # leave the original resource placeholders dangling in the function, and the converter then
    # keeps every weight as a runtime variable (VAR_HANDLE/READ_VARIABLE) instead of a constant.
    wrapped = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(core, name=""), [])
    graph = wrapped.graph
    pruned = wrapped.prune(feeds=[graph.get_tensor_by_name(image.name + ":0")]
                           + [graph.get_tensor_by_name(name) for name, _ in captures],
                           fetches=graph.get_tensor_by_name(serving.output_tensor))
    handles = [handle for _, handle in captures]

    # A signature (input `image`, output `embedding`) for the TFLite file, as dermedge expects.
    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="image")])
    def serving_default(x):
        return {"embedding": pruned(x, *handles)}

    return serving_default.get_concrete_function()


def save_core(core, serving: ServingGraph, directory: Path):
    """Saves the cut core with its variables (streamed to a checkpoint, never a graph constant)."""
    holder = tf.Module()
    holder.serving_default = core
    holder.weights = serving.variables
    tf.saved_model.save(holder, str(directory), signatures={"serving_default": core})


def list_images(directory: Path, what: str) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"{what} directory {directory} does not exist")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    readable = []
    for p in files:
        try:
            tf.io.decode_image(p.read_bytes(), channels=3, expand_animations=False)
            readable.append(p)
        except Exception:  # noqa: BLE001 -- report and skip unreadable files
            print(f"warning: {p}: not a readable image, skipped")
    if not readable:
        raise ExportError(f"{what} directory {directory} holds no readable images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return readable


def model_input(path: Path, pre: Preprocessing) -> np.ndarray:
    """What dermedge's Rust preprocessing computes, in TensorFlow: decode, bilinear resize, affine."""
    return pixels_input(tf.io.decode_image(path.read_bytes(), channels=3, expand_animations=False), pre)


def pixels_input(pixels, pre: Preprocessing) -> np.ndarray:
    """`model_input` after decoding: bilinear resize, affine."""
    img = tf.image.resize(pixels, [pre.height, pre.width], method="bilinear", antialias=False)
    return (img.numpy() * np.float32(pre.scale) + np.float32(pre.offset))[None].astype(np.float32)


def mosaic_textures(files: list[Path], count: int) -> list[tuple[str, np.ndarray]]:
    """`count` single-patch textures made from the mosaics among `files` (evenly spread over them):
    one quadrant of a mosaic (one patch tiled 7x7) tiled 2x2, the top-left and bottom-right
    quadrants in turn — what evaluation-wide's textures are, from calibration sources only."""
    from PIL import Image

    mosaics = [f for f in files if f.name.startswith("mosaic")]
    if len(mosaics) < count:
        raise ExportError(f"inputs: --textures {count} needs as many mosaics among the images; there are {len(mosaics)}")
    out = []
    for k, i in enumerate(np.linspace(0, len(mosaics) - 1, count).round().astype(int)):
        with Image.open(mosaics[i]) as img:
            px = np.asarray(img.convert("RGB"))
        h, w = px.shape[0] // 2, px.shape[1] // 2
        quadrant = px[:h, :w] if k % 2 == 0 else px[h:2 * h, w:2 * w]
        out.append((f"texture-of-{mosaics[i].name}", np.tile(quadrant, (2, 2, 1))))
    return out


def manifest_preprocessing(manifest: Path) -> Preprocessing:
    """The input size and affine a dermedge manifest states (what `model_input` needs)."""
    import tomllib

    try:
        spec = tomllib.loads(Path(manifest).read_text())["input"]
        return Preprocessing(decode_op="", resize_op="", height=int(spec["height"]), width=int(spec["width"]),
                             scale=float(spec["scale"]), offset=float(spec["offset"]), cut_tensor="", chain=[],
                             recovered=True)
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{manifest}: not a dermedge manifest with [input] height, width, scale and offset ({e})") from e


def write_inputs(pre: Preprocessing, out: Path, images: Path | None = None, count: int | None = None, seed: int = 448,
                 calibration_record: Path | None = None, textures: int = 0) -> int:
    """Preprocess images for a model (`pre`: its manifest's input, `manifest_preprocessing`) into
    `out` (.npz: float32 `inputs` [n, h, w, c], `names`): a directory (all, or a stratified seeded
    sample of `count`), or exactly the images an export calibrated on (its
    `<name>.calibration.json`); then `textures` single-patch textures made from their mosaics
    (`mosaic_textures`)."""
    if (images is None) == (calibration_record is None):
        raise ExportError("inputs: give either an image directory or a calibration record, not both or neither")
    if calibration_record is not None:
        if count is not None:
            raise ExportError("inputs: --count picks from --images; a calibration record lists its images")
        try:
            record = json.loads(Path(calibration_record).read_text())
            files = [Path(record["calibration_dir"]) / f for f in record["files"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExportError(f"{calibration_record}: not an export's calibration record ({e})") from e
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ExportError(f"{calibration_record}: {len(missing)} recorded calibration images are gone, e.g. {missing[0]}")
    else:
        files = list_images(images, "inputs")
        if count is not None:
            if count < 1:
                raise ExportError(f"inputs: --count must be at least 1, not {count}")
            files, _ = stratified_sample(files, count, seed)
    if not files:
        raise ExportError(f"inputs: {calibration_record or images} names no images")
    if textures < 0:
        raise ExportError(f"inputs: --textures must be 0 or more, not {textures}")
    made = mosaic_textures(files, textures) if textures else []
    inputs = np.concatenate([model_input(f, pre) for f in files] + [pixels_input(px, pre) for _, px in made])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, inputs=inputs, names=np.array([f.name for f in files] + [name for name, _ in made]),
             scale=np.float64(pre.scale), offset=np.float64(pre.offset))
    return len(inputs)


def serialized_example(path: Path) -> bytes:
    png = path.read_bytes()
    if path.suffix.lower() != ".png":
        png = tf.io.encode_png(tf.io.decode_image(png, channels=3, expand_animations=False)).numpy()
    feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[png]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def summary(values: np.ndarray) -> dict:
    return {"n": int(values.size), "min": float(values.min()), "p1": float(np.percentile(values, 1)),
            "median": float(np.median(values)), "mean": float(values.mean())}


def write_teacher_labels(loaded, embeddings: np.ndarray, files: list[Path], path: Path):
    """Where the SavedModel carries a trained `teacher` signature (embedding -> class probabilities),
    label each evaluation image with the teacher's top class: real labels for training and
    evaluating dermedge heads on the model's own embeddings."""
    signatures = loaded.signatures
    if "teacher" not in signatures:
        return
    probabilities = signatures["teacher"](embedding=tf.constant(embeddings))["probabilities"].numpy()
    with open(path, "w") as f:
        f.write("file,label\n")
        for file, row in zip(files, probabilities):
            f.write(f"{file.name},{TEACHER_CLASSES[int(np.argmax(row))]}\n")


def validation_subset(files: list[Path], count: int, seed: int, subset: Path) -> Path:
    """Copy a seeded sample of `count` of `files`, each image kind in proportion, into the fresh
    directory `subset`, for a search on a full-size model, which costs seconds per image and
    recipe (the first `count` in sorted order would be one kind)."""
    sample, _ = stratified_sample(files, count, seed)
    shutil.rmtree(subset, ignore_errors=True)
    subset.mkdir(parents=True)
    for f in sample:
        shutil.copy(f, subset / f.name)
    return subset


def export(options: ExportOptions, progress=print) -> dict:
    """Writes the fp32 and int8 TFLite files, their manifests and reports to `options.out`; returns the report."""
    savedmodel, name, out, version = options.savedmodel, options.name, options.out, options.version
    calibration, evaluation, debug_count = options.calibration, options.evaluation, options.debug_count
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    cal_files, sampling = calibration_sample(list_images(calibration, "calibration"), options)
    eval_files = list_images(evaluation, "evaluation")[:options.evaluation_count]
    overlap = {sha256(p) for p in cal_files} & {sha256(p) for p in eval_files}
    if overlap:
        raise ExportError(f"{len(overlap)} images are in both the calibration and the evaluation set; they must be disjoint")

    progress(f"[{name}] loading {savedmodel}")
    loaded, fn = load_serving(savedmodel)
    serving = inline_serving(fn)
    if options.image_tensor:
        pre = Preprocessing("stated", "stated", options.size, options.size, options.scale, options.offset,
                            options.image_tensor, [], False)
    else:
        pre = find_preprocessing(serving)
    progress(f"[{name}] preprocessing: {pre.decode_op} -> bilinear {pre.height}x{pre.width} -> "
             f"x*{pre.scale:.8g}+{pre.offset:.8g}; graph cut at {pre.cut_tensor}")
    shape = [1, pre.height, pre.width, 3]
    core = cut(serving, pre.cut_tensor, shape)
    dim = int(core.structured_outputs["embedding"].shape[-1])
    if core.structured_outputs["embedding"].shape.rank != 2:
        raise ExportError(f"`embedding` has shape {core.structured_outputs['embedding'].shape}; expected [batch, dim]")

    cal_inputs = [model_input(p, pre) for p in cal_files]

    def representative():
        for x in cal_inputs:
            yield [x]

    # Converting from a SavedModel (rather than the concrete function) gives the TFLite file a
    # `serving_default` signature with input `image` and output `embedding`, which dermedge checks.
    core_dir = Path(tempfile.mkdtemp(prefix=f"{name}-core-"))
    save_core(core, serving, core_dir)

    def converter(int8: bool):
        conv = tf.lite.TFLiteConverter.from_saved_model(str(core_dir), signature_keys=["serving_default"])
        if int8:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = representative
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = {"float32": tf.float32, "uint8": tf.uint8, "int8": tf.int8}[options.input_type]
            conv.inference_output_type = tf.float32
        return conv

    teacher = classifier.write_teacher(loaded, name, dim, out / f"{name}.teacher.json")
    tool = f"models/export (tensorflow {tf.__version__})"
    files = {}
    for precision in ("fp32", "int8"):
        progress(f"[{name}] converting {precision}")
        tflite = out / f"{name}.{precision}.tflite"
        tflite.write_bytes(converter(precision == "int8").convert())
        files[precision] = tflite

    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_path=str(files["int8"])).get_input_details()[0]
    int8_dtype = {np.float32: "float32", np.uint8: "uint8", np.int8: "int8"}[detail["dtype"]]
    quant = detail["quantization"] if int8_dtype != "float32" else None
    common = {"source": f"SavedModel {savedmodel} (serving_default)", "tool": tool,
              "preprocessing": "recovered from the serving graph" if pre.recovered else "stated on the command line",
              "graph_cut": pre.cut_tensor}
    write_manifest(out / f"{name}.fp32.toml", files["fp32"], name, version, "fp32", dim, pre, "float32", None,
                   {**common, "conversion": "TFLiteConverter, float32"}, classifier=teacher)
    write_manifest(out / f"{name}.int8.toml", files["int8"], name, version, "int8", dim, pre, int8_dtype,
                   quant and (float(quant[0]), int(quant[1])),
                   {**common, "conversion": f"full-integer int8, {int8_dtype} input, float32 output; "
                                            f"{len(cal_files)} calibration images",
                    "calibration": f"{name}.calibration.json"})

    (out / f"{name}.calibration.json").write_text(json.dumps({
        "calibration_dir": str(calibration), "count": len(cal_files),
        "sampling": sampling, "seed": options.calibration_seed,
        "preprocessing": "decoded and preprocessed exactly as dermedge does",
        "kinds": {k: sum(image_kind(p) == k for p in cal_files) for k in sorted({image_kind(p) for p in cal_files})},
        "files": [p.name for p in cal_files], "evaluation_dir": str(evaluation), "evaluation_count": len(eval_files),
        "disjoint": "checked by content hash",
    }, indent=1) + "\n")

    progress(f"[{name}] op report")
    ops = {p: opreport.analyse(f.read_bytes()) for p, f in files.items()}
    (out / f"{name}.ops.json").write_text(json.dumps(ops, indent=1) + "\n")
    (out / f"{name}.ops.md").write_text(opreport.markdown(name, ops))

    layer_errors = out / f"{name}.int8.layer-errors.csv"
    layer_errors.unlink(missing_ok=True)
    if debug_count > 0:
        progress(f"[{name}] per-layer quantisation error ({debug_count} images)")
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter(True), debug_dataset=lambda: ([x] for x in cal_inputs[:debug_count]))
        debugger.run()
        with open(layer_errors, "w") as f:
            debugger.layer_statistics_dump(f)
        # Its interpreter keeps every intermediate tensor of the graph (the export's memory peak:
        # 21.5 GB for R101x3 at 448 px): release it before the comparison loads more interpreters.
        del debugger
        gc.collect()
    else:
        progress(f"[{name}] per-layer quantisation error skipped (--debug-count 0)")

    progress(f"[{name}] comparing against the SavedModel on {len(eval_files)} evaluation images")
    reference = np.stack([fn(tf.constant([serialized_example(p)]))["embedding"].numpy()[0] for p in eval_files])
    eval_inputs = [model_input(p, pre) for p in eval_files]
    fp32 = run_tflite(files["fp32"], eval_inputs)
    int8 = run_tflite(files["int8"], eval_inputs)
    np.save(out / f"{name}.savedmodel-embeddings.npy", reference.astype(np.float32))
    write_teacher_labels(loaded, reference, eval_files, out / f"{name}.teacher-labels.csv")
    if teacher is not None:
        worst = classifier.check(teacher, loaded, reference)
        progress(f"[{name}] {teacher.name}: the folded teacher matches the SavedModel's to {worst:.2g} in probability")
    report = {
        "name": name, "embedding_dim": dim, "preprocessing": asdict(pre),
        "files": {p: {"path": f.name, "bytes": f.stat().st_size, "sha256": sha256(f)} for p, f in files.items()},
        "evaluation_images": [str(p) for p in eval_files],
        "fp32_tflite_vs_savedmodel_cosine": summary(cosine_rows(fp32, reference)),
        "int8_vs_fp32_cosine": summary(cosine_rows(int8, fp32)),
        "int8_vs_savedmodel_cosine": summary(cosine_rows(int8, reference)),
        "seconds": round(time.time() - started, 1),
    }
    search = options.target_fidelity
    integer_core_dir = None
    if search is not None or options.faithful_recipe is not None:
        squares = sum(n.op in ("Square", "SquaredDifference") for n in serving.graph_def.node)
        if squares:
            progress(f"[{name}] {squares} Square/SquaredDifference ops: building the integer-friendly graph too")
            integer_core = cut(serving, pre.cut_tensor, shape, rewrite_squares=True)
            integer_core_dir = Path(tempfile.mkdtemp(prefix=f"{name}-integer-core-"))
            save_core(integer_core, serving, integer_core_dir)

    def context(**search_fields) -> recipes.Context:
        return recipes.Context(
            core_dir=core_dir, integer_core_dir=integer_core_dir, name=name, version=version, out=out, pre=pre, dim=dim,
            cal_inputs=cal_inputs, plain_int8=files["int8"], fp32_manifest=out / f"{name}.fp32.toml",
            fp32_tflite=files["fp32"], layer_errors=out / f"{name}.int8.layer-errors.csv", debug_count=debug_count,
            progress=progress, **search_fields)

    if options.faithful_recipe is not None:
        faithful = recipes.make_faithful(context(dermedge="", validation=Path(), holdout=None, threads=2,
                                                 latency_budget=1.0, bench_runs=1), options.faithful_recipe)
        report["faithful"] = {"recipe": options.faithful_recipe, "manifest": faithful.name}
    if search is not None:
        validation = search.validation or evaluation
        val_files = list_images(validation, "validation")
        if {sha256(p) for p in cal_files} & {sha256(p) for p in val_files}:
            raise ExportError(f"{validation}: validation images overlap the calibration set; they must be disjoint")
        if search.validation_count and search.validation_count < len(val_files):
            validation = validation_subset(val_files, search.validation_count, options.calibration_seed,
                                           out / "recipes" / f"validation-{search.validation_count}")
        report["recipe_search"] = recipes.search(context(
            dermedge=search.dermedge, validation=validation, holdout=search.holdout, threads=search.threads,
            latency_budget=search.latency_budget, bench_runs=search.bench_runs, only=search.recipes,
            sensitivity=search.sensitivity, qat=search.qat))
    if integer_core_dir is not None:
        shutil.rmtree(integer_core_dir, ignore_errors=True)
    shutil.rmtree(core_dir, ignore_errors=True)
    (out / f"{name}.export-report.json").write_text(json.dumps(report, indent=1) + "\n")
    progress(f"[{name}] fp32 TFLite vs SavedModel cosine min {report['fp32_tflite_vs_savedmodel_cosine']['min']:.6f}; "
             f"int8 vs fp32 cosine median {report['int8_vs_fp32_cosine']['median']:.4f} "
             f"p1 {report['int8_vs_fp32_cosine']['p1']:.4f}")
    return report
