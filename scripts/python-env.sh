#!/usr/bin/env bash
# Run Python in the pinned model-tooling venv, creating it on first use.
# The venv lives in .cache/venv/tf-<hash of the requirement files>, so a changed pin makes a new one.
#   scripts/python-env.sh tests/fixtures/generate.py [args...]
#   scripts/python-env.sh -m dermedge_export ...      (models/export is on PYTHONPATH)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="$root/models/export/requirements.txt"
nodeps="$root/models/export/requirements-nodeps.txt"
key="$(cat "$req" "$nodeps" | sha256sum | cut -c1-12)"
venv="$root/.cache/venv/tf-$key"
if [[ ! -x "$venv/bin/python" || ! -f "$venv/.complete" ]]; then
  echo "creating the model-tooling venv in $venv (tensorflow-cpu, about 1.7 GB) ..." >&2
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --no-cache-dir -r "$req"
  # sklesion pins an old TensorFlow; only its trained model file is used.
  "$venv/bin/pip" install --quiet --no-cache-dir --no-deps -r "$nodeps"
  touch "$venv/.complete"
fi
export PYTHONPATH="$root/models/export${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$venv/bin/python" "$@"
