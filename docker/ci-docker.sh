#!/usr/bin/env bash
# The docker backend, proven against a real Docker engine: start Debian's docker.io daemon on
# a private socket, build local stand-ins for the official service images (no container
# registry is reachable here), run Phase 2 and Phase 5 with `--backend docker`, build the
# labrunner image and run `labrunner run` inside it with the local backend, build and run
# ph6.7's multi-stage Dockerfile (the C server) on local stand-in bases, then stop
# everything: no container, network, bridge or daemon is left behind.
#
#   docker/ci-docker.sh            all of it (what CI runs)
#   docker/ci-docker.sh up         daemon + images only; prints the DOCKER_HOST to export
#   docker/ci-docker.sh down       remove every container and stop the daemon
#
# What is cached on the machine between runs (under $LABRUNNER_DOCKER_CACHE,
# /var/cache/labrunner by default): the debootstrapped Debian base, the daemon's data root
# (images and build layers), and the wheelhouse of labrunner's dependencies.
#
# The Debian mirror is read from this machine's own apt sources at run time; none is written
# in this repository.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/apt-lib.sh
. "$ROOT/scripts/apt-lib.sh"
RUN_DIR="${LABRUNNER_DOCKER_RUN_DIR:-/tmp/labrunner-docker}"
CACHE="${LABRUNNER_DOCKER_CACHE:-/var/cache/labrunner}"
SOCK="$RUN_DIR/docker.sock"
BRIDGE="${LABRUNNER_DOCKER_BRIDGE:-lrdocker0}"
BRIDGE_CIDR="${LABRUNNER_DOCKER_BRIDGE_CIDR:-172.31.250.1/24}"
SUITE="${LABRUNNER_DEBIAN_SUITE:-bookworm}"
BASE_IMAGE="labrunner/debian-base:$SUITE"
LABRUNNER_IMAGE="${LABRUNNER_IMAGE_TAG:-labrunner:ci}"
PHASES="${LABRUNNER_DOCKER_PHASES:-ph2 ph5}"
IN_IMAGE_SELECTORS="${LABRUNNER_IMAGE_SELECTORS:-ph2}"
OUT_DIR="${LABRUNNER_DOCKER_OUT:-$ROOT/out/docker}"

export DOCKER_HOST="unix://$SOCK"
export DOCKER_BUILDKIT=0                       # the daemon's own builder: no buildx needed
export TESTCONTAINERS_RYUK_DISABLED=true        # the reaper image cannot be pulled here
export TESTCONTAINERS_CONNECTION_MODE=docker_host
export LABRUNNER_BACKEND=docker

SUDO=""
if [ "$(id -u)" != 0 ]; then
    # Not root: the daemon, debootstrap and apt need root; sudo must not ask (CI has no tty).
    command -v sudo >/dev/null || { echo "ci-docker: not root and no sudo" >&2; exit 1; }
    sudo -n true 2>/dev/null || { echo "ci-docker: sudo asks for a password; run as root or allow it" >&2; exit 1; }
    SUDO="sudo -n"
fi

log() { printf '[ci-docker %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
elapsed() { echo $(( SECONDS - $1 ))s; }

# --- what the machine needs --------------------------------------------------------------

ensure_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
    command -v ip >/dev/null || missing+=(iproute2)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]} with apt"
        # The pristine-root stage may be using apt beside us: apt_get waits for it.
        apt_get "$SUDO" update -q >/dev/null || die "apt-get update failed"
        apt_get "$SUDO" install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed"
    fi
    if ! command -v docker >/dev/null; then
        die "no docker client after installing docker.io"
    fi
    if ! python3 -c 'import labrunner, testcontainers' 2>/dev/null; then
        log "installing labrunner (editable) with pip"
        python3 -m pip install -q -e "$ROOT"
    fi
    # testcontainers' Kafka module imports packaging without depending on it.
    python3 -c 'import packaging' 2>/dev/null || python3 -m pip install -q packaging
}

kafka_libs() {
    python3 - <<'PY'
from labrunner.services.kinds.kafka import fetch_jars, libs_dir
print(libs_dir() or fetch_jars())
PY
}

# --- the daemon ----------------------------------------------------------------------------

