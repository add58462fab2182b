#!/usr/bin/env bash
# Installs Debian's chromium for the HTML report test (headless screenshot, DevTools protocol).
# Idempotent: does nothing when a chromium is already on PATH. Without root or apt-get it warns
# and the report test skips with that reason.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian package: chromium"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
else
    echo "setup: warning: chromium missing and apt-get unavailable (or not root); the report's browser test will skip" >&2
fi
