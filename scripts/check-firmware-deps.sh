#!/usr/bin/env bash
# The firmware build links no server, no SQLite and no model tooling: fail if the dependency tree
# of `dermedge --no-default-features --features firmware` holds any of them.
#   scripts/check-firmware-deps.sh [--target TRIPLE]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"
target_args=()
if [[ "${1:-}" == --target ]]; then target_args=(--target "$2"); fi
tree="$(cargo tree --locked -p dermedge-cli --no-default-features --features firmware \
  -e normal,build --prefix none "${target_args[@]}")"
forbidden='^(dermedge-hub|dermedge-fidelity|rusqlite|libsqlite3-sys|hyper|hyper-util|tokio|axum|tiny_http) '
if grep -E "$forbidden" <<<"$tree" | sort -u | grep .; then
  echo "error: the firmware build depends on the crates above" >&2
  exit 1
fi
echo "firmware build: no server, SQLite or model-tooling crates ($(sort -u <<<"$tree" | wc -l) crates)"
