#!/usr/bin/env bash
# The browser test (tests/test_serve.py) drives Debian's chromium through Playwright; Playwright's
# own browser download needs the internet, the package registry does not. Install it when absent
# and we are root with apt-get; otherwise say why the browser test will be skipped.
set -u
for name in "${VISIONTUNE_CHROMIUM:-}" chromium chromium-browser google-chrome; do
  if [ -n "$name" ] && command -v "$name" >/dev/null 2>&1; then exit 0; fi
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the browser test (apt-get, once)..." >&2
  if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
      >/tmp/visiontune-apt.log 2>&1; then
    exit 0
  fi
  echo "apt-get could not install chromium (see /tmp/visiontune-apt.log); the browser test will be skipped." >&2
else
  echo "no chromium and no root apt-get here; the browser test will be skipped (install chromium to run it)." >&2
fi
exit 0
