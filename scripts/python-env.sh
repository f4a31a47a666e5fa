#!/usr/bin/env bash
# Run a Python script in the pinned tooling venv, creating the venv on first use.
# The venv lives in .cache/venv/<hash of requirements-tf.txt>, so a changed pin makes a new one.
#   scripts/python-env.sh tests/fixtures/generate.py [args...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="$root/scripts/requirements-tf.txt"
key="$(sha256sum "$req" | cut -c1-12)"
venv="$root/.cache/venv/tf-$key"
if [[ ! -x "$venv/bin/python" || ! -f "$venv/.complete" ]]; then
  echo "creating Python tooling venv in $venv (tensorflow-cpu, about 1.6 GB) ..." >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet -r "$req"
  touch "$venv/.complete"
fi
exec "$venv/bin/python" "$@"
