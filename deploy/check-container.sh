#!/usr/bin/env bash
# Build deploy/Containerfile without a registry or a container engine that runs
# containers, then run relay from the image's filesystem and probe it.
#
# The python:3.11-slim base is replaced by a local stand-in built with
# debootstrap (Debian bookworm's python3 is 3.11). The host's CA bundle is
# copied into the stand-in so pip works behind a TLS-intercepting proxy.
# Needs root, podman and debootstrap (apt-get install podman debootstrap).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
    bookworm "$work/rootfs" http://deb.debian.org/debian
ln -sf python3 "$work/rootfs/usr/bin/python"
rm -f "$work"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED   # the slim image has no such file
cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
tar -C "$work/rootfs" -c . | podman import - localhost/relay-base:bookworm

podman build --isolation=chroot --format docker \
    --build-arg BASE=localhost/relay-base:bookworm \
    -f deploy/Containerfile -t localhost/relay:check .

mnt=$(podman image mount localhost/relay:check)
trap 'podman image umount localhost/relay:check >/dev/null; rm -rf "$work"' EXIT
python3 -m relay.streamer --listen 127.0.0.1:30701 --ttft 0.05 --gap 0.02 >/dev/null &
streamer=$!
chroot --userspec=10001:10001 "$mnt" /usr/bin/env RELAY_UPSTREAM=127.0.0.1:30701 \
    RELAY_LISTEN=127.0.0.1:4701 RELAY_ADMIN_LISTEN=127.0.0.1:4702 python -m relay &
relay=$!
trap 'kill $relay $streamer 2>/dev/null; podman image umount localhost/relay:check >/dev/null; rm -rf "$work"' EXIT
sleep 2
python3 -m relay probe http://127.0.0.1:4701 --max-tokens 8
# The image's HEALTHCHECK command, run inside the image's filesystem.
chroot --userspec=10001:10001 "$mnt" python -c "import urllib.request,sys; \
sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:4702/health', timeout=2).status == 200 else 1)"
echo "container image OK: builds, runs as uid 10001, streams, health check passes"
