#!/usr/bin/env bash
# Run Python in the pinned model-tooling venv, creating it on first use.
# The venv lives in .cache/venv/tf-<hash of the requirement files>, so a changed pin makes a new one.
#   scripts/python-env.sh tests/fixtures/generate.py [args...]
#   scripts/python-env.sh -m dermedge_export ...      (models/export is on PYTHONPATH)
#   scripts/python-env.sh --venv quantizer -m dermedge_export.sensitivity ...
#     (the AI Edge Quantizer's venv: requirements-quantizer.txt, no TensorFlow, its own LiteRT)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kind=tf
if [[ "${1:-}" == "--venv" ]]; then
  case "${2:-}" in
    tf|quantizer) kind="$2"; shift 2 ;;
    *) echo "python-env.sh: --venv takes tf or quantizer, not '${2:-}'" >&2; exit 2 ;;
  esac
fi
if [[ "$kind" == quantizer ]]; then
  req="$root/models/export/requirements-quantizer.txt"
  nodeps=/dev/null
  size="ai-edge-quantizer, about 0.2 GB"
else
  req="$root/models/export/requirements.txt"
  nodeps="$root/models/export/requirements-nodeps.txt"
  size="tensorflow-cpu, about 1.7 GB"
fi
key="$(cat "$req" "$nodeps" | sha256sum | cut -c1-12)"
venv="$root/.cache/venv/$kind-$key"
if [[ ! -x "$venv/bin/python" || ! -f "$venv/.complete" ]]; then
  echo "creating the model-tooling venv in $venv ($size) ..." >&2
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --no-cache-dir -r "$req"
  # sklesion pins an old TensorFlow; only its trained model file is used.
  [[ "$nodeps" == /dev/null ]] || "$venv/bin/pip" install --quiet --no-cache-dir --no-deps -r "$nodeps"
  touch "$venv/.complete"
fi
export PYTHONPATH="$root/models/export${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$venv/bin/python" "$@"
