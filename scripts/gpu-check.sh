#!/usr/bin/env bash
# GPU accelerator check, for a machine with a GPU: does LiteRT's GPU accelerator (the WebGPU
# accelerator the ai-edge-litert wheel ships, which runs over Vulkan) register, run the df-mini
# fixture, agree with the CPU, and how fast is it? Without a usable GPU it records the logged
# fallback instead. Writes everything under $OUT (default /tmp/gpu-check).
#
#   scripts/gpu-check.sh        (after cargo build --release -p dermedge-cli and the runtime fetch)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/litert-env.sh "$(uname -m)-unknown-linux-gnu"   # the runtime version from its lock
lib="$(dirname "$DERMEDGE_LITERT_LIB")"
export LD_LIBRARY_PATH="$lib:${LD_LIBRARY_PATH:-}"
# The WebGPU accelerator needs the Vulkan loader; where the machine has the GPU driver but not the
# loader, .cache/vulkan/ may hold Debian's libvulkan.so.1 (apt-get download libvulkan1).
if [[ -e .cache/vulkan/libvulkan.so.1 ]]; then
  export LD_LIBRARY_PATH="$PWD/.cache/vulkan:$LD_LIBRARY_PATH"
fi
bin="${DERMEDGE_BIN:-target/release/dermedge}"
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
model=tests/fixtures/df-mini/df-mini.fp32.toml
{
  nvidia-smi -L
  ls /usr/share/vulkan/icd.d /etc/vulkan/icd.d
  ldconfig -p | grep -iE "libvulkan|libOpenCL|libEGL_nvidia|libGLX_nvidia"
} > "$out/environment.txt" 2>&1
"$bin" doctor > "$out/doctor.txt" 2>&1
for acc in cpu gpu; do
  "$bin" -v embed --model "$model" --accelerator "$acc" --require-accelerator --threads 4 \
    tests/fixtures/images --out "$out/$acc.jsonl" > "$out/embed-$acc.txt" 2>&1
  echo "exit $?" >> "$out/embed-$acc.txt"
done
# Without --require-accelerator an unusable GPU falls back to the CPU, with a warning.
"$bin" embed --model "$model" --accelerator gpu --threads 4 tests/fixtures/images \
  --out "$out/gpu-or-fallback.jsonl" > "$out/embed-gpu-or-fallback.txt" 2>&1
echo "exit $?" >> "$out/embed-gpu-or-fallback.txt"
for acc in cpu gpu; do
  "$bin" bench embed --model "$model" --accelerator "$acc" --threads 4 --runs 10 > "$out/bench-$acc.txt" 2>&1
done
python3 - "$out" <<'PY' > "$out/comparison.txt" 2>&1
import json, math, sys, os
out = sys.argv[1]
def rows(name):
    p = os.path.join(out, name)
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
cpu, gpu = rows("cpu.jsonl"), rows("gpu.jsonl")
if not gpu:
    print("no GPU embeddings (see embed-gpu.txt)")
for a, b in zip(cpu, gpu):
    x, y = a["embedding"], b["embedding"]
    dot = sum(p * q for p, q in zip(x, y))
    cos = dot / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))
    print(f"{a['file']}: gpu vs cpu cosine {cos:.6f}, max abs diff {max(abs(p - q) for p, q in zip(x, y)):.3g}")
PY
cat "$out"/*.txt | grep -v "^INFO: \[" | tail -60
