#!/usr/bin/env bash
# Build the service image (./Dockerfile) and the compose balancer where no image registry is
# reachable and pip may sit behind a TLS-intercepting proxy, with the Dockerfile's knobs:
#   - the base: a Debian bookworm image made by debootstrap (scripts/docker/base-image.sh,
#     cached by tag), or BASE_IMAGE;
#   - the CA bundle pip (and apt) must trust, as the build secret `ca`;
#   - torch from a local wheelhouse, served on 127.0.0.1 for the build (--network host) and
#     given to pip as PIP_FIND_LINKS; its dependencies come from the index.
#
#   scripts/docker/build-local.sh [IMAGE] [BALANCER_IMAGE]
#       # default reward-service:local and reward-balancer:local; BALANCER_IMAGE "-": none
#
# Environment (all optional):
#   BASE_IMAGE        a local image with python3.11 (`python -m venv`, useradd) to build FROM
#   CA_BUNDLE         default: $PIP_CERT, $REQUESTS_CA_BUNDLE, $SSL_CERT_FILE, pip's global.cert,
#                     else /etc/ssl/certs/ca-certificates.crt (none: no secret)
#   TORCH_WHEELHOUSE  a folder holding torch-<version>*.whl (default: /opt/wheels when it has one;
#                     none: torch from TORCH_INDEX_URL)
#   TORCH_VERSION     default 2.13.0+cpu with a wheelhouse, else the Dockerfile's 2.13.0
#   PIP_INDEX_URL     the index pip can reach (default https://pypi.org/simple); also torch's
#                     index when there is a wheelhouse
#   WHEELHOUSE_PORT   where the wheelhouse is served (default 38765; another free port when
#                     busy, which misses the build cache: the URL is a build argument)
#   DOCKER            the docker CLI (default: the first of docker, /usr/bin/docker that can
#                     build with BuildKit: `docker buildx`, or a 20.x CLI with DOCKER_BUILDKIT=1)
#   BUILD_LOG         where the build output goes (default: stderr)
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE=${1:-reward-service:local}
BALANCER=${2:-reward-balancer:local}
INDEX=${PIP_INDEX_URL:-https://pypi.org/simple}
say() { echo "build-local: $*" >&2; }

# A CLI that builds with BuildKit (RUN --mount needs it).
build=()
for cli in ${DOCKER:-docker /usr/bin/docker}; do
    command -v "$cli" > /dev/null || continue
    if "$cli" buildx version > /dev/null 2>&1; then
        build=("$cli" buildx build --load); break
    fi
    major=$("$cli" version --format '{{.Client.Version}}' 2> /dev/null | cut -d. -f1 || true)
    if [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -lt 23 ]; then
        export DOCKER_BUILDKIT=1
        build=("$cli" build); break
    fi
done
if [ ${#build[@]} -eq 0 ]; then
    say "no docker CLI here builds with BuildKit (install docker-buildx, or use Debian's docker.io CLI)"
    exit 3
fi
DOCKER=${build[0]}
say "building with: ${build[*]}"

BASE=${BASE_IMAGE:-$(DOCKER=$DOCKER scripts/docker/base-image.sh)}

CA=${CA_BUNDLE:-${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-}}}}
if [ -z "$CA" ]; then
    CA=$(python3 -m pip config get global.cert 2> /dev/null || true)
fi
[ -n "$CA" ] || CA=/etc/ssl/certs/ca-certificates.crt
secret=()
if [ -s "$CA" ]; then secret=(--secret "id=ca,src=$CA"); say "CA bundle: $CA"; else say "no CA bundle at '$CA': pip uses its own"; fi

wheelhouse=${TORCH_WHEELHOUSE:-}
if [ -z "$wheelhouse" ] && compgen -G "/opt/wheels/torch-*.whl" > /dev/null; then wheelhouse=/opt/wheels; fi
args=(--build-arg "PYTHON_IMAGE=$BASE")
server_pid=
cleanup() { if [ -n "$server_pid" ]; then kill "$server_pid" 2> /dev/null || true; fi; }
trap cleanup EXIT
if [ -n "$wheelhouse" ]; then
    port=${WHEELHOUSE_PORT:-38765}
    if ! python3 -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$port" 2> /dev/null; then
        port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
        say "port ${WHEELHOUSE_PORT:-38765} is busy; wheelhouse on $port (the pip layers will not come from the cache)"
    fi
    python3 -m http.server --bind 127.0.0.1 --directory "$wheelhouse" "$port" > /dev/null 2>&1 &
    server_pid=$!
    for _ in $(seq 50); do
        python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "http://127.0.0.1:$port/" 2> /dev/null && break
        sleep 0.1
    done
    say "wheelhouse $wheelhouse on http://127.0.0.1:$port/"
    args+=(--build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/"
           --build-arg "TORCH_INDEX_URL=$INDEX"
           --build-arg "TORCH_VERSION=${TORCH_VERSION:-2.13.0+cpu}")
else
    [ -z "${TORCH_VERSION:-}" ] || args+=(--build-arg "TORCH_VERSION=$TORCH_VERSION")
fi
[ -z "${PIP_INDEX_URL:-}" ] || args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")

log=${BUILD_LOG:-/dev/stderr}
started=$(date +%s)
"${build[@]}" --network host "${secret[@]}" "${args[@]}" -t "$IMAGE" . >> "$log" 2>&1 \
    || { say "building $IMAGE failed (output: $log)"; exit 1; }
say "built $IMAGE in $(( $(date +%s) - started )) s"
if [ "$BALANCER" != "-" ]; then
    started=$(date +%s)
    "${build[@]}" --network host "${secret[@]}" --build-arg "BASE_IMAGE=$BASE" \
        -f scripts/docker/balancer.Dockerfile -t "$BALANCER" scripts/docker >> "$log" 2>&1 \
        || { say "building $BALANCER failed (output: $log)"; exit 1; }
    say "built $BALANCER in $(( $(date +%s) - started )) s"
fi
