#!/usr/bin/env bash
# What the ops console is checked with in a real browser, only when missing:
#   chromium, chromium-driver   Debian's packages (/usr/bin/chromium, /usr/bin/chromedriver)
#   selenium                    WebDriver client, from PyPI into .ci/apivenv
#   axe-core                    accessibility rules, from npm into .ci/browser
# Sourced by tests/run.sh (which calls ensure_browser_tools), or run directly.
set -euo pipefail

BROWSER_TOOLS_ROOT=${BROWSER_TOOLS_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# 4.52 needs a certifi newer than the registry has.
SELENIUM_VERSION=4.50.0
AXE_CORE_VERSION=4.14.1

ensure_browser_tools() {
  if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then
    printf '\n==> %s\n' "installing chromium and chromium-driver"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  fi
  local venv="$BROWSER_TOOLS_ROOT/.ci/apivenv"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  if ! "$venv/bin/python" -c "import selenium, sys; sys.exit(selenium.__version__ != '$SELENIUM_VERSION')" 2>/dev/null; then
    printf '\n==> %s\n' "installing selenium $SELENIUM_VERSION into .ci/apivenv"
    "$venv/bin/pip" install -q --disable-pip-version-check "selenium==$SELENIUM_VERSION"
  fi
  local axe="$BROWSER_TOOLS_ROOT/.ci/browser/node_modules/axe-core/axe.min.js"
  if ! [ -f "$axe" ] || ! grep -q "$AXE_CORE_VERSION" "$BROWSER_TOOLS_ROOT/.ci/browser/node_modules/axe-core/package.json"; then
    printf '\n==> %s\n' "installing axe-core $AXE_CORE_VERSION into .ci/browser"
    mkdir -p "$BROWSER_TOOLS_ROOT/.ci/browser"
    npm install --silent --no-audit --no-fund --prefix "$BROWSER_TOOLS_ROOT/.ci/browser" "axe-core@$AXE_CORE_VERSION" >/dev/null
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  ensure_browser_tools
fi
