#!/usr/bin/env bash
# Build the GPU worker image (Dockerfile) for real against a locally made Debian base and run it on CPU:
# `nst stylize` on a tiny pair, then the default command (`prefect worker start`) until its HEALTHCHECK is healthy.
# Needs root (it starts its own dockerd: overlay2 storage where this kernel can mount overlayfs, else vfs, which copies
# every layer in full); no registry image is pulled. See docs/docker.md.
#
# Usage: scripts/docker_smoke.sh [--purge | --clean]
#   --purge  run, then delete the whole state dir (images and build cache; the next run starts from nothing)
#   --clean  only delete the state dir
# Environment: NST_DOCKER_STATE (state dir, default /var/tmp/nst-docker-smoke), NST_SMOKE_IMAGE (tag, default
# nst-worker:smoke), NST_SMOKE_BUILD_ARGS (extra `docker build` args, e.g. "--build-arg WORK_POOL=..."),
# NST_DOCKER_STORAGE_DRIVER (auto | overlay2 | vfs), NST_SMOKE_WORKER=0 (skip the worker check),
# NST_SMOKE_MIN_FREE_GB (free disk required; default 15 with overlay2, 40 with vfs), NST_DEBIAN_MIRROR.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${NST_DOCKER_STATE:-/var/tmp/nst-docker-smoke}
SOCK=$STATE/docker.sock
BASE_IMAGE=nst-smoke-base:bookworm
IMAGE=${NST_SMOKE_IMAGE:-nst-worker:smoke}
MIRROR=${NST_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CA_BUNDLE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
DRIVER=${NST_DOCKER_STORAGE_DRIVER:-auto}
PREFECT_PORT=${NST_SMOKE_PREFECT_PORT:-4299}
HOST_PY=${NST_SMOKE_PYTHON:-$REPO/.venv/bin/python}
export DOCKER_HOST=unix://$SOCK DOCKER_BUILDKIT=0 DOCKER_CLI_HINTS=false
umask 022

MODE=run
case "${1:-}" in
  "") ;;
  --purge) MODE=purge ;;
  --clean) MODE=clean ;;
  *) echo "usage: $0 [--purge | --clean]" >&2; exit 2 ;;
esac

T0=$SECONDS
log() { printf '[docker-smoke %4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# dockerd leaves its netns bind mount (exec-root/netns/default) behind; unmount whatever is still under $STATE.
unmount_state() {
  awk -v s="$STATE/" 'index($2, s) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do umount "$m"; done
}

DOCKERD_PID="" BUILD_PID="" SERVER_PID="" WORKER_CID="" OUT=""
cleanup() {
  local rc=$?
  set +e
  [ -n "$BUILD_PID" ] && kill "$BUILD_PID" 2>/dev/null && wait "$BUILD_PID" 2>/dev/null
  [ -n "$WORKER_CID" ] && docker rm -f "$WORKER_CID" >/dev/null 2>&1
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null
  fi
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    log "stopping dockerd (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID"
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -9 "$DOCKERD_PID"
    wait "$DOCKERD_PID" 2>/dev/null
  fi
  unmount_state
  [ -n "$OUT" ] && rm -rf "$OUT"
  [ -n "${ROOTFS:-}" ] && rm -rf "$ROOTFS"
  if [ "$MODE" = purge ]; then log "purging $STATE"; rm -rf "$STATE"; fi
  exit "$rc"
}

[ "$(id -u)" = 0 ] || die "needs root: it starts its own dockerd (vfs storage) and runs debootstrap"
if [ "$MODE" = clean ]; then
  if [ -f "$STATE/dockerd.pid" ] && kill -0 "$(cat "$STATE/dockerd.pid")" 2>/dev/null; then
    die "a dockerd for $STATE is running (pid $(cat "$STATE/dockerd.pid")); stop it first"
  fi
  unmount_state; rm -rf "$STATE"; log "removed $STATE"; exit 0; fi

# --- tools -----------------------------------------------------------------------------------------------------
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  command -v apt-get >/dev/null || die "needs dockerd and debootstrap (Debian: apt-get install docker.io debootstrap)"
  log "installing docker.io and debootstrap with apt-get"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi
command -v docker >/dev/null || die "no docker CLI on PATH"
[ -f "$CA_BUNDLE" ] || die "CA bundle $CA_BUNDLE not found (set SSL_CERT_FILE)"

mkdir -p "$STATE"
if [ "$DRIVER" = auto ]; then
  # overlay2 if this kernel lets us mount overlayfs on the state dir's filesystem: ~6x less disk and time than vfs.
  probe=$(mktemp -d "$STATE/overlay-probe.XXXXXX")
  mkdir "$probe"/{l,u,w,m}
  if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" "$probe/m" 2>/dev/null; then
    umount "$probe/m"; DRIVER=overlay2
  else
    DRIVER=vfs
  fi
  rm -rf "$probe"
fi
DATA=$STATE/data-$DRIVER
# vfs copies the whole filesystem for every layer and every container: a first build peaks at ~40 GB there, and a
# rebuild after a source change still needs ~25 GB. overlay2 stores each layer once: ~13 GB for a first build.
case "$DRIVER" in
  vfs) need=${NST_SMOKE_MIN_FREE_GB:-40}; [ -d "$DATA/image" ] && need=${NST_SMOKE_MIN_FREE_GB:-25} ;;
  *) need=${NST_SMOKE_MIN_FREE_GB:-15} ;;
