#!/usr/bin/env bash
# The main job on this machine's default (no camera): set up, build, and embed the bundled sample
# images (tests/fixtures/images) with the fp32 and int8 df-mini models, writing CBOR to out/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p dermedge-cli
mkdir -p out
for precision in fp32 int8; do
  ./target/release/dermedge embed tests/fixtures/images \
    --model "tests/fixtures/df-mini/df-mini.$precision.toml" --out "out/embeddings.df-mini.$precision.cbor"
done
./target/release/dermedge embed tests/fixtures/images --model tests/fixtures/df-mini/df-mini.fp32.toml
