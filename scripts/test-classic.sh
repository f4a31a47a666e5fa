#!/usr/bin/env bash
# The classic TensorFlow Lite backend (engine feature `classic`, through tflitec 0.5.2) against a
# real libtensorflowlite_c: the TensorFlow 2.6 x86_64 build tflitec ships for docs.rs, which its
# build script unpacks when DOCS_RS=1 (no TensorFlow checkout, no Bazel). A board build instead
# sets TFLITEC_PREBUILT_PATH to the board's library (docs/ACCELERATORS.md).
#
# DOCS_RS=1 is set only for the cargo commands below, after every other crate has been built
# without it, and this script first checks that tflitec is the only build script in the
# dependency graph that reads the variable.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --locked --workspace
readers=$(cargo metadata --locked --format-version 1 --features dermedge-engine/classic |
  python3 -c '
import json, sys, pathlib
meta = json.load(sys.stdin)
for pkg in meta["packages"]:
    for target in pkg["targets"]:
        if "custom-build" in target["kind"] and "DOCS_RS" in pathlib.Path(target["src_path"]).read_text(errors="replace"):
            print(pkg["name"])
')
if [[ "$readers" != "tflitec" ]]; then
  echo "DOCS_RS would reach other build scripts: $readers" >&2
  exit 1
fi
DOCS_RS=1 cargo clippy --locked -p dermedge-engine --features classic --all-targets -- -D warnings
DOCS_RS=1 cargo test --locked -p dermedge-engine --features classic -- --nocapture 2>&1 |
  grep -Ev '^(INFO|WARNING): \[' || { echo "classic backend tests failed" >&2; exit 1; }
# The CLI on both backends: LiteRT (reference) vs classic (candidate) on the trained stand-in, fp32,
# gated; `cargo run` puts the linked libtensorflowlite_c on the library path.
model=.cache/models/lesion-x448/lesion-x448.fp32.toml
DOCS_RS=1 cargo run --locked -q -p dermedge-cli --features classic -- fidelity --threads 2 \
  --reference "$model" --candidate "$model" --candidate-backend classic \
  --images tests/fixtures/images --report out/fidelity-litert-vs-classic 2>&1 | grep -Ev '^(INFO|WARNING): \['
DOCS_RS=1 cargo run --locked -q -p dermedge-cli --features classic -- doctor 2>&1 | grep -E '^(classic|edge-tpu)'
# A classic-only build (a Coral board's firmware without LiteRT) compiles and lints clean.
DOCS_RS=1 cargo clippy --locked -p dermedge-cli --no-default-features --features classic,uvc -- -D warnings
# Leave the default (LiteRT-only) binary in target/ for the steps after this one, built with the
# workspace's features (already compiled: `-p dermedge-cli` alone would compile it again).
cargo build --locked --workspace
