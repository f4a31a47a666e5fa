#!/usr/bin/env bash
# Cross-build dermedge for aarch64 and run its tests under qemu-user-static: the library crates'
# unit tests, then `dermedge embed` of fixture images by the aarch64 binary against the x86_64
# binary's output, fp32 and int8 (tests/cross_arch.rs holds the tolerances).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cross/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
source cross/env.sh
target=aarch64-unknown-linux-gnu
# Unit tests of every library crate (the engine's include the runtime lock, the flatbuffer check
# and the C-API layouts); the model runs below cover inference itself.
# Under emulation the queue's crash model runs a bounded slice (the x86_64 run does 1500 cases) and
# its two cut-at-every-byte scans are left to x86_64: they test the format, not the target.
DERMEDGE_CRASH_CASES=200 cargo test --locked --target "$target" -p dermedge-core -p dermedge-camera \
  -p dermedge-head -p dermedge-fidelity -p dermedge-record -p dermedge-queue -- --skip at_every_byte
cargo test --locked --target "$target" -p dermedge-engine --lib -- --skip bit_flips --skip refuses_every_truncation
# The firmware build: the device application without the hub's server, SQLite or model tooling.
cargo build --release --locked --target "$target" -p dermedge-cli --no-default-features --features firmware
scripts/check-firmware-deps.sh --target "$target"
# The workspace's feature set, as scripts/test.sh built it: `-p` alone would unify features
# differently and compile the CLI and its crates again.
cargo build --locked --workspace
out="$(mktemp -d)"
aarch64_litert="$(source scripts/litert-env.sh "$target"; echo "$DERMEDGE_LITERT_LIB")"
# Every fixture image, both precisions, on the cores of both target boards: Cortex-A76 (Pi 5) and
# Neoverse-N1 (the closest QEMU model to the Jetson Orin's Cortex-A78AE: Armv8.2-A, dot product).
images=(tests/fixtures/images/*)
for p in fp32 int8; do
  ./target/debug/dermedge embed "${images[@]}" --model "tests/fixtures/df-mini/df-mini.$p.toml" --threads 2 --out "$out/x86_64.$p.npy"
  for cpu in cortex-a76 neoverse-n1; do
    DERMEDGE_LITERT_LIB="$aarch64_litert" qemu-aarch64-static -cpu "$cpu" -L /usr/aarch64-linux-gnu "target/$target/release/dermedge" embed "${images[@]}" \
      --model "tests/fixtures/df-mini/df-mini.$p.toml" --threads 2 --out "$out/aarch64-$cpu.$p.npy"
  done
done
# XNNPACK's fp16 arithmetic on the fp32 model: native on the Pi 5's Cortex-A76 (FEAT_FP16); the
# Pi 4's Cortex-A72 lacks it, so there the engine must fall back to fp32 and say so. QEMU emulates
# fp16 arithmetic slowly (20 s an image here), so one image.
for cpu in cortex-a76 cortex-a72; do
  DERMEDGE_LITERT_LIB="$aarch64_litert" qemu-aarch64-static -cpu "$cpu" -L /usr/aarch64-linux-gnu "target/$target/release/dermedge" embed "${images[0]}" \
    --model tests/fixtures/df-mini/df-mini.fp32.toml --threads 2 --cpu-arithmetic fp16 --out "$out/aarch64-$cpu.fp32-fp16-arithmetic.npy"
done
# ... and with `--require-accelerator` (fallback = fail) the A72 must refuse, naming the option.
if DERMEDGE_LITERT_LIB="$aarch64_litert" qemu-aarch64-static -cpu cortex-a72 -L /usr/aarch64-linux-gnu "target/$target/release/dermedge" embed "${images[0]}" \
    --model tests/fixtures/df-mini/df-mini.fp32.toml --threads 2 --cpu-arithmetic fp16 --require-accelerator 2>"$out/a72-fail.log"; then
  echo "fp16 arithmetic with fallback = fail ran on a Cortex-A72" >&2; exit 1
fi
grep -q cpu_arithmetic "$out/a72-fail.log" || { cat "$out/a72-fail.log" >&2; exit 1; }
DERMEDGE_CROSS_DIR="$out" cargo test --locked --workspace --test cross_arch -- --ignored --nocapture
rm -rf "$out"
