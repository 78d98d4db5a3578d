#!/usr/bin/env bash
# Build the gateway and CPU worker images and run the compose stack end to end, on a machine
# where no container registry can be reached. CI runs it after `make test`; run it as root:
#
#   infra/smoke.sh
#
# What it does, and undoes on the way out (containers, networks, volumes, the daemon it
# started, its scratch folder):
#  1. installs Docker, docker-compose and debootstrap from Debian's packages if missing, and
#     starts its own dockerd (own data root and socket; no default bridge, no iptables rules);
#  2. makes the local bases: Debian by debootstrap from this machine's own apt mirror, Python
#     from Debian's packages (with the CA bundle this machine's pip trusts), PostgreSQL and
#     Redis from Debian's packages;
#  3. builds infra/gateway.Dockerfile and infra/worker.Dockerfile (VARIANT=cpu, this machine's
#     CPU build of torch) and reports their sizes;
#  4. writes tiny random-weight models into a folder mounted read-only at /models, runs
#     infra/docker-compose.yml (PostgreSQL, Redis, migrations, gateway, LLaVA and SD workers,
#     every gpuhost container non-root on a read-only root file system) until all are healthy;
#  5. through the published gateway port: a tenant and key, a streamed /api/chat with an
#     image, an /api/images; the usage records in PostgreSQL; /metrics;
#  6. SIGKILLs the LLaVA worker's container, brings it back with `docker-compose up`, and
#     asks again.
# GPUHOST_SMOKE_KEEP=1 keeps the scratch folder (bases, images, build cache) for a rerun with
# GPUHOST_SMOKE_DIR=that folder.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SMOKE="$ROOT/infra/smoke"
WORK=${GPUHOST_SMOKE_DIR:-$(mktemp -d /var/tmp/gpuhost-smoke.XXXXXX)}
mkdir -p "$WORK"
export DOCKER_HOST="unix://$WORK/docker.sock"
export COMPOSE_PROJECT_NAME=gpuhost-smoke
RELEASE=bookworm
DEBIAN_IMAGE=gpuhost-local/debian:$RELEASE
PYTHON_IMAGE=gpuhost-local/python:$RELEASE
GATEWAY_IMAGE=gpuhost-gateway:smoke
WORKER_IMAGE=gpuhost-worker-cpu:smoke
COMPOSE=(docker-compose -f "$ROOT/infra/docker-compose.yml" -f "$SMOKE/compose.yml")
DOCKERD_PID=
STARTED=$SECONDS

