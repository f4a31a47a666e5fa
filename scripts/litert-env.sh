# Sourced by scripts that run a release build from the repository: points DERMEDGE_LITERT_LIB at
# the pinned LiteRT runtime in the repository cache (scripts/fetch-litert.py fills it), which
# release binaries never search on their own (only debug builds do).
# Usage: source scripts/litert-env.sh TARGET   ("" for the host; without an argument, `source`
# would hand this file the calling script's own arguments)
_litert_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_litert_version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$_litert_root/scripts/litert-runtime.lock" | head -n 1)"
_litert_target="${1:-$(rustc -vV | sed -n 's/^host: //p')}"
export DERMEDGE_LITERT_LIB="$_litert_root/.cache/litert/$_litert_version/$_litert_target/libLiteRt.so"
unset _litert_root _litert_version _litert_target