daemon_running() {
    docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

daemon_up() {
    if daemon_running; then
        log "daemon already answers on $SOCK"
        return
    fi
    clean_run_dir   # what a daemon stopped without `down` left
    $SUDO mkdir -p "$RUN_DIR" "$CACHE/docker-data"
    # Logs and build contexts are written as us; dockerd (root) writes where it likes.
    $SUDO chown "$(id -u):$(id -g)" "$RUN_DIR"
    # Our own bridge (not docker0), so a system Docker on the same machine is never touched
    # and nothing is left behind: it goes in `down`.
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        $SUDO ip link add "$BRIDGE" type bridge
        $SUDO ip addr add "$BRIDGE_CIDR" dev "$BRIDGE"
    fi
    $SUDO ip link set "$BRIDGE" up
    local group
    group="$(id -gn)"
    log "starting dockerd on $SOCK (data root $CACHE/docker-data)"
    # --iptables=false: this machine may have no usable iptables, and nothing here needs
    # NAT: published ports go through docker-proxy on 127.0.0.1, builds use the host network.
    $SUDO setsid dockerd \
        --host "$DOCKER_HOST" \
        --group "$group" \
        --data-root "$CACHE/docker-data" \
        --exec-root "$RUN_DIR/exec" \
        --pidfile "$RUN_DIR/dockerd.pid" \
        --bridge "$BRIDGE" \
        --iptables=false --ip6tables=false --ip-masq=false \
        --log-level warn \
        >"$RUN_DIR/dockerd.log" 2>&1 </dev/null &
    local deadline=$(( SECONDS + 60 ))
    until daemon_running; do
        if [ $SECONDS -gt $deadline ]; then
            tail -n 30 "$RUN_DIR/dockerd.log" >&2 || true
            die "dockerd did not answer within 60 s"
        fi
        sleep 0.5
    done
    log "dockerd $(docker version --format '{{.Server.Version}}') answers"
}

remove_containers() {
    daemon_running || return 0
    local ids
    # Everything on this private daemon is ours; labrunner's label first, for the log.
    ids="$(docker ps -aq --filter label=labrunner)"
    [ -n "$ids" ] && log "removing labrunner containers: $(echo $ids)"
    ids="$(docker ps -aq)"
    # shellcheck disable=SC2086
    [ -n "$ids" ] && docker rm -f -v $ids >/dev/null
    docker network prune -f >/dev/null 2>&1 || true
    docker volume prune -f >/dev/null 2>&1 || true
}

daemon_down() {
    remove_containers || true
    local pid=""
    [ -f "$RUN_DIR/dockerd.pid" ] && pid="$(cat "$RUN_DIR/dockerd.pid" 2>/dev/null || true)"
    if [ -n "$pid" ] && $SUDO kill -0 "$pid" 2>/dev/null; then
        log "stopping dockerd (pid $pid)"
        $SUDO kill -TERM "$pid"
        local deadline=$(( SECONDS + 30 ))
        while $SUDO kill -0 "$pid" 2>/dev/null; do
            if [ $SECONDS -gt $deadline ]; then
                log "dockerd still running after 30 s: SIGKILL"
                $SUDO kill -KILL "$pid" || true
                break
            fi
            sleep 0.2
        done
    fi
    # The containerd dockerd started for itself goes with it; check, by its pid file.
    local cpid
    cpid="$(cat "$RUN_DIR/exec/containerd/containerd.pid" 2>/dev/null || true)"
    if [ -n "$cpid" ] && $SUDO kill -0 "$cpid" 2>/dev/null; then
        $SUDO kill -TERM "$cpid" || true
    fi
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        $SUDO ip link delete "$BRIDGE" || true
    fi
    clean_run_dir
}

# Remove the run folder of a daemon that no longer runs, and the mounts it may have left
# (netns files, the overlay of a killed container).
clean_run_dir() {
    [ -d "$RUN_DIR" ] || return 0
    local mounts
    mounts="$(grep -o " $RUN_DIR[^ ]*" /proc/self/mounts 2>/dev/null | sort -r || true)"
    local mnt
    for mnt in $mounts; do
        $SUDO umount -l "$mnt" 2>/dev/null || true
    done
    $SUDO rm -rf "$RUN_DIR"
}

# --- images ----------------------------------------------------------------------------------

# The Debian mirror this machine's apt uses: the URI of the first source for $SUITE.
apt_mirror() {
    local uri=""
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri="$(awk -v suite="$SUITE" '
            BEGIN { RS=""; FS="\n" }
            {
                uris=""; suites=""; types=""
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/)   { uris=$i;   sub(/^URIs:[ \t]*/, "", uris) }
                    if ($i ~ /^Suites:/) { suites=$i; sub(/^Suites:[ \t]*/, "", suites) }
                    if ($i ~ /^Types:/)  { types=$i }
                }
                n = split(suites, s, /[ \t]+/)
                for (j = 1; j <= n; j++) if (s[j] == suite && types ~ /deb( |$)/) {
                    split(uris, u, /[ \t]+/); print u[1]; exit
                }
            }' "$f")"
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri="$(awk -v suite="$SUITE" '$1 == "deb" {
                  i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                  if ($(i+1) == suite) { print $i; exit } }' /etc/apt/sources.list)"
    fi
    [ -n "$uri" ] || die "no Debian $SUITE source in /etc/apt/sources.list{,.d}: cannot debootstrap"
    echo "$uri"
}