say() { printf '[smoke %4ds] %s\n' $((SECONDS - STARTED)) "$*"; }

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    if [ $status -ne 0 ]; then
      say "failed: the containers' last words"
      "${COMPOSE[@]}" logs --no-color --tail 40 2>/dev/null || true
    fi
    "${COMPOSE[@]}" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
    docker ps -aq | xargs -r docker rm -f >/dev/null 2>&1 || true
    docker network prune -f >/dev/null 2>&1 || true
    kill "$DOCKERD_PID"
    for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
    kill -9 "$DOCKERD_PID" 2>/dev/null || true
  fi
  rm -f "$ROOT"/infra/wheels/*.whl
  # dockerd unmounted its layers on the way out, but not its network namespace's mount
  grep -o " $WORK/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  [ -n "${GPUHOST_SMOKE_KEEP:-}" ] || rm -rf "$WORK"
  [ $status -eq 0 ] && say "passed in $((SECONDS - STARTED)) s; nothing left running"
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# 1. tools and a daemon of our own
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} (Debian's packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "${missing[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
fi
say "starting dockerd (data in $WORK)"
dockerd --data-root "$WORK/docker" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
  --host "$DOCKER_HOST" --bridge=none --iptables=false --ip-masq=false \
  >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
docker info >/dev/null || { tail -20 "$WORK/dockerd.log"; exit 1; }

# 2. the local bases
build() {  # build TAG DOCKERFILE CONTEXT [--build-arg ...]
  local tag=$1 file=$2 context=$3 started=$SECONDS
  shift 3
  docker build --network host -t "$tag" -f "$file" "$@" "$context" >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; return 1; }
  say "built $tag in $((SECONDS - started)) s: $(docker image inspect -f '{{.Size}}' "$tag" \
    | awk '{printf "%d MB", $1 / 1e6}')"
}
if ! docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
  sources=$(python3 "$SMOKE/apt_sources.py" "$RELEASE")
  mirror=$(head -1 <<<"$sources" | awk '{print $2}')
  say "debootstrap $RELEASE from this machine's mirror"
  rootfs="$WORK/rootfs"
  debootstrap --variant=minbase "$RELEASE" "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  printf '%s\n' "$sources" >"$rootfs/etc/apt/sources.list"
  # as Debian's own slim images: no documentation, manuals or translations, no package cache
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
    'path-exclude /usr/share/locale/*' >"$rootfs/etc/dpkg/dpkg.cfg.d/slim"
  printf '%s\n' 'APT::Keep-Downloaded-Packages "false";' 'Dir::Cache::pkgcache "";' \
    'Dir::Cache::srcpkgcache "";' >"$rootfs/etc/apt/apt.conf.d/slim"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
  find "$rootfs/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
  tar -C "$rootfs" -c . | docker import - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$rootfs"
fi
context="$WORK/python-context"
mkdir -p "$context"
# the bundle this machine's pip trusts, for pip inside the builds (never committed)
cp "${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null \
  || echo /etc/ssl/certs/ca-certificates.crt)}" "$context/ca-certificates.crt"
cp "$SMOKE/python.Dockerfile" "$context/Dockerfile"
build "$PYTHON_IMAGE" "$context/Dockerfile" "$context" --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE"
build gpuhost-local/postgres "$SMOKE/postgres.Dockerfile" "$SMOKE" \
  --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE"
build gpuhost-local/redis "$SMOKE/redis.Dockerfile" "$SMOKE" \
  --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE"

# 3. the images under test
build "$GATEWAY_IMAGE" "$ROOT/infra/gateway.Dockerfile" "$ROOT" \
  --build-arg PYTHON_IMAGE="$PYTHON_IMAGE"
torch=$(grep -m1 '^torch==' "$ROOT/infra/constraints.txt")
# this machine's own build of that torch (its pip's wheel folders first), for the CPU variant
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$ROOT/infra/wheels" "$torch" \
  2> >(grep -v "^WARNING: Location" >&2)
build "$WORKER_IMAGE" "$ROOT/infra/worker.Dockerfile" "$ROOT" \
  --build-arg VARIANT=cpu --build-arg BASE_IMAGE="$PYTHON_IMAGE"
rm -f "$ROOT"/infra/wheels/*.whl

# 4. tiny models, then the stack
export MODELS_DIR="$WORK/models" GATEWAY_IMAGE WORKER_IMAGE
export POSTGRES_IMAGE=gpuhost-local/postgres REDIS_IMAGE=gpuhost-local/redis
ADMIN_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
GATEWAY_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export ADMIN_TOKEN GATEWAY_PORT
mkdir -p "$MODELS_DIR" && chown 10001:10001 "$MODELS_DIR"
docker run --rm --network none --read-only --tmpfs /tmp -v "$MODELS_DIR:/models" \
  "$WORKER_IMAGE" models make-tiny /models >/dev/null
say "tiny models written to $MODELS_DIR"
"${COMPOSE[@]}" up --detach --no-build gateway worker-llava worker-sd 2>&1 | grep -v '^$' || true

healthy() {  # wait until these services' containers report healthy
  local deadline=$((SECONDS + 300)) service id state
  for service in "$@"; do
    while :; do
      id=$("${COMPOSE[@]}" ps -q "$service")
      state=$(docker inspect -f '{{.State.Health.Status}}' "$id" 2>/dev/null || echo starting)
      [ "$state" = healthy ] && break
      if [ $SECONDS -gt $deadline ]; then
        say "$service is $state after 300 s"
        return 1
      fi
      sleep 2
    done
  done
  say "healthy: $*"
}
healthy gateway worker-llava worker-sd
for service in gateway worker-llava worker-sd; do
  id=$("${COMPOSE[@]}" ps -q "$service")
  docker inspect -f "$service: user {{.Config.User}}, read-only root {{.HostConfig.ReadonlyRootfs}}" "$id"
done

# 5. a tenant's requests, its usage records, the metrics
url="http://127.0.0.1:$GATEWAY_PORT"
check() { python3 "$SMOKE/check.py" "$@"; }
API_KEY=$(check tenant "$url")
export API_KEY
chat_id=$(check chat "$url")
image_id=$(check image "$url")
say "answered: streamed chat $chat_id, image $image_id"
psql() { "${COMPOSE[@]}" exec -T postgres psql -U gpuhost -d gpuhost -tA -c "$1"; }
[ "$(psql 'SHOW server_encoding')" = UTF8 ] || { say "PostgreSQL is not UTF-8"; exit 1; }
records=$(psql "SELECT count(*) FROM usage_records WHERE request_id IN ('$chat_id', '$image_id')
  AND status = 'completed' AND gpu_seconds > 0")
[ "$records" = 2 ] || { say "usage records: $records of 2"; exit 1; }
say "usage records in PostgreSQL: $(psql "SELECT string_agg(kind || ' ' || round(gpu_seconds::numeric, 3) || ' s', ', ') FROM usage_records")"
check metrics "$url"

# 6. a worker killed outright comes back with `docker-compose up`
say "SIGKILL to the LLaVA worker's container"
docker kill --signal KILL "$("${COMPOSE[@]}" ps -q worker-llava)" >/dev/null
"${COMPOSE[@]}" up --detach --no-build worker-llava 2>&1 | grep -v '^$' || true
healthy worker-llava
after_id=$(check chat "$url")
[ "$(psql "SELECT count(*) FROM usage_records WHERE request_id = '$after_id'")" = 1 ] \
  || { say "no usage record for $after_id"; exit 1; }
say "answered after the kill: $after_id, recorded"
