#!/usr/bin/env bash
# The README's first command, proven on a pristine Debian 12 in which none of labrunner's
# packages are installed - so what this machine already has cannot hide a missing step.
#
# Two runs, each in a FRESH copy of the debootstrapped Debian 12 (minbase) that the Docker
# stage also uses ($CACHE/debian-bookworm-minbase.tar; made here with debootstrap when
# missing), entered with chroot inside an `unshare`d mount + pid namespace (no Docker):
#
#   root     setup with a misspelt package injected must fail, name it and install nothing;
#            `bash scripts/run-references.sh ph2`, `labrunner doctor`,
#            `bash scripts/run-references.sh ph5` (the JVM and RabbitMQ path), and the
#            README's learner path (`labrunner init`, `cd`, `labrunner list`) on the PATH.
#   learner  a non-root user: without sudo, setup must fail listing the packages and create
#            nothing; then with sudo: `bash scripts/run-references.sh ph2`, `labrunner doctor`
#            and the learner path in a new login shell (the launcher in ~/.local/bin).
#            ph5 too with LABRUNNER_PRISTINE_USER_PH5=1 (not by default, for CI's time).
#
# Every step must pass, and set-up must print no warning banner; any failure fails the stage.
# Downloads happen once: apt's .deb archive, pip's cache and Maven's repository live outside
# the fresh roots, under $CACHE/pristine/<run>, bind-mounted in. Nothing is left running or mounted:
# the namespace's processes die with it (also on failure or Ctrl-C), and the roots are removed.
#
#   LABRUNNER_SKIP_PRISTINE=1          skip the stage (scripts/test.sh honours it)
#   LABRUNNER_PRISTINE_RUNS="root learner"   which runs
#   LABRUNNER_PRISTINE_KEEP=1          keep the roots (under $LABRUNNER_PRISTINE_DIR) to look at
#   LABRUNNER_PRISTINE_PARALLEL=0      the runs one after the other (default: side by side)
#   LABRUNNER_PRISTINE_TMPFS=8g        each root is a tmpfs of at most this size (0: on disk)
#
# The Debian mirror is read from this machine's own apt sources at run time; none is written
# in this repository. Must run as root (CI does).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/apt-lib.sh
. "$ROOT/scripts/apt-lib.sh"
CACHE="${LABRUNNER_DOCKER_CACHE:-/var/cache/labrunner}"
SUITE="${LABRUNNER_DEBIAN_SUITE:-bookworm}"
TARBALL="$CACHE/debian-$SUITE-minbase.tar"
PCACHE="$CACHE/pristine"
WORK="${LABRUNNER_PRISTINE_DIR:-/var/tmp/labrunner-pristine}"
OUT="${LABRUNNER_PRISTINE_OUT:-$ROOT/out/pristine}"
RUNS="${LABRUNNER_PRISTINE_RUNS:-root learner}"
USER_PH5="${LABRUNNER_PRISTINE_USER_PH5:-0}"
TMPFS_SIZE="${LABRUNNER_PRISTINE_TMPFS:-8g}"
PARALLEL="${LABRUNNER_PRISTINE_PARALLEL:-1}"   # the two runs side by side (0: one by one)   # 0: the roots on disk, under $WORK
LEARNER=learner

