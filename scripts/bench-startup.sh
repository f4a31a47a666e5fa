#!/usr/bin/env bash
# Start-up and memory with the XNNPACK weight cache, the targets docs/BENCHMARKS.md judges:
# process start -> first embedding against a warm invoke, and peak RSS against the model file.
# One start writes the cache; then STARTS fresh processes map it, each embedding the first image
# and timing RUNS warm invokes after it. Ratios are per process (same process, same moment), and
# their medians are reported with what is resident at the end, by mapping.
#
#   scripts/bench-startup.sh [model (default df-r101x3)] [precision (default int8)]
#   env: THREADS (2), STARTS (5), RUNS (5)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
model="${1:-df-r101x3}"
precision="${2:-int8}"
threads="${THREADS:-2}"
starts="${STARTS:-5}"
runs="${RUNS:-5}"
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -q -p dermedge-cli
source scripts/litert-env.sh
bin=./target/release/dermedge
"$bin" models build "$model" >&2
manifest=".cache/models/$model/$model.$precision.toml"
images=".cache/models/images/evaluation"
work=".cache/bench/startup-$model-$precision"
rm -rf "$work"
mkdir -p "$work"
cache="$work/xnnpack-cache"

echo "writing the weight cache ..." >&2
"$bin" bench embed --model "$manifest" --images "$images" --threads "$threads" --runs 1 --warmup 0 \
  --weight-cache "$cache" --json "$work/write.json" >&2
for i in $(seq 1 "$starts"); do
  echo "start $i of $starts, cache mapped ..." >&2
  "$bin" bench embed --model "$manifest" --images "$images" --threads "$threads" --runs "$runs" --warmup 0 \
    --weight-cache "$cache" --json "$work/start-$i.json" >&2
done

python3 - "$work" "$model" "$precision" "$threads" "$starts" "$runs" <<'PY'
import json, platform, statistics, subprocess, sys
from pathlib import Path
work, model, precision, threads, starts, runs = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:])
rows = [json.load(open(Path(work) / f"start-{i}.json"))[0] for i in range(1, starts + 1)]
invoke = lambda r: dict(r["stages"])["invoke"][0]
start = [r["start_to_first_embedding_s"] / invoke(r) for r in rows]
rss = [r["peak_rss_bytes"] / r["model_bytes"] for r in rows]
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
name = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
med = statistics.median
print(f"Machine: {name}, {threads} threads; {platform.platform()}. {model} {precision}, "
      f"{rows[0]['model_bytes'] / 1e6:.0f} MB file; {starts} starts with the weight cache mapped, {runs} warm invokes each.")
print()
print("| start | load s | first embed s | start→first s | warm invoke median s | start→first ÷ warm invoke | peak RSS MB | peak RSS ÷ file |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for i, r in enumerate(rows, 1):
    print(f"| {i} | {r['load_s']:.3f} | {r['first_embed_s']:.3f} | {r['start_to_first_embedding_s']:.3f} | {invoke(r):.3f} | "
          f"{start[i - 1]:.2f}× | {r['peak_rss_bytes'] / 1e6:.0f} | {rss[i - 1]:.2f}× |")
print(f"| **median** | {med(r['load_s'] for r in rows):.3f} | {med(r['first_embed_s'] for r in rows):.3f} | "
      f"{med(r['start_to_first_embedding_s'] for r in rows):.3f} | {med(invoke(r) for r in rows):.3f} | "
      f"**{med(start):.2f}×** | {med(r['peak_rss_bytes'] for r in rows) / 1e6:.0f} | **{med(rss):.2f}×** |")
print()
print("Resident at the end of start 1, by mapping: " + "; ".join(
    f"{Path(n).name or n} {b / 1e6:.0f} MB" for n, b in rows[0].get("resident_by_mapping", [])))
PY
