#!/usr/bin/env bash
# The hub on PostgreSQL, against a real server: starts a throwaway PostgreSQL cluster (Debian's
# `postgresql`, installed if missing) in a temporary directory, runs the hub crate's tests with
# DERMEDGE_TEST_POSTGRES_URL set (the store tests on both backends, two hubs on one database),
# then end to end with the real binary: two `dermedge hub serve --db postgres://…` processes on
# one database, a device that enrolls and syncs part of its queue through each, and an export
# that must hold every record. The cluster is stopped and deleted on exit.
#   scripts/test-postgres.sh          # the hub crate's tests on PostgreSQL, then end to end
#   DERMEDGE_BIN=target/debug/dermedge scripts/test-postgres.sh --e2e   # end to end only
# As root (CI) the cluster runs as the `postgres` user; as anyone else, as that user. Run after
# scripts/setup.sh (scripts/test.sh does): the binary's default build and the LiteRT runtime that
# `dermedge queue add` uses are what it installs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"

log() { echo "test-postgres: $*" >&2; }

source scripts/postgres-cluster.sh
hubs_pids=()
cleanup() {
  local status=$?
  for pid in "${hubs_pids[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  pg_cluster_stop "$status"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Throwaway: no waiting for the disk.
pg_cluster_start fast
psql_admin -d postgres -c "CREATE DATABASE dermedge_e2e OWNER dermedge"
export DERMEDGE_TEST_POSTGRES_URL="$pg_url" DERMEDGE_TEST_POSTGRES_CA="$pg_ca"
work="$pg_work" port="$pg_port" password="$pg_password"

# --- the hub crate's tests, on both backends ----------------------------------------------------
# (`--e2e`: already run by the caller, scripts/test.sh, inside its workspace test run.)
if [[ "${1:-}" != --e2e ]]; then
  cargo test --locked -p dermedge-hub
fi

# --- end to end: two hub processes on one database, a device syncing through both -------------
if [[ -n "${DERMEDGE_BIN:-}" ]]; then
  bin="$DERMEDGE_BIN"
else
  cargo build --locked -p dermedge-cli
  bin="$root/target/debug/dermedge"
fi
e2e="$work/e2e"
mkdir -p "$e2e"
url="postgres://dermedge:$password@127.0.0.1:$port/dermedge_e2e"
shown="postgres://dermedge:***@127.0.0.1:$port/dermedge_e2e"
model="$root/tests/fixtures/df-mini/df-mini.int8.toml"
images="$root/tests/fixtures/images"
python3 "$root/scripts/fetch-litert.py" >/dev/null

devices=(kiosk-1 kiosk-2)
"$bin" hub init --key "$e2e/hub.key" --public "$e2e/hub.pub" >/dev/null 2>&1
for device in "${devices[@]}"; do
  "$bin" keygen --out "$e2e/$device.key" >/dev/null
  "$bin" hub enroll --db "$url" --device-id "$device" --device-public "$e2e/$device.key.pub" \
    | tee "$e2e/enroll.out"
  grep -qF "enrolled $device in $shown" "$e2e/enroll.out"
done

# A hub on any free port, in the background.
start_hub() {
  "$bin" -v hub serve --db "$url" --key "$e2e/hub.key" --listen 127.0.0.1:0 \
    >"$e2e/$1.out" 2>"$e2e/$1.err" &
  hubs_pids+=("$!")
}
# The address hub $1 (process $2) listens on, once it says.
hub_address() {
  for _ in $(seq 1 100); do
    if grep -q '^listening on ' "$e2e/$1.out"; then
      sed -n 's/^listening on //p' "$e2e/$1.out"
      return
    fi
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  log "error: hub $1 did not start:"
  cat "$e2e/$1.err" >&2
  return 1
}
start_hub a
start_hub b
hub_a="$(hub_address a "${hubs_pids[0]}")"
hub_b="$(hub_address b "${hubs_pids[1]}")"
log "hubs at $hub_a and $hub_b"

queue_args() { queue_args=(--queue "$e2e/$1.queue" --key-file "$e2e/$1.key"); }
# Queue the fixture images (8 records) through the device pipeline.
add() {
  queue_args "$1"
  "$bin" queue add "${queue_args[@]}" --device-id "$1" --hub-public "$e2e/hub.pub" \
    --model "$model" "$images" >/dev/null
}
sync_to() {
  queue_args "$1"
  "$bin" sync "${queue_args[@]}" --hub "$2" --hub-public "$e2e/hub.pub" --batch 3 --max-retries 5
}
# Both devices at once, each through another hub; then each through the other hub.
for device in "${devices[@]}"; do add "$device"; add "$device"; done
sync_to kiosk-1 "$hub_a" & first=$!
sync_to kiosk-2 "$hub_b"
wait "$first"
for device in "${devices[@]}"; do add "$device"; done
sync_to kiosk-1 "$hub_b" & first=$!
sync_to kiosk-2 "$hub_a"
wait "$first"

"$bin" hub export --db "$url" --csv "$e2e/export.csv" --npy "$e2e/export.npy"
"$bin" hub status --db "$url"
for device in "${devices[@]}"; do
  queue_args "$device"
  stats="$("$bin" queue status "${queue_args[@]}" --json | python3 -c 'import json, sys; s = json.load(sys.stdin)["stats"]; print(s["last_seq"], s["acked_seq"], s["pending_records"])')"
  read -r last_seq acked_seq pending <<<"$stats"
  log "$device queued $last_seq records; acknowledged through $acked_seq, $pending waiting"
  [[ "$pending" == 0 && "$acked_seq" == "$last_seq" && "$last_seq" -gt 0 ]]
  python3 - "$e2e/export.csv" "$device" "$last_seq" <<'EOF'
import csv, sys
path, device, last_seq = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(path, newline="") as f:
    rows = [r for r in csv.DictReader(f) if r["device_id"] == device]
seqs = sorted(int(r["seq"]) for r in rows)
ids = {r["record_id"] for r in rows}
assert seqs == list(range(1, last_seq + 1)), f"{device}: export holds {seqs}, expected 1..{last_seq}"
assert len(ids) == last_seq, f"{device}: {len(ids)} distinct record ids, {last_seq} queued"
print(f"test-postgres: {device}: the export holds each of its {last_seq} records once", file=sys.stderr)
EOF
done

for name in a b; do
  if grep -qF "$password" "$e2e/$name.out" "$e2e/$name.err"; then
    log "error: hub $name printed the database password"
    exit 1
  fi
done
grep -qF "$shown" "$e2e/a.err" || { log "error: hub a did not name its database"; cat "$e2e/a.err" >&2; exit 1; }
log "ok: two hubs on one PostgreSQL database exported every record once"
