#!/usr/bin/env bash
# Benchmarks: builds the release binary and prints Markdown tables for docs/BENCHMARKS.md.
#   scripts/bench.sh [queue|sync|hub|all]      (hub: SQLite and PostgreSQL side by side)
# Results depend on the machine and its storage: run it on the device (queue numbers measure the
# disk the queue lives on; pass DERMEDGE_BENCH_DIR to point at the SD card).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
what="${1:-all}"
cargo build --release --locked -q -p dermedge-cli
source scripts/litert-env.sh ""   # "": the host (not this script's own arguments)
bin=target/release/dermedge
dir="${DERMEDGE_BENCH_DIR:-.cache/bench}"
echo "machine: $(uname -m), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), storage of $dir: $(df -T "$(dirname "$dir")" | awk 'NR==2{print $2}')"
echo
if [[ "$what" == queue || "$what" == all ]]; then
  "$bin" bench queue --dir "$dir"
  echo
fi
if [[ "$what" == sync || "$what" == all ]]; then
  "$bin" bench sync --dir "$dir"
  echo
fi
if [[ "$what" == hub || "$what" == all ]]; then
  # The hub under 1-200 concurrent devices with stalled, vanishing and slow-drip clients, on
  # SQLite and on a PostgreSQL server (a throwaway local cluster with the server's default
  # durability: fsync and synchronous commit on).
  source scripts/postgres-cluster.sh
  trap 'pg_cluster_stop $?' EXIT
  pg_cluster_start durable
  RUST_LOG=error "$bin" bench hub --dir "$dir" --postgres "$pg_url"
  echo
fi
