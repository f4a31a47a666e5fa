#!/usr/bin/env bash
# Start-up and memory with the XNNPACK weight cache, the targets docs/BENCHMARKS.md judges:
# process start -> first embedding against a warm invoke, and peak RSS against the model file.
# One start writes the cache; then STARTS fresh processes map it, each embedding the first image
# and timing RUNS warm invokes after it. Ratios are per process (same process, same moment), and
# their medians are reported with what is resident at the end, by mapping.
#
#   scripts/bench-startup.sh [model (default df-r101x3)] [precision (default int8)]
#   env: THREADS (2), STARTS (5), RUNS (5); BEFORE=<another dermedge binary> alternates its starts
#   with this build's, for a before/after measured in one run.
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
source scripts/litert-env.sh ""   # "": the host (not this script's own arguments)
bin="${CARGO_TARGET_DIR:-target}/release/dermedge"
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
one_start() {  # binary, json
  "$1" bench embed --model "$manifest" --images "$images" --threads "$threads" --runs "$runs" --warmup 0 \
    --weight-cache "$cache" --json "$2" >&2
}
for i in $(seq 1 "$starts"); do
  echo "start $i of $starts, cache mapped ..." >&2
  if [[ -n "${BEFORE:-}" ]]; then
    one_start "$BEFORE" "$work/before-$i.json"
  fi
  one_start "$bin" "$work/start-$i.json"
done

python3 - "$work" "$model" "$precision" "$threads" "$starts" "$runs" "${BEFORE:-}" <<'PY'
import json, platform, statistics, subprocess, sys
from pathlib import Path
work, model, precision = sys.argv[1], sys.argv[2], sys.argv[3]
threads, starts, runs = map(int, sys.argv[4:7])
before = sys.argv[7]
med = statistics.median
invoke = lambda r: dict(r["stages"])["invoke"][0]
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
name = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")


def table(prefix, label):
    rows = [json.load(open(Path(work) / f"{prefix}-{i}.json"))[0] for i in range(1, starts + 1)]
    start = [r["start_to_first_embedding_s"] / invoke(r) for r in rows]
    rss = [r["peak_rss_bytes"] / r["model_bytes"] for r in rows]
    print(f"**{label}**")
    print()
    print("| start | load s | first embed s | start→first s | warm invoke median s | start→first ÷ warm invoke "
          "| peak RSS MB | peak RSS ÷ file |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows, 1):
        print(f"| {i} | {r['load_s']:.3f} | {r['first_embed_s']:.3f} | {r['start_to_first_embedding_s']:.3f} | "
              f"{invoke(r):.3f} | {start[i - 1]:.2f}× | {r['peak_rss_bytes'] / 1e6:.0f} | {rss[i - 1]:.2f}× |")
    print(f"| **median** | {med(r['load_s'] for r in rows):.3f} | {med(r['first_embed_s'] for r in rows):.3f} | "
          f"{med(r['start_to_first_embedding_s'] for r in rows):.3f} | {med(invoke(r) for r in rows):.3f} | "
          f"**{med(start):.2f}×** | {med(r['peak_rss_bytes'] for r in rows) / 1e6:.0f} | **{med(rss):.2f}×** |")
    print()
    by = rows[0].get("resident_by_mapping", [])
    if by:
        print("Resident at the end of start 1, by mapping: " + "; ".join(
            f"{Path(n).name or n} {b / 1e6:.0f} MB" for n, b in by) + ".")
        print()
    return rows


rows = None
print(f"Machine: {name}, {threads} threads; {platform.platform()}. {model} {precision}; "
      f"{starts} starts with the weight cache mapped, {runs} warm invokes each"
      + (", alternating with the binary before the change" if before else "") + ".")
print()
if before:
    table("before", f"before ({before})")
rows = table("start", "this build")
print(f"Model file: {rows[0]['model_bytes'] / 1e6:.0f} MB.")
PY