esac
free_gb=$(df --output=avail -BG "$STATE" | tail -1 | tr -dc 0-9)
log "state dir $STATE, storage driver $DRIVER, ${free_gb} GB free"
if [ "$free_gb" -lt "$need" ]; then
  die "only ${free_gb} GB free under $STATE, ${need} GB needed with $DRIVER storage; free space, or set NST_DOCKER_STATE"
fi

# --- dockerd ---------------------------------------------------------------------------------------------------
if [ -f "$STATE/dockerd.pid" ] && kill -0 "$(cat "$STATE/dockerd.pid")" 2>/dev/null; then
  die "a dockerd for $STATE is already running (pid $(cat "$STATE/dockerd.pid")); another smoke run?"
fi
trap cleanup EXIT
trap 'exit 130' INT TERM
log "starting dockerd ($DRIVER) on $SOCK"
dockerd --storage-driver "$DRIVER" --iptables=false --bridge=none -H "$DOCKER_HOST" \
  --data-root "$DATA" --exec-root "$STATE/exec" --pidfile "$STATE/dockerd.pid" >"$STATE/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 120); do docker version >/dev/null 2>&1 && break; sleep 0.5; done
docker version >/dev/null 2>&1 || { tail -20 "$STATE/dockerd.log" >&2
  die "dockerd did not start (log above); NST_DOCKER_STORAGE_DRIVER=vfs may help"; }
# Leftovers of an interrupted run (build containers, untagged layers) of this private daemon.
docker container prune -f >/dev/null; docker image prune -f >/dev/null

# --- base image: Debian bookworm minbase with python3, trusting this machine's CA bundle ---------------------
# The CA goes into the base image's trust store (only here, never into the project's Dockerfile): pip inside the
# build then reaches the package registry through this machine's TLS-intercepting gateway.
t=$SECONDS
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  BASE_NOTE="cached"
else
  ROOTFS=$(mktemp -d "$STATE/rootfs.XXXXXX")
  log "debootstrap bookworm into $ROOTFS"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$MIRROR" \
    >"$STATE/debootstrap.log" 2>&1 || { tail -20 "$STATE/debootstrap.log" >&2; die "debootstrap failed"; }
  mkdir -p "$ROOTFS/usr/local/share/ca-certificates/build-host"
  awk -v dir="$ROOTFS/usr/local/share/ca-certificates/build-host" '
    /-----BEGIN CERTIFICATE-----/ { n++; f = sprintf("%s/host-%04d.crt", dir, n) }
    f { print > f }
    /-----END CERTIFICATE-----/ { close(f); f = "" }' "$CA_BUNDLE"
  chroot "$ROOTFS" update-ca-certificates >/dev/null 2>&1 || die "update-ca-certificates failed in the base"
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb
  chmod 0755 "$ROOTFS"  # mktemp made it 0700, and it becomes the image's "/"
  log "importing $BASE_IMAGE"
  tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$ROOTFS"; ROOTFS=""
  BASE_NOTE="created"
fi
BASE_S=$((SECONDS - t))
log "base image $BASE_IMAGE $BASE_NOTE in ${BASE_S}s"

# --- build the project image ------------------------------------------------------------------------------------
# No pip index settings are passed: PyPI is reachable here (through the gateway whose CA the base trusts), and this
# machine's pip config (file:// indexes, /etc/xdg/pip constraints) must not leak into the image anyway.
t=$SECONDS
log "docker build -t $IMAGE (log: $STATE/build.log)"
# shellcheck disable=SC2086
docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" ${NST_SMOKE_BUILD_ARGS:-} \
  -t "$IMAGE" "$REPO" >"$STATE/build.log" 2>&1 &
BUILD_PID=$!  # in the background, so that INT/TERM reach the trap at once
if ! wait "$BUILD_PID"; then
  BUILD_PID=""; tail -30 "$STATE/build.log" >&2; die "docker build failed (log above)"
fi
BUILD_PID=""
BUILD_S=$((SECONDS - t))
CACHED_STEPS=$(grep -c 'Using cache' "$STATE/build.log" || true)
IMAGE_BYTES=$(docker image inspect -f '{{.Size}}' "$IMAGE")
IMAGE_SIZE=$(awk -v b="$IMAGE_BYTES" 'BEGIN { printf "%.2f GB", b / 1e9 }')
log "built $IMAGE in ${BUILD_S}s (${CACHED_STEPS} steps from cache), size $IMAGE_SIZE"
grep -E '^torch ' "$STATE/build.log" | tail -1 >&2 || true

