#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11, made from Debian packages alone (debootstrap +
# docker import): what to build FROM where no image registry is reachable. Cached by tag: an
# image already carrying the tag is kept as it is (remove it to rebuild).
#
#   scripts/docker/base-image.sh [TAG]          # default reward-base:bookworm-py311-1
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), DOCKER (the docker CLI).
# Needs root and debootstrap (apt-get install debootstrap). Prints the tag on stdout.
set -euo pipefail

TAG=${1:-reward-base:bookworm-py311-1}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER=${DOCKER:-docker}

if "$DOCKER" image inspect "$TAG" > /dev/null 2>&1; then
    echo "base-image: $TAG exists, kept" >&2
    echo "$TAG"
    exit 0
fi
command -v debootstrap > /dev/null || { echo "base-image: debootstrap is missing (apt-get install debootstrap)" >&2; exit 3; }
[ "$(id -u)" -eq 0 ] || { echo "base-image: debootstrap needs root" >&2; exit 3; }

root=$(mktemp -d /tmp/reward-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
started=$(date +%s)
# minbase: dpkg, apt and the Essential set (passwd for useradd included); python3-venv brings
# ensurepip, so `python -m venv` gives a venv with pip as in the python:3.11-slim image.
debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$root" "$MIRROR" > "$root.log" 2>&1 \
    || { tail -30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
    "$root"/var/log/*.log "$root"/tmp/*
tar -C "$root" --numeric-owner -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap bookworm minbase + python3 from $MIRROR" - "$TAG" > /dev/null
echo "base-image: built $TAG in $(( $(date +%s) - started )) s" >&2
echo "$TAG"
