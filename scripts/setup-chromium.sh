#!/usr/bin/env bash
# Makes sure a headless Chromium exists for the HTML-report test (Debian's `chromium` package).
# Idempotent: does nothing when chromium (or $DREAMPIPE_CHROMIUM) is already there.
set -euo pipefail
say() { echo "setup-chromium: $*" >&2; }
if [[ -n "${DREAMPIPE_CHROMIUM:-}" && -x "${DREAMPIPE_CHROMIUM}" ]]; then exit 0; fi
for candidate in chromium chromium-browser google-chrome; do
  command -v "$candidate" >/dev/null && exit 0
done
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  say "error: headless Chromium is needed by the report test; install it (Debian/Ubuntu: sudo apt-get install -y chromium) or set DREAMPIPE_CHROMIUM"
  exit 1
fi
say "installing Debian's chromium (once)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq chromium >/dev/null
