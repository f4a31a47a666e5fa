#!/usr/bin/env bash
# Set up and run every check: formatting, clippy (warnings are errors), the model tooling's tests,
# the CI models built by the exporter (df-mini, lesion-x448), the whole Rust test suite, the hub on
# PostgreSQL, the kill sweep, the classic backend, and the aarch64 cross build tested under QEMU
# (cross/test-aarch64.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The firmware build (device app only): lint-clean and free of server, SQLite and tooling crates.
cargo clippy -p dermedge-cli --locked --no-default-features --features firmware -- -D warnings
scripts/check-firmware-deps.sh
python3 scripts/dependency-graph.py --check
cargo build --workspace --locked
ci_models=(df-mini lesion-x448)
for model in "${ci_models[@]}"; do
  ./target/debug/dermedge models build "$model"
done
scripts/python-env.sh -m unittest discover -s models/export/tests
DERMEDGE_REQUIRE_MODELS="$(IFS=,; echo "${ci_models[*]}")" cargo test --workspace --locked
# The hub on a real PostgreSQL server (a throwaway cluster): the store suite on both backends,
# two hubs on one database, and a device syncing through both.
scripts/test-postgres.sh
# SIGKILL at every fsync/fdatasync/rename/unlink/ftruncate of `queue add`, `sync` and `run`.
scripts/kill-sweep.sh
# The classic TensorFlow Lite backend (tflitec) and the Coral Edge TPU path.
DERMEDGE_REQUIRE_MODELS=lesion-x448 scripts/test-classic.sh
# aarch64: the cross build's tests under qemu-user-static and its embeddings against x86_64's.
cross/test-aarch64.sh
