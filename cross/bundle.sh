#!/usr/bin/env bash
# Build a deployable bundle: dermedge, its LiteRT runtime (found by the binary relative to itself:
# <bundle>/bin/dermedge -> <bundle>/lib/dermedge/libLiteRt.so), firmware-config, the model registry,
# a systemd unit and an install script.
#   cross/bundle.sh [--target aarch64-unknown-linux-gnu|x86_64-unknown-linux-gnu] [--device NAME]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target="$(rustc -vV | sed -n 's/^host: //p')"
device=generic
while (($#)); do
  case "$1" in
    --target) target="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    *) echo "usage: $0 [--target TRIPLE] [--device NAME]" >&2; exit 2 ;;
  esac
done
export PATH="$HOME/.cargo/bin:$PATH"
if [[ "$target" == aarch64-unknown-linux-gnu ]]; then
  cross/setup.sh
  source cross/env.sh
else
  scripts/setup.sh
fi
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
litert="$(sed -n 's/^version = "\(.*\)"/\1/p' scripts/litert-runtime.lock | head -1)"
python3 scripts/fetch-litert.py --target "$target"
# The firmware build (no hub server, no SQLite, no model tooling); DERMEDGE_FEATURES adds e.g.
# `classic` for a Coral board.
cargo build --release --locked --target "$target" -p dermedge-cli --no-default-features \
  --features "firmware${DERMEDGE_FEATURES:+,$DERMEDGE_FEATURES}"
name="dermedge-$version-$device-$target"
stage="$(mktemp -d)/$name"
mkdir -p "$stage/bin" "$stage/lib/dermedge" "$stage/share/dermedge/models"
cp "target/$target/release/dermedge" "$stage/bin/"
cp ".cache/litert/$litert/$target/"*.so ".cache/litert/$litert/$target/VERSION" "$stage/lib/dermedge/"
cp -r firmware-config "$stage/share/dermedge/"
if [[ -f "firmware-config/$device.toml" ]]; then
  # The systemd unit runs firmware-config/device.toml: this bundle's device.
  ln -s "$device.toml" "$stage/share/dermedge/firmware-config/device.toml"
fi
# Models are deployed next to the bundle (models/README.md): the bundle carries no test fixtures.
cp models/models.toml models/README.md "$stage/share/dermedge/models/"
cp cross/dermedge.service "$stage/share/dermedge/"
cp cross/install.sh "$stage/"
mkdir -p dist
tar -C "$(dirname "$stage")" -czf "dist/$name.tar.gz" "$name"
rm -rf "$(dirname "$stage")"
echo "dist/$name.tar.gz"