# The debootstrapped Debian base, made once and cached: this stage imports it as the base
# image, the pristine-root stage unpacks it for each run. The two stages may run side by
# side (scripts/test.sh), so the first makes it under a lock and the other waits for it.
base_tarball() {
    local tarball="$CACHE/debian-$SUITE-minbase.tar" lock="/tmp/labrunner-base-$SUITE.lock"
    [ -s "$tarball" ] && return 0
    [ -e "$lock" ] || : >"$lock"
    exec 8<"$lock"
    flock 8
    if [ ! -s "$tarball" ]; then
        local mirror rootfs start=$SECONDS
        mirror="$(apt_mirror)"
        rootfs="$CACHE/rootfs-$SUITE.$$"
        log "debootstrap $SUITE (minbase) from this machine's apt mirror"
        $SUDO mkdir -p "$CACHE"
        $SUDO rm -rf "$rootfs"
        $SUDO debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" \
            >"$CACHE/debootstrap.log" 2>&1 || { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
        $SUDO chroot "$rootfs" apt-get clean
        $SUDO rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
        $SUDO tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" .
        $SUDO mv "$tarball.tmp" "$tarball"
        $SUDO rm -rf "$rootfs"
        log "debootstrap done in $(elapsed $start)"
    fi
    flock -u 8
    exec 8<&-
}

base_image() {
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "base image $BASE_IMAGE: cached"
        return
    fi
    local tarball="$CACHE/debian-$SUITE-minbase.tar"
    base_tarball
    docker import --change 'CMD ["bash"]' --change 'ENV LANG=C.UTF-8' \
        "$tarball" "$BASE_IMAGE" >/dev/null
    log "imported $BASE_IMAGE"
}

