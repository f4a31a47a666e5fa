#!/usr/bin/env bash
# Install what cross-building for aarch64 and running its tests under QEMU needs, and fetch the
# pinned aarch64 LiteRT runtime. Idempotent.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
export PATH="$HOME/.cargo/bin:$PATH"
need=()
for pkg in gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need[@]}"
fi
rustup target add aarch64-unknown-linux-gnu >/dev/null
python3 "$root/scripts/fetch-litert.py" --target aarch64-unknown-linux-gnu