# --- one container (each costs a full rootfs copy with vfs), no network: the image's user and pip config, then
# `nst stylize` on a tiny pair through the image's entrypoint, writing to a mounted dir ---------------------------
OUT=$(mktemp -d "$STATE/out.XXXXXX")
chmod 0777 "$OUT"
t=$SECONDS
log "checks + nst stylize chelsea x brick --size 32 --iterations 2 --device cpu (network: none)"
docker run --rm --network none -v "$OUT:/out" "$IMAGE" sh -c '
  set -e
  id -u > /out/uid
  { ls -d /etc/xdg/pip /etc/pip.conf 2>/dev/null || true; pip config list; } > /out/pipconfig
  python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())" > /out/torch
  exec nst stylize /opt/nst/manifests/images/content/chelsea.jpg /opt/nst/manifests/images/styles/brick.jpg \
    --output /out/smoke.png --size 32 --iterations 2 --device cpu' || die "docker run (checks + nst stylize) failed"
[ "$(cat "$OUT/uid")" = 10001 ] || die "the container runs as uid $(cat "$OUT/uid"), not 10001"
! grep -Ei 'xdg|pip.conf|constraint|index-url|find-links' "$OUT/pipconfig" \
  || die "pip config/constraints of the build machine found in the image (above)"
log "in the image: uid 10001, no pip config; torch $(cat "$OUT/torch") (version, CUDA build, GPU available)"
[ -s "$OUT/smoke.png" ] || die "no output image $OUT/smoke.png"
[ -s "$OUT/smoke.json" ] || die "no output JSON $OUT/smoke.json"
python3 - "$OUT/smoke.png" "$OUT/smoke.json" <<'EOF' || die "output check failed"
import json, sys
png, rec = open(sys.argv[1], "rb").read(8), json.load(open(sys.argv[2]))
assert png == b"\x89PNG\r\n\x1a\n", "output is not a PNG"
assert rec.get("status") == "succeeded", f"status is {rec.get('status')!r}"
print(f"smoke.png ok; smoke.json status={rec['status']} device={rec.get('device')} "
      f"iterations={rec.get('iterations')} final_losses={rec.get('final_losses')}", file=sys.stderr)
EOF
SMOKE_NOTE="nst stylize"
SMOKE_S=$((SECONDS - t))
log "smoke ($SMOKE_NOTE) took ${SMOKE_S}s"

# --- default command: prefect worker start, against a throwaway Prefect server on this machine ------------------
WORKER_NOTE="skipped"
WORKER_S=0
if [ "${NST_SMOKE_WORKER:-1}" != 0 ] && [ -x "$HOST_PY" ]; then
  t=$SECONDS
  log "prefect server on 127.0.0.1:$PREFECT_PORT, worker container with the image's default command"
  PREFECT_HOME=$STATE/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_API_URL="" \
    "$HOST_PY" -m prefect server start --host 127.0.0.1 --port "$PREFECT_PORT" >"$STATE/prefect-server.log" 2>&1 &
  SERVER_PID=$!
  api=http://127.0.0.1:$PREFECT_PORT/api
  for _ in $(seq 120); do python3 -c "import urllib.request; urllib.request.urlopen('$api/health', timeout=2)" \
    2>/dev/null && break; sleep 1; done
  WORKER_CID=$(docker run -d --network host -e PREFECT_API_URL="$api" -e NST_WORK_POOL=smoke-gpu-pool \
    -e PREFECT_WORKER_WEBSERVER_PORT=18080 --health-interval 5s --health-start-period 5s "$IMAGE")
  health=starting
  for _ in $(seq 90); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$WORKER_CID")
    [ "$health" = healthy ] && break
    [ "$(docker inspect -f '{{.State.Running}}' "$WORKER_CID")" = true ] || break
    sleep 2
  done
  pool=$(python3 -c "import json, urllib.request as u; r = json.load(u.urlopen('$api/work_pools/smoke-gpu-pool'));
print(r['name'], r['type'], r.get('status'))" 2>/dev/null || echo missing)
  if [ "$health" != healthy ] || [ "$pool" = missing ]; then
    docker logs "$WORKER_CID" 2>&1 | tail -20 >&2
    die "worker container: health=$health; work pool smoke-gpu-pool: $pool"
  fi
  log "worker container healthy; work pool on the server: $pool"
  docker logs "$WORKER_CID" 2>&1 | grep -m1 -i 'worker .* started' >&2 || true
  docker rm -f "$WORKER_CID" >/dev/null; WORKER_CID=""
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""
  WORKER_S=$((SECONDS - t))
  WORKER_NOTE="healthy, pool created"
fi

# --- summary ----------------------------------------------------------------------------------------------------
docker image prune -f >/dev/null 2>&1 || true
STATE_GB=$(du -s -BG "$DATA" | cut -f1)
cat >&2 <<EOF

docker smoke OK
  base image   $BASE_IMAGE ($BASE_NOTE, ${BASE_S}s)
  build        ${BUILD_S}s ($DRIVER) (${CACHED_STEPS} cached steps), image $IMAGE = $IMAGE_SIZE
  smoke        $SMOKE_NOTE, ${SMOKE_S}s
  worker       $WORKER_NOTE, ${WORKER_S}s
  total        $((SECONDS - T0))s; state dir $STATE holds $STATE_GB (remove: scripts/docker_smoke.sh --clean)
EOF
