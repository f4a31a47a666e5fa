# Sourced: makes Debian's headless Chromium and its WebDriver available (apt-get, non-interactive;
# as root, or through sudo) and exports DERMEDGE_TEST_CHROMEDRIVER, which makes the hub's browser
# test (crates/hub/tests/browser.rs) run instead of passing with a note.
if ! command -v chromedriver >/dev/null || ! { command -v chromium >/dev/null || [[ -n "${DERMEDGE_TEST_CHROMIUM:-}" ]]; }; then
  echo "browser-env: installing Debian's chromium and chromium-driver" >&2
  _browser_sudo=(); [[ $(id -u) -eq 0 ]] || _browser_sudo=(sudo)
  "${_browser_sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${_browser_sudo[@]}" apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver fonts-dejavu-core >/dev/null
  unset _browser_sudo
fi
DERMEDGE_TEST_CHROMEDRIVER="$(command -v chromedriver)"
export DERMEDGE_TEST_CHROMEDRIVER
echo "browser-env: $("$DERMEDGE_TEST_CHROMEDRIVER" --version 2>/dev/null | head -n1)" >&2
# The line cargo prints when the browser test ran and passed.
BROWSER_TEST_PASSED='^test a_clinician_signs_in_finds_the_synced_records_and_labels_one \.\.\. ok$'
