#!/usr/bin/env bash
# The main job on this machine's default (no camera): set up, build, and run the device
# application (`dermedge run --config firmware-config/x86-dev.toml`) on the bundled capture
# session (tests/fixtures/device): quality gate, df-mini int8 embeddings, an image-kind head,
# screens as PNG, the encrypted queue, and sync to a hub running in-process. Outputs in out/x86-dev/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p dermedge-cli
source scripts/litert-env.sh ""   # "": the host (not this script's own arguments)
bin=./target/release/dermedge
out=out/x86-dev
mkdir -p "$out/heads"

# The head the config runs: dermoscopy patch vs photo, trained on the bundled images.
"$bin" embed tests/fixtures/images --model tests/fixtures/df-mini/df-mini.int8.toml \
  --out "$out/heads/training.npy"
{
  echo "file,label"
  for f in tests/fixtures/images/*; do
    name="$(basename "$f")"
    case "$name" in dermoscopy*) echo "$name,dermoscopy" ;; *) echo "$name,photo" ;; esac
  done
} > "$out/heads/labels.csv"
"$bin" head train --embeddings "$out/heads/training.npy" --labels "$out/heads/labels.csv" \
  --out "$out/heads/image-kind.json"

"$bin" config check firmware-config/x86-dev.toml
rm -rf "$out/screens"
"$bin" run --config firmware-config/x86-dev.toml
"$bin" hub export --db "$out/hub.sqlite" --csv "$out/hub-records.csv" --npy "$out/hub-embeddings.npy"
echo
echo "screens:  $out/screens/ (preview.png, NNNN-result.png, NNNN-quality.png, latest.png)"
echo "queue:    $out/queue/ (records sealed to the hub's key; dermedge queue status --queue $out/queue --key-file $out/device.key)"
echo "hub:      $out/hub.sqlite -> $out/hub-records.csv, $out/hub-embeddings.npy"
echo "summary:  $out/summary.json"
