#!/usr/bin/env bash
# System packages the test suite needs beyond pip: Chromium for the chat page's browser tests
# (tests/test_chat_page.py drives /usr/bin/chromium through Playwright; those tests skip without it).
# Idempotent: does nothing when Chromium is already installed. Never fails the test command:
# without a way to install, it says what to install and the browser tests skip.
set -u
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
packages="chromium chromium-driver"
if [ "$(id -u)" = 0 ]; then
    run=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    run="sudo -n"
else
    echo "install-test-deps: not root and no passwordless sudo; install these for the browser tests: $packages" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: no apt-get; install Chromium at /usr/bin/chromium for the browser tests" >&2
    exit 0
fi
echo "install-test-deps: installing $packages (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
$run apt-get update -q >/dev/null \
    && $run apt-get install -y -q $packages >/dev/null \
    || echo "install-test-deps: apt-get failed; the browser tests will skip" >&2
exit 0
