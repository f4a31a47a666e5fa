#!/usr/bin/env bash
# Side by side, one run, same machine, same thread count: dermedge (its own fp32 and int8 exports)
# against what a user would run instead -- a plain Python ai-edge-litert pipeline (PIL/numpy) on
# the same .tflite files, and TensorFlow's SavedModel serving_default with PNG bytes in a
# tf.train.Example. Prints a Markdown table for docs/BENCHMARKS.md.
#
#   scripts/bench-side-by-side.sh [model (default df-r101x3)]     env: THREADS (2), RUNS (5)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
model="${1:-df-r101x3}"
threads="${THREADS:-2}"
runs="${RUNS:-5}"
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -q -p dermedge-cli
source scripts/litert-env.sh ""   # "": the host (not this script's own arguments)
bin=./target/release/dermedge
"$bin" models build "$model" >&2
dir=".cache/models/$model"
images=".cache/models/images/evaluation"
work=".cache/bench/side-by-side-$model"
mkdir -p "$work"
py() { scripts/python-env.sh -m dermedge_export baseline "$@" 2>/dev/null | tail -1; }

# This CPU's peak fp32 and int8 multiply-accumulate rate on $threads cores (scripts/roofline.c).
cc -O2 -march=native -pthread scripts/roofline.c -o "$work/roofline"
"$work/roofline" "$threads" > "$work/roofline.json"

for p in fp32 int8; do
  echo "dermedge $p ..." >&2
  "$bin" bench embed --model "$dir/$model.$p.toml" --images "$images" --threads "$threads" \
    --runs "$runs" --warmup 1 --json "$work/dermedge-$p.json" >&2
  echo "python litert $p ..." >&2
  py litert "$dir/$model.$p.tflite" --images "$images" --threads "$threads" --runs "$runs" > "$work/litert-$p.json"
done
# Start-up with LiteRT's XNNPACK weight cache: the first start writes it, the second maps it.
rm -f "$work/int8.xnnpack-cache" "$work/int8.xnnpack-cache.verified"
for pass in write map; do
  echo "dermedge int8, weight cache ($pass) ..." >&2
  "$bin" bench embed --model "$dir/$model.int8.toml" --images "$images" --threads "$threads" \
    --runs 1 --warmup 0 --weight-cache "$work/int8.xnnpack-cache" --json "$work/dermedge-int8-cache-$pass.json" >&2
done
echo "SavedModel ..." >&2
py savedmodel "$dir/savedmodel" --images "$images" --threads "$threads" --runs "$runs" > "$work/savedmodel.json"
py macs "$dir/$model.fp32.tflite" > "$work/macs.json"

python3 - "$work" "$model" "$threads" "$runs" <<'PY'
import json, os, platform, subprocess, sys
work, model, threads, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
load = lambda name: json.load(open(os.path.join(work, name)))
macs = load("macs.json")["macs"]
roof = load("roofline.json")
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
name = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
flags = next((l.split(":", 1)[1].split() for l in cpu.splitlines() if l.startswith("Flags")), [])
isa = ", ".join(f for f in ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni"] if f in flags)
rows = []
for p in ["fp32", "int8"]:
    d = load(f"dermedge-{p}.json")[0]
    st = dict((n, v) for n, v in d["stages"])
    e2e = st["decode"][0] + st["preprocess"][0] + st["invoke"][0] + st["read"][0]
    rows.append((f"dermedge {p}", e2e, st["invoke"][0], d["peak_rss_bytes"], d["model_bytes"], d["start_to_first_embedding_s"]))
for p in ["fp32", "int8"]:
    d = load(f"litert-{p}.json")
    rows.append((f"Python ai-edge-litert {p} (PIL/numpy)", d["per_image_s"]["median"], None, d["peak_rss_bytes"], None, None))
d = load("savedmodel.json")
rows.append(("TensorFlow SavedModel (tf.train.Example)", d["per_image_s"]["median"], None, d["peak_rss_bytes"], None, None))
ours = {"fp32": rows[0][1], "int8": rows[1][1]}
print(f"Machine: {name}, {os.cpu_count()} vCPU ({isa}); {platform.platform()}. Model {model}: "
      f"{macs / 1e9:.1f} GMAC per image. {threads} threads, {runs} timed runs after 1 warm-up, medians.")
print(f"Roofline on {threads} threads (scripts/roofline.c, best of 3): fp32 {roof['fp32_gmacs']:.0f} GMAC/s "
      f"({roof['fp32_isa']}), int8 {roof['int8_gmacs']:.0f} GMAC/s ({roof['int8_isa']}).")
print()
print("| pipeline | s per image (end to end) | invoke s | GMAC/s | % of roofline | peak RSS MB | dermedge int8 speed-up | dermedge fp32 speed-up |")
print("|---|---|---|---|---|---|---|---|")
for label, e2e, invoke, rss, size, _ in rows:
    gmacs = macs / 1e9 / (invoke or e2e)
    peak = roof["int8_gmacs"] if "int8" in label else roof["fp32_gmacs"]
    print(f"| {label} | {e2e:.3f} | {'' if invoke is None else f'{invoke:.3f}'} | {gmacs:.1f} | "
          f"{100 * gmacs / peak:.0f} % {'int8' if 'int8' in label else 'fp32'} | {rss / 1e6:.0f} | "
          f"{e2e / ours['int8']:.2f}× | {e2e / ours['fp32']:.2f}× |")
print()
d8, d32 = load("dermedge-int8.json")[0], load("dermedge-fp32.json")[0]
print(f"dermedge int8 vs fp32 invoke: {dict(d32['stages'])['invoke'][0] / dict(d8['stages'])['invoke'][0]:.2f}× faster; "
      f"int8 peak RSS ÷ file {d8['peak_rss_bytes'] / d8['model_bytes']:.2f}; "
      f"process start to first embedding ÷ warm invoke: int8 {d8['start_to_first_embedding_s'] / dict(d8['stages'])['invoke'][0]:.2f}, "
      f"fp32 {d32['start_to_first_embedding_s'] / dict(d32['stages'])['invoke'][0]:.2f}; "
      f"pre+post ÷ invoke (int8): {(dict(d8['stages'])['preprocess'][0] + dict(d8['stages'])['read'][0]) / dict(d8['stages'])['invoke'][0] * 100:.1f} %")
cached = load("dermedge-int8-cache-map.json")[0]
print(f"With the XNNPACK weight cache (second start, cache mapped): int8 load {cached['load_s']:.2f} s, "
      f"process start to first embedding {cached['start_to_first_embedding_s']:.2f} s = "
      f"{cached['start_to_first_embedding_s'] / dict(d8['stages'])['invoke'][0]:.2f}× the warm invoke "
      f"(first start, writing the cache: load {load('dermedge-int8-cache-write.json')[0]['load_s']:.2f} s).")
PY
