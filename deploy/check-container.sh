#!/usr/bin/env bash
# Build deploy/Containerfile without a registry, then run the image as a
# container engine would (its ENTRYPOINT, CMD, ENV, USER and WORKDIR, read
# from `podman image inspect`), stream through it and run its HEALTHCHECK.
#
#   deploy/check-container.sh [--keep]     # --keep: leave the images behind
#
# Runs from a fresh root shell as written: everything that needs relay (the
# upstream streamer, the probe) runs inside the image, which has relay
# installed; the host's python3 only reads JSON.
#
# The python:3.11-slim base is replaced by a local stand-in built with
# debootstrap (Debian bookworm's python3 is 3.11). The host's CA bundle is
# copied into the stand-in so pip works behind a TLS-intercepting proxy. The
# stand-in's root file system is cached for the day in $CHECK_CONTAINER_CACHE
# (default /var/cache/relay-check; set it empty to cache nothing), so only
# the first check of a day downloads Debian.
# Where `podman run` works the image runs as a container; where it does not
# (no user namespaces, nested containers) it runs under chroot from the
# mounted image with the same command line and environment. Either way it
# runs in a network namespace of its own, so the image's ports (4000, 4001)
# never meet anything else on the machine.
# Needs root, podman, debootstrap and iproute2 (apt-get install podman debootstrap iproute2).
set -euo pipefail
cd "$(dirname "$0")/.."
keep=no
if [[ ${1:-} == --keep ]]; then keep=yes; fi
# Names of this run only: checks running at once must not remove each other's.
image=localhost/relay:check-$$
base=localhost/relay-base:check-$$
netns=relay-check-$$
cache=${CHECK_CONTAINER_CACHE-/var/cache/relay-check}
work=$(mktemp -d)
pids=()
mounted=no
container=
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -n $container ]]; then podman rm -f -t 0 "$container" >/dev/null 2>&1 || true; fi
    if [[ $mounted == yes ]]; then podman image umount "$image" >/dev/null || true; fi
    if [[ $keep == no ]]; then podman rmi -f "$image" "$base" >/dev/null 2>&1 || true; fi
    ip netns delete "$netns" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
for tool in podman debootstrap ip; do
    if ! command -v "$tool" >/dev/null; then
        echo "check-container.sh: $tool is not installed (apt-get install podman debootstrap iproute2)" >&2
        exit 1
    fi
done

# The base root file system, built once a day (Debian's security updates
# reach the image at most a day late).
rootfs=${cache:-$work}/bookworm-$(date -u +%Y%m%d).tar
if [[ ! -s $rootfs ]]; then
    mkdir -p "$(dirname "$rootfs")"
    debootstrap --variant=minbase --include=python3,python3-pip,ca-certificates \
        bookworm "$work/rootfs" http://deb.debian.org/debian
    ln -sf python3 "$work/rootfs/usr/bin/python"
    rm -f "$work"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED   # the slim image has no such file
    cp /etc/ssl/certs/ca-certificates.crt "$work/rootfs/etc/ssl/certs/ca-certificates.crt"
    # Written aside and renamed: a check running at the same time never reads half a file.
    tar -C "$work/rootfs" -cf "$rootfs.$$" .
    mv "$rootfs.$$" "$rootfs"
    rm -rf "$work/rootfs"
    find "$(dirname "$rootfs")" -maxdepth 1 -name 'bookworm-*.tar' ! -name "$(basename "$rootfs")" \
        -delete
fi
podman import - "$base" <"$rootfs" >/dev/null

# --layers=false: no intermediate images are left behind.
podman build --isolation=chroot --format docker --layers=false \
    --build-arg BASE="$base" -f deploy/Containerfile -t "$image" .