# build TAG CONTEXT [extra docker build args...]
build() {
    local tag="$1" context="$2" start=$SECONDS
    shift 2
    log "building $tag"
    if ! docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$tag" "$@" \
            "$context" >"$RUN_DIR/build-${tag//[\/:]/_}.log" 2>&1; then
        tail -n 40 "$RUN_DIR/build-${tag//[\/:]/_}.log" >&2
        die "building $tag failed"
    fi
    log "built $tag in $(elapsed $start)"
}

service_images() {
    local stage="$RUN_DIR/contexts"
    $SUDO mkdir -p "$stage"
    $SUDO chown "$(id -u):$(id -g)" "$stage"
    local libs
    libs="$(kafka_libs)" || die "no Kafka jars (labrunner setup --kafka)"
    # The image tags are the official names, so the docker backend's defaults resolve to
    # these local images and nothing is pulled.
    build postgres:15 "$ROOT/docker/images/postgres"
    build redis:7 "$ROOT/docker/images/redis"
    build rabbitmq:3-management "$ROOT/docker/images/rabbitmq"
    build prom/prometheus:v2.42.0 "$ROOT/docker/images/prometheus"
    rm -rf "$stage/kafka"
    cp -r "$ROOT/docker/images/kafka" "$stage/kafka"
    cp -r "$libs" "$stage/kafka/kafka-libs"
    build apache/kafka:4.3.1 "$stage/kafka"
    # ph6.7 builds the learner's multi-stage Dockerfile: its pinned bases are replaced by these.
    build labrunner/gcc:ci "$ROOT/docker/images/gcc"
}

labrunner_image() {
    local stage="$RUN_DIR/contexts/labrunner"
    rm -rf "$stage"
    mkdir -p "$stage"
    # The repository as git sees it (tracked and new files, nothing ignored), plus what the
    # build may not fetch by itself: the wheels of labrunner's dependencies, cached here, and
    # the Kafka jars of the local backend.
    (cd "$ROOT" && git -c safe.directory="$ROOT" ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null --no-recursion -T - -cf -) | tar -C "$stage" -xf -
    # The wheels are made by the image's own Python (its version decides environment
    # markers), in a container on the host network, with this machine's pip settings and CA
    # bundle lent for the run only (nothing of them goes into an image).
    build labrunner/python:ci "$stage" -f "$stage/docker/Dockerfile" --target python
    local wheels="$CACHE/wheelhouse"
    $SUDO mkdir -p "$wheels"
    local pip_env=() ca=""
    for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT; do
        [ -n "${!var:-}" ] && pip_env+=(-e "$var=${!var}")
    done
    ca="${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-}}}"
    if [ -z "$ca" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        ca=/etc/ssl/certs/ca-certificates.crt
    fi
    [ -n "$ca" ] && pip_env+=(-v "$ca:/run/host-ca.crt:ro" -e PIP_CERT=/run/host-ca.crt)
    # Made again only when the dependencies (pyproject.toml) or the Python image change.
    local stamp
    stamp="$wheels/.made-for-$( (cat "$stage/pyproject.toml"; docker image inspect \
        --format '{{.Id}}' labrunner/python:ci) | sha256sum | cut -c1-16)"
    if [ -f "$stamp" ]; then
        log "wheelhouse: cached"
    else
        log "wheelhouse for labrunner's dependencies ($wheels)"
        if ! docker run --rm --network host --label labrunner=1 --label labrunner.role=ci \
                "${pip_env[@]}" -v "$stage:/src:ro" -v "$wheels:/wheels" labrunner/python:ci \
                sh -c 'cp -r /src /tmp/src && python3 -m venv /tmp/v && /tmp/v/bin/pip wheel -q --disable-pip-version-check \
                       --wheel-dir /wheels --find-links /wheels /tmp/src "setuptools>=68" wheel' \
                >"$RUN_DIR/wheelhouse.log" 2>&1; then
            tail -n 30 "$RUN_DIR/wheelhouse.log" >&2
            die "building the wheelhouse failed"
        fi
        $SUDO rm -f "$wheels"/labrunner-*.whl "$wheels"/.made-for-*
        $SUDO touch "$stamp"
    fi
    cp -r "$wheels" "$stage/docker/wheelhouse"
    cp -r "$(kafka_libs)" "$stage/docker/kafka-libs"
    # The builder stage tagged too: untagged, the prune below removed it and every run
    # installed all the dependencies again (minutes), whatever had changed.
    build labrunner/builder:ci "$stage" -f "$stage/docker/Dockerfile" --target builder
    build "$LABRUNNER_IMAGE" "$stage" -f "$stage/docker/Dockerfile"
    # Images replaced by this build: the cache keeps only what the next run can use.
    docker image prune -f >/dev/null
}

# --- runs ------------------------------------------------------------------------------------

run_tests() {
    mkdir -p "$OUT_DIR"
    local start=$SECONDS status=0
    log "tests/test_docker_backend.py against the daemon"
    python3 -m pytest -q -p no:cacheprovider "$ROOT/tests/test_docker_backend.py" \
        --junitxml "$OUT_DIR/test_docker_backend.xml" || status=$?
    log "backend tests: exit $status in $(elapsed $start)"
    [ $status -eq 0 ] || return $status

    start=$SECONDS
    local phases=()
    local p
    for p in $PHASES; do
        if [ -d "$ROOT/labs/$p" ]; then
            phases+=("$p")
        else
            log "no labs/$p yet: skipped"
        fi
    done
    if [ ${#phases[@]} -gt 0 ]; then
        log "labrunner run ${phases[*]} --solutions --backend docker"
        # Three labs at a time: a lab mostly waits on its containers (labs that restart a
        # service still run alone), and this is the one place `run --jobs` meets an engine.
        # --no-keep, here and below: a CI run leaves no warm set (nor its reaper waiting out
        # the idle deadline after the stage, and the daemon, are gone).
        (cd "$ROOT" && labrunner run "${phases[@]}" --solutions --backend docker --jobs 3 \
            --no-keep --json "$OUT_DIR/docker-backend.json" \
            --junit "$OUT_DIR/docker-backend.xml") || status=$?
        log "phases on the docker backend: exit $status in $(elapsed $start)"
        start=$SECONDS
        log "labrunner run ${phases[*]} --starters --expect-fail --backend docker"
        (cd "$ROOT" && labrunner run "${phases[@]}" --starters --expect-fail --backend docker \
            --jobs 3 --no-keep --json "$OUT_DIR/docker-starters.json") || status=$?
        log "starters on the docker backend (all must fail): exit $status in $(elapsed $start)"
    fi
    start=$SECONDS
    # ph6.7's build-and-run check needs an engine: here it must run, not be left out.
    log "ph6.7 docker-multistage: the reference Dockerfile built and run on stand-in bases"
    (cd "$ROOT" && LABRUNNER_REQUIRE_DOCKER=1 \
        LABRUNNER_DOCKER_STANDINS="builder=labrunner/gcc:ci runtime=$BASE_IMAGE" \
        labrunner run ph6.7 --solutions --no-keep --json "$OUT_DIR/docker-multistage.json") \
        || status=$?
    log "ph6.7 in docker: exit $status in $(elapsed $start)"
    return $status
}

run_in_image() {
    local start=$SECONDS status=0
    log "labrunner run $IN_IMAGE_SELECTORS --solutions --backend local, inside $LABRUNNER_IMAGE"
    # No network at all: the image must hold everything the local backend needs.
    docker run --rm --network none --label labrunner=1 --label labrunner.role=ci \
        -e LABRUNNER_BACKEND=local "$LABRUNNER_IMAGE" \
        run $IN_IMAGE_SELECTORS --solutions --backend local --jobs 2 || status=$?
    log "in-image run: exit $status in $(elapsed $start)"
    return $status
}

benchmark() {
    log "benchmark: time to ready, docker against local"
    python3 "$ROOT/benchmarks/bench_docker_vs_local.py" --rounds "${LABRUNNER_BENCH_ROUNDS:-3}" \
        --json "$OUT_DIR/bench_docker_vs_local.json" || log "benchmark failed (not fatal)"
}

# --- entry points ----------------------------------------------------------------------------

cmd_up() {
    local start=$SECONDS
    ensure_packages
    daemon_up
    base_image
    service_images
    log "ready in $(elapsed $start): export DOCKER_HOST=$DOCKER_HOST"
    echo "export DOCKER_HOST=$DOCKER_HOST TESTCONTAINERS_RYUK_DISABLED=true TESTCONTAINERS_CONNECTION_MODE=docker_host"
}

cmd_all() {
    local start=$SECONDS status=0
    trap 'daemon_down' EXIT
    trap 'exit 130' INT TERM
    cmd_up >/dev/null
    local t=$SECONDS
    labrunner_image
    run_tests || status=$?
    run_in_image || status=$?
    if [ "${LABRUNNER_DOCKER_BENCH:-1}" = 1 ]; then benchmark; fi
    log "docker stage: exit $status in $(elapsed $start) (images ready after $(( t - start ))s)"
    return $status
}

case "${1:-all}" in
    all) cmd_all ;;
    up) cmd_up ;;
    down) daemon_down ;;
    images) daemon_up; base_image; service_images; labrunner_image ;;
    tests) run_tests ;;
    in-image) run_in_image ;;
    bench) benchmark ;;
    mirror) apt_mirror ;;
    base-tarball) base_tarball ;;
    *) echo "usage: $0 [all|up|down|images|tests|in-image|bench|mirror|base-tarball]" >&2; exit 2 ;;
esac
