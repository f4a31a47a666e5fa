#!/usr/bin/env bash
# Install what building and running dermedge needs on a Debian machine, then fetch the pinned
# LiteRT runtime. Idempotent; safe to run on every build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
command -v cargo >/dev/null || [[ -x "$HOME/.cargo/bin/cargo" ]] || need_apt+=(rustup)
if ((${#need_apt[@]})); then
  echo "installing Debian packages: ${need_apt[*]}" >&2
  sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null; then
  export PATH="$HOME/.cargo/bin:$PATH"
  command -v cargo >/dev/null || rustup default stable
fi
rustup component add clippy rustfmt >/dev/null 2>&1 || true

python3 "$root/scripts/fetch-litert.py"
