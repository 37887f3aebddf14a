#!/usr/bin/env bash
# System packages the test suite needs beyond pip (Debian's, through apt-get):
# - Chromium for the chat page's browser tests (tests/test_chat_page.py drives /usr/bin/chromium
#   through Playwright);
# - PostgreSQL 15 and HAProxy for the replica tests (tests/test_cluster.py runs
#   deploy/local-cluster.sh) and the store's PostgreSQL tests.
# Idempotent: installs only what is missing. Never fails the test command: without a way to
# install, it says what to install and those tests skip, saying why.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
"$here/install-system-packages.sh" chromium chromium-driver postgresql-15 haproxy \
    || echo "install-test-deps: the browser, PostgreSQL or cluster tests that lack their packages will skip" >&2
exit 0