# The image's run configuration, as NUL-separated lists for bash:
# user, working directory, then the environment, then the command.
podman image inspect "$image" >"$work/inspect.json"
python3 - "$work/inspect.json" "$work" <<'EOF'
import json, sys
image = json.load(open(sys.argv[1]))[0]
config, out = image.get("Config") or {}, sys.argv[2]
env = config.get("Env") or []
if not any(e.startswith("PATH=") for e in env):  # engines supply a default PATH
    env.append("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
command = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
# podman shows a docker-format HEALTHCHECK beside the OCI config.
health = (image.get("Healthcheck") or config.get("Healthcheck") or {}).get("Test") or []
if health[:1] == ["CMD-SHELL"]:
    health = ["/bin/sh", "-c", *health[1:]]
elif health[:1] == ["CMD"]:
    health = health[1:]
for name, items in (("env", env), ("command", command), ("health", health)):
    open(f"{out}/{name}", "w").write("".join(f"{i}\0" for i in items))
open(f"{out}/user", "w").write(config.get("User") or "0")
open(f"{out}/workdir", "w").write(config.get("WorkingDir") or "/")
EOF
mapfile -d '' -t image_env <"$work/env"
mapfile -d '' -t command <"$work/command"
mapfile -d '' -t health <"$work/health"
user=$(cat "$work/user")
workdir=$(cat "$work/workdir")
if [[ ${#command[@]} -eq 0 || ${#health[@]} -eq 0 ]]; then
    echo "the image has no ENTRYPOINT/CMD or no HEALTHCHECK" >&2
    exit 1
fi

# A network namespace with only loopback: the upstream, relay, the
# HEALTHCHECK and the probe all meet on its 127.0.0.1.
ip netns add "$netns"
ip netns exec "$netns" ip link set lo up
# What `docker run -e RELAY_UPSTREAM=...` adds: the only setting not in the image.
upstream=RELAY_UPSTREAM=127.0.0.1:30000
log="$work/relay.log"
if podman run --rm --network none --user "$user" "$image" --version >/dev/null 2>"$work/run.err"; then
    mode="podman run"
    container=relay-check-$$
    podman run -d --name "$container" --network "ns:/run/netns/$netns" -e "$upstream" \
        "$image" >/dev/null
    in_image=(podman exec "$container")
    alive() { [[ $(podman inspect -f '{{.State.Running}}' "$container") == true ]]; }
    logs() { podman logs "$container" 2>&1; }
else
    echo "podman run does not work here ($(tail -n 1 "$work/run.err")); running the image under chroot"
    mode="chroot (podman run does not work here)"
    mnt=$(podman image mount "$image")
    mounted=yes
    # USER is NAME or UID[:GID]; without a group, the user's group in the
    # image's /etc/passwd, else 0, as container engines do.
    uid=${user%%:*}
    gid=$(awk -F: -v u="$uid" '$1 == u || $3 == u {print $4; exit}' "$mnt/etc/passwd")
    [[ $user == *:* ]] && gid=${user#*:}
    if [[ ! -d $mnt/$workdir ]]; then
        echo "the image's WORKDIR $workdir does not exist in it" >&2
        exit 1
    fi
    in_image=(ip netns exec "$netns" chroot "--userspec=$uid:${gid:-0}" "$mnt"
        /usr/bin/env -i "${image_env[@]}" "$upstream" /bin/sh -c 'cd "$0" && exec "$@"' "$workdir")
    # ip netns exec, chroot, env and sh exec in turn: $! ends up being relay itself.
    "${in_image[@]}" "${command[@]}" 2>"$log" &
    relay_pid=$!
    pids+=("$relay_pid")
    alive() { kill -0 "$relay_pid" 2>/dev/null; }
    logs() { cat "$log"; }
fi

# The upstream: relay's own streamer, from the image (which has relay installed).
"${in_image[@]}" python -m relay.tools.streamer --listen 127.0.0.1:30000 --ttft 50ms \
    --gap 20ms >"$work/streamer.log" 2>&1 &
pids+=($!)
streamer=$!
for _ in $(seq 100); do
    if grep -q "listening on" "$work/streamer.log"; then break; fi
    if ! kill -0 "$streamer" 2>/dev/null; then break; fi
    sleep 0.2
done
if ! grep -q "listening on" "$work/streamer.log"; then
    echo "the streamer did not start in the image:" >&2
    cat "$work/streamer.log" >&2
    exit 1
fi

# Ready when the image's own HEALTHCHECK passes (at most 20 s); until then
# its failures are expected, the last one is shown.
for _ in $(seq 100); do
    if ! alive; then
        echo "relay exited in the image:" >&2
        logs >&2
        exit 1
    fi
    if "${in_image[@]}" "${health[@]}" >/dev/null 2>&1; then break; fi
    sleep 0.2
done
if ! "${in_image[@]}" "${health[@]}"; then
    echo "the image's HEALTHCHECK fails; relay's log:" >&2
    logs >&2
    exit 1
fi
"${in_image[@]}" python -m relay probe http://127.0.0.1:4000 --max-tokens 8
# The image sets RELAY_LOG_FORMAT=json: every log line must be a JSON object.
logs | python3 -c 'import json, sys
lines = [line for line in sys.stdin if line.strip()]
for line in lines:
    try:
        assert isinstance(json.loads(line), dict)
    except (ValueError, AssertionError):
        sys.exit(f"relay did not log JSON: {line.rstrip()}")
sys.exit(0 if lines else "relay logged nothing")'
echo "container image OK ($mode): runs its ENTRYPOINT as user $user with its ENV," \
    "streams, logs JSON, HEALTHCHECK passes (${SECONDS}s)"
if [[ $keep == yes ]]; then echo "kept $image and $base"; fi
