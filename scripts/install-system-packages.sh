#!/usr/bin/env bash
# Install Debian packages with apt-get (as root, or with passwordless sudo), skipping those already
# installed. Usage: scripts/install-system-packages.sh PACKAGE... ; exit 1 when they cannot be
# installed (the message says what to install by hand).
set -u
missing=()
for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ]; then
    run=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    run="sudo -n"
else
    echo "install-system-packages: not root and no passwordless sudo; install: ${missing[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-packages: no apt-get; install: ${missing[*]}" >&2
    exit 1
fi
echo "install-system-packages: installing ${missing[*]} (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { $run apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
        || { $run apt-get update -q >/dev/null && $run apt-get install -y -q "${missing[@]}" >/dev/null; }; }; then
    echo "install-system-packages: apt-get failed to install ${missing[*]}" >&2
    exit 1
fi
