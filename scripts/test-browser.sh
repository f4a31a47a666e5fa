#!/usr/bin/env bash
# The hub's tests with its web page in a real browser: installs Debian's `chromium` and
# `chromium-driver` if they are missing (apt-get, non-interactive; as root, or through sudo), then
# runs `cargo test -p dermedge-hub` with DERMEDGE_TEST_CHROMEDRIVER set, so that
# crates/hub/tests/browser.rs drives headless Chromium through chromedriver (WebDriver): sign-in,
# the synced records with their thumbnails, a filter, a label, a head trained and published,
# refusals without a session.
#   scripts/test-browser.sh                  # the hub's tests, the browser test included
#   scripts/test-browser.sh --screenshot     # also write docs/hub-page.png and docs/hub-heads.png
# Chromium runs with --no-sandbox (it refuses to start as root otherwise) and --headless=new.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:$PATH"

log() { echo "test-browser: $*" >&2; }

source scripts/browser-env.sh

if [[ "${1:-}" == "--screenshot" ]]; then
  export DERMEDGE_SCREENSHOT_TO="$root/docs/hub-page.png"
fi

out="$(mktemp)"
trap 'rm -f "$out"' EXIT
cargo test --locked -p dermedge-hub 2>&1 | tee "$out"
# With DERMEDGE_TEST_CHROMEDRIVER set the browser test runs; make sure it was not left out.
grep -q "$BROWSER_TEST_PASSED" "$out" \
  || { log "error: the browser test did not run"; exit 1; }
log "the browser test ran and passed"
if [[ -n "${DERMEDGE_SCREENSHOT_TO:-}" ]]; then log "screenshot: $DERMEDGE_SCREENSHOT_TO"; fi
