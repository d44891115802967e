#!/usr/bin/env bash
# What the console's browser test needs: Debian's Chromium (never a browser a
# test tool downloads) and Node.js with playwright-core, pinned by
# tests/browser/package-lock.json. Idempotent; quiet when all is there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
log() { echo "browser: $*" >&2; }
if ! [ -x "${CHROMIUM:-/usr/bin/chromium}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian's chromium"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    log "error: chromium is missing (install Debian's chromium package, or set CHROMIUM)"; exit 1
  fi
fi
command -v node >/dev/null || { log "error: Node.js is missing"; exit 1; }
if ! [ -d tests/browser/node_modules/playwright-core ]; then
  log "installing playwright-core (the driver only; it downloads no browser)"
  (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --silent >&2)
fi
