#!/usr/bin/env bash
# Set up and run every check: formatting, clippy (warnings are errors), the model tooling's tests,
# the CI models built by the exporter (df-mini, lesion-x448), the whole Rust test suite, the hub on
# PostgreSQL, the kill sweep, the classic backend, and the aarch64 cross build tested under QEMU
# (cross/test-aarch64.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# Each stage's wall time, printed when the run ends (pass or fail): where a slow run's minutes went.
stage_times=()
stage_began=$SECONDS
stage() { stage_times+=("$(printf '%6d s  %s' $((SECONDS - stage_began)) "$1")"); stage_began=$SECONDS; }
print_stages() { printf 'stage times:\n' >&2; printf '  %s\n' "${stage_times[@]}" >&2; printf '%6d s  in all\n' "$SECONDS" >&2; }
trap 'status=$?; print_stages; exit $status' EXIT
scripts/setup.sh
stage "setup (toolchains, runtimes, venv)"
export PATH="$HOME/.cargo/bin:$PATH"
# Incremental state is for editing sessions; in a one-shot run it only doubles what lands on disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
report_disk() { df -Ph "$root" | awk -v stage="$1" 'NR == 2 { print "disk " stage ": " $4 " free of " $2 }' >&2; }
report_disk "at start"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
stage "fmt and clippy (workspace)"
# The firmware build (device app only): lint-clean and free of server, SQLite and tooling crates.
cargo clippy -p dermedge-cli --locked --no-default-features --features firmware -- -D warnings
scripts/check-firmware-deps.sh
python3 scripts/dependency-graph.py --check
stage "firmware clippy and dependency checks"
cargo build --workspace --locked
stage "workspace build"
report_disk "after the build"
ci_models=(df-mini lesion-x448)
for model in "${ci_models[@]}"; do
  ./target/debug/dermedge models build "$model"
  stage "models build $model"
done
scripts/python-env.sh -m unittest discover -s models/export/tests
# The AI Edge Quantizer tools (per-layer sensitivity, bias correction, GPTQ, MSE ranges, cross-layer
# equalisation on lesion-x448, mixed precision) in their own venv.
DERMEDGE_REQUIRE_QUANTIZER=1 DERMEDGE_REQUIRE_MODELS=lesion-x448 \
  scripts/python-env.sh --venv quantizer -m unittest models/export/tests/test_sensitivity.py
stage "model tooling tests (both venvs)"
# The whole suite with the hub's real peers: a PostgreSQL server (a throwaway cluster; the store
# suite runs on both backends) and headless Chromium driving the web page.
source scripts/postgres-cluster.sh
trap 'status=$?; pg_cluster_stop $status; print_stages; exit $status' EXIT
pg_cluster_start fast
export DERMEDGE_TEST_POSTGRES_URL="$pg_url" DERMEDGE_TEST_POSTGRES_CA="$pg_ca"
source scripts/browser-env.sh
log="$(mktemp)"
DERMEDGE_REQUIRE_MODELS="$(IFS=,; echo "${ci_models[*]}")" cargo test --workspace --locked 2>&1 | tee "$log"
grep -q "$BROWSER_TEST_PASSED" "$log" || { echo "error: the hub's browser test did not run" >&2; exit 1; }
if grep -q "pass without running: DERMEDGE_TEST_POSTGRES_\(URL\|CA\) is not set" "$log"; then
  echo "error: the hub's PostgreSQL tests did not run" >&2
  exit 1
fi
rm -f "$log"
stage "workspace tests (PostgreSQL, Chromium)"
report_disk "after the workspace tests"
pg_cluster_stop
unset DERMEDGE_TEST_POSTGRES_URL DERMEDGE_TEST_POSTGRES_CA
# Two hub processes on one PostgreSQL database, a device syncing through both, every record once.
DERMEDGE_BIN=target/debug/dermedge scripts/test-postgres.sh --e2e
stage "two hubs on one PostgreSQL"
# SIGKILL at every fsync/fdatasync/rename/unlink/ftruncate of `queue add`, `sync` and `run`.
scripts/kill-sweep.sh
stage "kill sweep"
# The classic TensorFlow Lite backend (tflitec) and the Coral Edge TPU path.
DERMEDGE_REQUIRE_MODELS=lesion-x448 scripts/test-classic.sh
stage "classic backend"
# aarch64: the cross build's tests under qemu-user-static and its embeddings against x86_64's.
cross/test-aarch64.sh
stage "aarch64 cross build under QEMU"
report_disk "at the end"
