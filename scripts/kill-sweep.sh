#!/usr/bin/env bash
# Kill dermedge at the N-th call of every syscall that makes queue state durable or moves it
# (fsync, fdatasync, rename, unlink, ftruncate), for `queue add`, `sync` and `run`, with strace's
# fault injection; after each kill the queue must open cleanly and every record the killed run
# logged as queued must still be in the queue or at the hub. Then a normal `sync` must drain it.
#
# A SIGKILL keeps the page cache, so this proves start-up, rename/unlink ordering and temp-file
# roll-back, not fsync placement: the power-cut model in crates/queue (crash_tests) proves that.
#
#   scripts/kill-sweep.sh [dermedge binary]        KILL_SWEEP_MAX=N: calls tried per syscall
#                                                  (default 0: every call, until none is left)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$(realpath "${1:-$root/target/debug/dermedge}")"
max="${KILL_SWEEP_MAX:-0}"
syscalls=(fdatasync fsync rename unlink ftruncate)
model="$root/tests/fixtures/df-mini/df-mini.int8.toml"
images="$root/tests/fixtures/device"
command -v strace >/dev/null || { echo "kill-sweep: strace is needed (apt-get install strace)" >&2; exit 2; }
work="$(mktemp -d)"
hub_pid=""
cleanup() { [[ -n "$hub_pid" ]] && kill "$hub_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
export RUST_LOG=info,dermedge_queue=debug

fail() { echo "kill-sweep: FAIL: $*" >&2; exit 1; }

# A base state: a key enrolled at a hub database, and a queue holding two records.
base="$work/base"
mkdir -p "$base"
"$bin" keygen --out "$base/device.key" >/dev/null
"$bin" hub init --key "$base/hub.key" --public "$base/hub.pub" >/dev/null
"$bin" hub enroll --db "$base/hub.sqlite" --device-id kiosk-1 --device-public "$base/device.key.pub" >/dev/null
q=(--queue "$base/queue" --key-file "$base/device.key")
"$bin" queue add --device-id kiosk-1 --model "$model" --threads 1 --hub-public "$base/hub.pub" "${q[@]}" \
  "$images/01-dermoscopy-patch1354a.png" "$images/03-dermoscopy-patch1542b.png" 2>/dev/null

start_hub() { # $1: case dir; sets hub_pid and hub_url
  local fifo="$work/hub.out"
  rm -f "$fifo"; mkfifo "$fifo"
  "$bin" hub serve --db "$1/hub.sqlite" --key "$1/hub.key" --listen 127.0.0.1:0 >"$fifo" 2>/dev/null &
  hub_pid=$!
  local line; read -r line <"$fifo"
  hub_url="${line#listening on }"
  cat "$fifo" >/dev/null &
}
stop_hub() { [[ -n "$hub_pid" ]] && kill "$hub_pid" 2>/dev/null; wait "$hub_pid" 2>/dev/null || true; hub_pid=""; }

# The ids of the records at the hub (its CSV export), one a line.
hub_ids() {
  [[ -f "$1/hub.sqlite" ]] || return 0
  "$bin" hub export --db "$1/hub.sqlite" --csv "$1/export.csv" >/dev/null 2>&1 || true
  tr ',' '\n' <"$1/export.csv" 2>/dev/null | grep -Eo '^"?[0-9a-f]{32}"?$' | tr -d '"' || true
}

# After a kill: the queue opens cleanly; every record logged as queued is in it or at the hub;
# a normal sync then drains the queue to the hub.
check() { # $1: case dir, $2: log of the killed run, $3: what was killed
  local dir="$1" log="$2" what="$3"
  local status
  status="$("$bin" queue status --queue "$dir/queue" --key-file "$dir/device.key" 2>&1)" \
    || fail "$what: the queue does not open cleanly: $status"
  local listed; listed="$("$bin" queue list --queue "$dir/queue" --key-file "$dir/device.key" | cut -f2)"
  local at_hub; at_hub="$(hub_ids "$dir")"
  # Accepted = durable: `queue add` logs a record once it is (per-record durability); `run` logs
  # every append, and under group durability the queue logs how far each commit reached.
  local durable; durable="$(grep -Eo 'records through [0-9]+ are durable' "$log" | grep -Eo "[0-9]+" | sort -n | tail -1 || true)"
  local id
  for id in $(grep -Eo 'queued as record [0-9]+ \([0-9a-f]{32}\)' "$log" | grep -Eo '[0-9a-f]{32}'
              sed -nE 's/.*accepted record ([0-9a-f]{32}) seq ([0-9]+) .*/\2 \1/p' "$log" \
                | awk -v d="${durable:-0}" '$1 <= d { print $2 }'); do
    grep -qx "$id" <<<"$listed"$'\n'"$at_hub" || fail "$what: record $id was logged as queued and is gone"
  done
  start_hub "$dir"
  "$bin" sync --hub "$hub_url" --hub-public "$dir/hub.pub" --queue "$dir/queue" --key-file "$dir/device.key" \
    >/dev/null 2>"$dir/resync.log" \
    || { stop_hub; fail "$what: a normal sync after the kill failed: $(tail -3 "$dir/resync.log")"; }
  stop_hub
  local left; left="$("$bin" queue list --queue "$dir/queue" --key-file "$dir/device.key" | wc -l)"
  [[ "$left" == 0 ]] || fail "$what: $left records left after a normal sync"
}

# Run CMD under strace, killed at the N-th call of $syscall; returns 0 if the kill happened.
killed_at() { # $1: syscall, $2: N, $3: log
  local syscall="$1" n="$2" log="$3"
  set +e
  # (The group's redirection keeps the shell's "Killed" notice out of the output.)
  { strace -f -qq -o /dev/null -e trace="$syscall" -e inject="$syscall:signal=KILL:when=$n" \
      "${CMD[@]}" >"$log.out" 2>"$log"; } 2>/dev/null
  local rc=$?
  set -e
  [[ $rc == 137 ]]
}

sweep() { # $1: name; prepare_<name> sets up the case and sets CMD
  local name="$1" kills=0
  for syscall in "${syscalls[@]}"; do
    local n=1
    while [[ "$max" == 0 || $n -le $max ]]; do
      local dir="$work/$name-$syscall-$n"
      rm -rf "$dir"; cp -a "$base" "$dir"
      "prepare_$name" "$dir"
      if ! killed_at "$syscall" "$n" "$dir/killed.log"; then
        stop_hub
        break # fewer than n calls: this syscall is done
      fi
      stop_hub
      check "$dir" "$dir/killed.log" "$name killed at $syscall #$n"
      kills=$((kills + 1)); n=$((n + 1))
      rm -rf "$dir"
    done
  done
  echo "kill-sweep: $name: $kills kills, each recovered with nothing accepted lost"
}

prepare_add() {
  CMD=("$bin" queue add --device-id kiosk-1 --model "$model" --threads 1 --hub-public "$1/hub.pub" --queue "$1/queue"
       --key-file "$1/device.key" "$images/05-chelsea.png" "$images/06-dermoscopy-patch1840b.png"
       "$images/07-coffee.png")
}

prepare_sync() {
  start_hub "$1"
  CMD=("$bin" sync --hub "$hub_url" --hub-public "$1/hub.pub" --queue "$1/queue" --key-file "$1/device.key")
}

prepare_run() {
  cat >"$1/device.toml" <<EOF
[device]
id = "kiosk-1"
key_file = "device.key"

[model]
manifest = "$model"
threads = 1

[camera]
source = "replay"
path = "$images"
fps = 20
hold_frames = 3

[capture]
trigger = "auto"
stable_frames = 2

[display]
target = "none"

[queue]
dir = "queue"
durability = "group"
group_max_records = 2

[sync]
enabled = true
interval_seconds = 1
local_hub = { db = "hub.sqlite", key = "hub.key", listen = "127.0.0.1:0" }
EOF
  CMD=("$bin" run --config "$1/device.toml")
}

sweep add
sweep sync
sweep run
