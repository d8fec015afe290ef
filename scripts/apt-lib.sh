# shellcheck shell=bash
# apt for labrunner's scripts, sourced by scripts/setup.sh, docker/ci-docker.sh and
# scripts/ci-pristine-root.sh: one function, apt_get, that waits for another apt instead of
# failing at once.
#
# Why: apt's DPkg::Lock::Timeout waits for dpkg's lock only. `apt-get update` fails at once
# on the package lists' lock ("Could not get lock /var/lib/apt/lists/lock"), and that lock
# is often held on a fresh machine: Debian's apt-daily runs `apt-get update` minutes after
# the first boot. CI's docker and pristine-root stages also install beside each other.

LABRUNNER_APT_LOCK=${LABRUNNER_APT_LOCK:-/tmp/labrunner-apt.lock}  # our own scripts queue here
LABRUNNER_APT_WAIT=${LABRUNNER_APT_WAIT:-600}   # seconds to wait for another apt
LABRUNNER_APT_RETRY=${LABRUNNER_APT_RETRY:-3}   # seconds between tries

# apt_get SUDO ARGS...: `apt-get ARGS` (noninteractive, as SUDO: "" or "sudo"), its output on
# stdout. While another apt holds one of its locks, tried again every $LABRUNNER_APT_RETRY s
# for up to $LABRUNNER_APT_WAIT s; any other failure returns at once with apt's status.
apt_get() {
    local sudo=$1; shift
    local out status deadline=$((SECONDS + LABRUNNER_APT_WAIT)) waited=""
    [ -e "$LABRUNNER_APT_LOCK" ] || { : >"$LABRUNNER_APT_LOCK"; chmod 666 "$LABRUNNER_APT_LOCK"; } \
        2>/dev/null || true
    out=$(mktemp)
    while :; do
        status=0
        # Our lock first, when we may read it (another user's, made unreadable: apt's own
        # locks still hold, and the retry below waits for them).
        (
            if [ -r "$LABRUNNER_APT_LOCK" ]; then exec 7<"$LABRUNNER_APT_LOCK"; flock 7; fi
            # shellcheck disable=SC2086
            exec $sudo env DEBIAN_FRONTEND=noninteractive \
                apt-get -o DPkg::Lock::Timeout="$LABRUNNER_APT_WAIT" "$@"
        ) >"$out" 2>&1 || status=$?
        if [ "$status" -ne 0 ] && grep -q "Could not get lock" "$out" \
                && [ "$SECONDS" -lt "$deadline" ]; then
            if [ -z "$waited" ]; then
                echo "apt-get $1: another apt holds its lock; waiting (up to ${LABRUNNER_APT_WAIT} s)" >&2
                waited=1
            fi
            sleep "$LABRUNNER_APT_RETRY"
            continue
        fi
        cat "$out"
        rm -f "$out"
        return "$status"
    done
}