log() { printf '[pristine %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot and mounts need it)"
for tool in unshare chroot tar; do
    command -v "$tool" >/dev/null || die "$tool not found"
done

STATUS=0
FAILED=()
NS_PID=""
CURRENT=""

# --- the base and the fresh roots ------------------------------------------------------------

base_tarball() {
    if [ -s "$TARBALL" ]; then
        log "base: $TARBALL (cached)"
        return
    fi
    if ! command -v debootstrap >/dev/null && [ ! -x /usr/sbin/debootstrap ]; then
        log "installing debootstrap with apt"
        # The docker stage may be installing its packages beside us: apt_get waits for it.
        apt_get "" update -q >/dev/null || die "apt-get update failed"
        apt_get "" install -y -q --no-install-recommends debootstrap >/dev/null \
            || die "apt-get install debootstrap failed"
    fi
    # Made by the docker stage's script, under its lock: that stage may be making it now.
    LABRUNNER_DOCKER_CACHE="$CACHE" LABRUNNER_DEBIAN_SUITE="$SUITE" \
        bash "$ROOT/docker/ci-docker.sh" base-tarball
    [ -s "$TARBALL" ] || die "no base tarball at $TARBALL"
}

# Mounts under $1 seen from here (none expected: the runs mount in their own namespace).
unmount_under() {
    local mnt
    for mnt in $(awk -v p="$1" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r); do
        umount -l "$mnt" 2>/dev/null || true
    done
}

remove_root() {
    local dir="$1"
    [ -d "$dir" ] || return 0
    unmount_under "$dir"
    rm -rf --one-file-system "$dir"
}

# fresh_root NAME: a new copy of the base, with what any installed Debian has and a
# debootstrapped tree lacks (/etc/hosts, a resolv.conf), plus dpkg's unsafe-io (CI speed).
fresh_root() {
    local dir="$WORK/$1"
    remove_root "$dir"
    mkdir -p "$dir"
    # In memory: unpacking a JDK, Erlang and Postgres and removing them again is what takes
    # the time on a slow disk. umount frees it all at once.
    if [ "$TMPFS_SIZE" != 0 ]; then
        mount -t tmpfs -o "size=$TMPFS_SIZE,mode=755" labrunner-pristine "$dir"
    fi
    tar -C "$dir" --numeric-owner -xf "$TARBALL"
    cp -L /etc/resolv.conf "$dir/etc/resolv.conf"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        "$(hostname)" >"$dir/etc/hosts"
    echo force-unsafe-io >"$dir/etc/dpkg/dpkg.cfg.d/labrunner-ci-unsafe-io"
    # This machine's own trust and pip settings (a proxy's CA, an index), as its admin set
    # them up: the CAs are taken in when set-up installs ca-certificates (and Java's store).
    if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
        cp -r /usr/local/share/ca-certificates/. "$dir/usr/local/share/ca-certificates/"
    fi
    [ ! -f /etc/pip.conf ] || cp /etc/pip.conf "$dir/etc/pip.conf"
    echo "$dir"
}

# copy_repo DEST: the repository as git sees it (tracked and new files, nothing ignored).
copy_repo() {
    local dest="$1"
    mkdir -p "$dest"
    (cd "$ROOT" && git -c safe.directory="$ROOT" ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null --no-recursion -T - -cf -) | tar -C "$dest" -xf -
}

# --- running inside ------------------------------------------------------------------------

# inside DIR HOME WHO SCRIPT: SCRIPT in a login bash in the root DIR, as WHO (root or the
# learner), in a private mount and pid namespace: /proc, /sys, /dev, a private /dev/shm and
# the download caches are mounted there only, and every process in it dies with it.
inside() {
    local dir="$1" home="$2" who="$3" script="$4"
    local uid gid
    uid="$(chroot "$dir" id -u "$who")"
    gid="$(chroot "$dir" id -g "$who")"
    mkdir -p "$RUN_CACHE/apt-archives/partial" "$RUN_CACHE/pip" "$RUN_CACHE/m2" \
        "$dir/var/cache/apt/archives" "$dir$home/.cache/pip" "$dir$home/.m2"
    # pip wants its cache owned by whoever runs it (root: by root); the root owns home itself.
    chown -R "$uid:$gid" "$RUN_CACHE/pip" "$RUN_CACHE/m2" "$dir$home/.cache" "$dir$home/.m2"
    unshare --mount --propagation private --pid --fork --kill-child -- bash -c '
        set -e
        dir=$1 home=$2 who=$3 pcache=$4 script=$5
        mount -t proc proc "$dir/proc"
        mount -t sysfs sysfs "$dir/sys"
        mount --rbind /dev "$dir/dev"
        mount -t tmpfs -o mode=1777,size=512m shm "$dir/dev/shm"
        mount --bind "$pcache/apt-archives" "$dir/var/cache/apt/archives"
        mount --bind "$pcache/pip" "$dir$home/.cache/pip"
        mount --bind "$pcache/m2" "$dir$home/.m2"
        exec chroot "$dir" /usr/bin/env -i TERM=dumb LANG=C.UTF-8 \
            /usr/sbin/runuser -l "$who" -c "export LANG=C.UTF-8; set -eo pipefail; $script"
    ' _ "$dir" "$home" "$who" "$RUN_CACHE" "$script" &
    NS_PID=$!
    local status=0
    wait "$NS_PID" || status=$?
    NS_PID=""
    return $status
}

# check RUN NAME DIR HOME WHO SCRIPT: one step, its output in $OUT/RUN-NAME.log, one line.
check() {
    local run="$1" name="$2" dir="$3" home="$4" who="$5" script="$6"
    local logf="$OUT/$run-$name.log" start=$SECONDS status=0
    inside "$dir" "$home" "$who" "$script" >"$logf" 2>&1 || status=$?
    if [ $status -eq 0 ]; then
        log "$run: $name ok ($(( SECONDS - start )) s)"
    else
        log "$run: $name FAILED (exit $status, $(( SECONDS - start )) s); the end of $logf:"
        tail -n 40 "$logf" | sed 's/^/    /' >&2
        STATUS=1
        FAILED+=("$run:$name")
    fi
    return $status
}

# Set-up must say what it did in a few lines, with no deprecation or warning banner.
NO_BANNER='if sed "/setup: done in/q" "$OUT_LOG" | grep -inE "warn|deprecat"; then
    echo "set-up printed a warning banner (above)"; exit 1; fi'

# The README's commands, run by whoever the run is for; the learner's part in a new login
# shell, so the launcher must be on the PATH the way the README says.
REFS_PH2='cd ~/labrunner
bash scripts/run-references.sh ph2 2>&1 | tee /tmp/ph2.out
OUT_LOG=/tmp/ph2.out; '"$NO_BANNER"'
grep -q "setup: done in" /tmp/ph2.out'
REFS_PH5='cd ~/labrunner && bash scripts/run-references.sh ph5'
DOCTOR='command -v labrunner; labrunner doctor'
LEARNER_PATH='labrunner init ~/backend-labs && cd ~/backend-labs && labrunner list | tail -n 5
status=0; labrunner run ph0.1 || status=$?
[ $status -eq 1 ] || { echo "labrunner run ph0.1 on the untouched starter exited $status;" \
    "expected 1 (it runs, and fails as a starter does)"; exit 1; }'

root_run() {
    local dir home=/root
    log "root: a fresh Debian $SUITE root"
    dir="$(fresh_root root)"
    CURRENT="$dir"
    copy_repo "$dir/root/labrunner"
    # A broken install step must fail, name what broke, and leave nothing half-done.
    check root misspelt-package "$dir" "$home" root '
        cd ~/labrunner
        status=0
        LABRUNNER_SETUP_EXTRA_PACKAGES=postgresql-155 bash scripts/setup.sh >/tmp/o 2>&1 || status=$?
        cat /tmp/o
        [ $status -ne 0 ] || { echo "setup exited 0 with a misspelt package"; exit 1; }
        grep -q "postgresql-155" /tmp/o || { echo "the message does not name the package"; exit 1; }
        if dpkg-query -W -f="\${Status}" postgresql-15 2>/dev/null | grep -q "ok installed"; then
            echo "postgresql-15 was installed anyway"; exit 1; fi
        [ ! -e .venv ] || { echo ".venv was made anyway"; exit 1; }
        echo "setup refused the misspelt package with exit $status, nothing installed"' || true
    # Each step needs the one before: the first failure ends the run.
    check root run-references-ph2 "$dir" "$home" root "$REFS_PH2" \
        && check root doctor "$dir" "$home" root "$DOCTOR" \
        && check root run-references-ph5 "$dir" "$home" root "$REFS_PH5" \
        && check root learner-path "$dir" "$home" root "$LEARNER_PATH" || true
    cp "$dir/root/labrunner/out/results.json" "$OUT/root-results.json" 2>/dev/null || true
    [ "${LABRUNNER_PRISTINE_KEEP:-0}" = 1 ] || remove_root "$dir"
    CURRENT=""
}

learner_run() {
    local dir home="/home/$LEARNER"
    log "learner: a fresh Debian $SUITE root, a non-root user"
    dir="$(fresh_root learner)"
    CURRENT="$dir"
    chroot "$dir" useradd -m -s /bin/bash "$LEARNER"
    copy_repo "$dir$home/labrunner"
    chroot "$dir" chown -R "$LEARNER:$LEARNER" "$home/labrunner"
    # Without sudo: the packages and the command to install them, exit 1, nothing created.
    check learner without-sudo "$dir" "$home" "$LEARNER" '
        cd ~/labrunner
        status=0
        bash scripts/setup.sh >/tmp/o 2>&1 || status=$?
        cat /tmp/o
        [ $status -ne 0 ] || { echo "setup exited 0 without root or sudo"; exit 1; }
        grep -q "postgresql-15" /tmp/o && grep -q "apt-get install" /tmp/o \
            || { echo "the message does not list the packages and the command"; exit 1; }
        for f in .venv out ~/.cache/labrunner ~/.local/bin/labrunner; do
            [ ! -e "$f" ] || { echo "$f was created anyway"; exit 1; }
        done
        echo "setup stopped with exit $status, listing the packages; nothing created"' || true
    # Now a sudoer, as on a developer's machine (sudo itself is not part of the proof).
    local start=$SECONDS
    if inside "$dir" /root root '
            apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends sudo
            rm -rf /var/lib/apt/lists/*
            echo "'"$LEARNER"' ALL=(ALL) NOPASSWD:ALL" >/etc/sudoers.d/learner
            chmod 440 /etc/sudoers.d/learner' >"$OUT/learner-sudo.log" 2>&1; then
        log "learner: sudo installed for the user ($(( SECONDS - start )) s)"
        check learner run-references-ph2 "$dir" "$home" "$LEARNER" "$REFS_PH2" \
            && check learner doctor "$dir" "$home" "$LEARNER" "$DOCTOR" \
            && { [ "$USER_PH5" != 1 ] \
                 || check learner run-references-ph5 "$dir" "$home" "$LEARNER" "$REFS_PH5"; } \
            && check learner learner-path "$dir" "$home" "$LEARNER" "$LEARNER_PATH" || true
    else
        log "learner: installing sudo failed; see $OUT/learner-sudo.log"
        STATUS=1
        FAILED+=("learner:sudo")
    fi
    cp "$dir$home/labrunner/out/results.json" "$OUT/learner-results.json" 2>/dev/null || true
    [ "${LABRUNNER_PRISTINE_KEEP:-0}" = 1 ] || remove_root "$dir"
    CURRENT=""
}

cleanup() {
    if [ -n "$NS_PID" ] && kill -0 "$NS_PID" 2>/dev/null; then
        # --kill-child: the namespace's first process, and so all of it, dies with unshare.
        kill -TERM "$NS_PID" 2>/dev/null || true
        sleep 1
        kill -KILL "$NS_PID" 2>/dev/null || true
        wait "$NS_PID" 2>/dev/null || true
    fi
    if [ -n "$CURRENT" ] && [ "${LABRUNNER_PRISTINE_KEEP:-0}" != 1 ]; then
        remove_root "$CURRENT"
    fi
}

# start_run NAME: the run in a subshell of its own (its own namespace, root and caches -
# apt locks its archive folder, so each run has its own), in the background when parallel.
RUN_PIDS=()
start_run() {
    (
        RUN_CACHE="$PCACHE/$1"
        STATUS=0
        FAILED=()
        trap cleanup EXIT
        trap 'exit 130' INT TERM
        "$1_run"
        printf '%s\n' "${FAILED[@]}" >"$OUT/$1.failed"
        exit "$STATUS"
    ) &
    RUN_PIDS+=($!)
    if [ "$PARALLEL" != 1 ]; then wait_runs; fi
}

wait_runs() {
    local pid
    for pid in "${RUN_PIDS[@]}"; do
        wait "$pid" || STATUS=1
    done
    RUN_PIDS=()
}

stop_runs() {
    local pid
    for pid in "${RUN_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${RUN_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    RUN_PIDS=()
}

main() {
    local start=$SECONDS
    trap stop_runs EXIT
    trap 'exit 130' INT TERM
    mkdir -p "$OUT" "$WORK" "$PCACHE"
    # One stage at a time on a machine: the roots and the caches are shared.
    exec 9>"$WORK/.lock"
    flock -n 9 || { log "another pristine stage runs on this machine; waiting for it"; flock 9; }
    rm -f "$OUT"/*.log "$OUT"/*.failed
    base_tarball
    local run
    for run in $RUNS; do
        case "$run" in
            root|learner) start_run "$run" ;;
            *) die "unknown run $run (root, learner)" ;;
        esac
    done
    wait_runs
    if [ $STATUS -eq 0 ]; then
        log "pristine stage: passed in $(( SECONDS - start )) s"
    else
        log "pristine stage: FAILED ($(cat "$OUT"/*.failed 2>/dev/null | xargs)) in" \
            "$(( SECONDS - start )) s; logs in $OUT"
    fi
    return $STATUS
}

main "$@"
