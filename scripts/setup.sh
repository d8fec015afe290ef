#!/usr/bin/env bash
# Installs what labrunner needs on Debian 12 (as root, as a sudoer, or - when every Debian
# package is already there - as any user), once; later runs are quick.
#   - Debian packages: Postgres 15 server, redis-server, RabbitMQ + Erlang, a JDK and Maven
#     (for the Kafka broker), a C toolchain and the client libraries the C examples use;
#   - a virtualenv in .venv with labrunner and its Python dependencies;
#   - the Kafka 4.3.1 jars, fetched once through Maven into ~/.cache/labrunner;
#   - a `labrunner` launcher on the PATH: /usr/local/bin as root, ~/.local/bin otherwise
#     ($LABRUNNER_BIN_DIR to choose another folder, LABRUNNER_BIN_DIR=none for no launcher).
# One line per step; what apt, pip and Maven print goes to out/setup.log, shown on failure.
# No system service is started or left running: labrunner starts its own on free ports.
#
# As a user without root or sudo, with packages missing, nothing is created: the packages
# and the command that installs them are printed and the exit status is 1.
# LABRUNNER_SETUP_EXTRA_PACKAGES="a b" adds packages to the list (CI uses it to prove that a
# broken install step - a misspelt package - fails with a clear message).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
# shellcheck source=scripts/apt-lib.sh
. "$REPO/scripts/apt-lib.sh"
START=$SECONDS

say() { printf 'setup: %s\n' "$*"; }
# step NAME TEXT: the one line a step prints.
step() { printf 'setup: %-11s %s\n' "$1" "$2"; }

SUDO=""
CAN_INSTALL=1
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else CAN_INSTALL=0; fi
fi

PACKAGES=(postgresql-15 redis-server rabbitmq-server erlang-base prometheus build-essential
          pkg-config libpq-dev libhiredis-dev librdkafka-dev libssl-dev openssl git patch)
# --tests (scripts/test.sh): what only the test suite needs - Debian's Chromium for the
# roadmap page's browser tests, tmux for the scripted terminal session.
if [ "${1:-}" = "--tests" ]; then
  PACKAGES+=(chromium tmux)
fi
# shellcheck disable=SC2206
PACKAGES+=(${LABRUNNER_SETUP_EXTRA_PACKAGES:-})
missing=()
for p in "${PACKAGES[@]}"; do
  [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
done
# Tools that may come from elsewhere than Debian (a JDK from Temurin, a Python from pyenv):
# only installed when the command is missing.
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
[ -s /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)

# Everything that cannot be done is found out before anything is created.
no_install() {
  {
    say "$1; these Debian packages are missing:"
    echo "    ${missing[*]}"
    echo "  Install them as root, then run this script again:"
    echo "    apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
  } >&2
  exit 1
}
if [ ${#missing[@]} -gt 0 ]; then
  [ "$CAN_INSTALL" = 1 ] || no_install "not root and no sudo"
  if [ -n "$SUDO" ]; then
    # A password prompt is fine on a terminal; without one, sudo must not need it.
    if ! sudo -n true 2>/dev/null && ! { [ -t 0 ] && sudo -v; }; then
      no_install "sudo refused (or it needs a password and there is no terminal)"
    fi
  fi
fi

mkdir -p out
LOG="$REPO/out/setup.log"
: >"$LOG"
# run WHAT CMD...: CMD's output goes to the log; on failure, the log's end and exit 1.
run() {
  local what="$1"; shift
  echo "+ $*" >>"$LOG"
  if ! "$@" >>"$LOG" 2>&1; then
    {
      say "$what failed. The end of $LOG:"
      tail -n 40 "$LOG" | sed 's/^/    /'
    } >&2
    exit 1
  fi
}

# --- Debian packages ------------------------------------------------------------------------
t=$SECONDS
if [ ${#missing[@]} -gt 0 ]; then
  # Waits (saying so) while another apt runs: apt-daily on a fresh machine, for one.
  echo "+ apt-get update" >>"$LOG"
  if ! apt_get "$SUDO" update >>"$LOG"; then
    { say "apt-get update failed. The end of $LOG:"; tail -n 40 "$LOG" | sed 's/^/    /'; } >&2
    exit 1
  fi
  # A misspelt or unavailable name fails here, before anything is installed.
  unknown=()
  for p in "${missing[@]}"; do
    apt-cache show --no-all-versions "$p" >/dev/null 2>&1 || unknown+=("$p")
  done
  if [ ${#unknown[@]} -gt 0 ]; then
    say "no Debian package named: ${unknown[*]} (misspelt, or not in this machine's apt sources); nothing was installed" >&2
    exit 1
  fi
  epmd_before=""
  command -v pgrep >/dev/null 2>&1 && epmd_before=$(pgrep -x epmd || true)
  # Package scripts must not start system-wide Redis/RabbitMQ/Postgres/Prometheus:
  # policy-rc.d says no.
  policy_added=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    policy_added=1
  fi
  status=0
  apt_get "$SUDO" install -y --no-install-recommends "${missing[@]}" >>"$LOG" || status=$?
  if [ -n "$policy_added" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
  if [ $status -ne 0 ]; then
    { say "apt-get install failed. The end of $LOG:"; tail -n 40 "$LOG" | sed 's/^/    /'; } >&2
    exit 1
  fi
  # Debian's prometheus package enables a system-wide server for the next boot: the runner
  # starts its own, so keep that one off (policy-rc.d already kept it from starting now).
  if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  # RabbitMQ's package scripts may start an epmd on the standard port; stop it if it is new.
  if [ -z "$epmd_before" ] && command -v pgrep >/dev/null 2>&1 && pgrep -x epmd >/dev/null; then
    $SUDO pkill -x epmd || true
  fi
  step packages "installed ${#missing[@]} with apt in $((SECONDS - t)) s: ${missing[*]}"
else
  step packages "all ${#PACKAGES[@]} Debian packages, java and mvn already there"
fi

# --- virtualenv -----------------------------------------------------------------------------
t=$SECONDS
# Made again only when pyproject.toml changed since the last set-up.
stamp=".venv/.labrunner-setup-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && .venv/bin/python -c 'import labrunner' 2>/dev/null; then
  step virtualenv ".venv up to date ($(.venv/bin/python -V 2>&1))"
else
  if [ ! -x .venv/bin/python ]; then
    run "making the virtualenv" "$PYTHON" -m venv .venv
  fi
  run "upgrading pip" .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip
  run "pip install -e .[dev]" .venv/bin/python -m pip install --disable-pip-version-check -e ".[dev]"
  rm -f .venv/.labrunner-setup-*
  touch "$stamp"
  step virtualenv ".venv with labrunner and its dependencies ($(.venv/bin/python -V 2>&1)) in $((SECONDS - t)) s"
fi

# Bytecode for labrunner's own modules, made at every set-up (the sources change with each
# pull): every command imports about 60 of them, and with PYTHONDONTWRITEBYTECODE set (as
# many images and shells do) Python would compile them again at each start (~40 ms).
.venv/bin/python -m compileall -q -j 0 src >/dev/null || true

# --- Kafka jars -----------------------------------------------------------------------------
t=$SECONDS
run "fetching the Kafka jars with Maven" .venv/bin/labrunner setup --kafka
libs=$(.venv/bin/python -c '
try:
    from labrunner.services.kinds.kafka import libs_dir
except ImportError:
    from labrunner.services.local.kafka import libs_dir
print(libs_dir())' 2>/dev/null) || libs="ready"

step "Kafka jars" "$libs ($((SECONDS - t)) s)"

# --- actionlint -----------------------------------------------------------------------------
# ph6.9 lints the learner's workflow with actionlint: a Go program, built once, pinned.
t=$SECONDS
# As root, where every user finds it on the PATH: a graded run (another uid, its own HOME)
# runs ph6.9 too. Otherwise in the user's cache, where the lab looks first.
if [ "$(id -u)" -eq 0 ]; then
  ACTIONLINT_BIN=/usr/local/bin
else
  ACTIONLINT_BIN="${XDG_CACHE_HOME:-$HOME/.cache}/labrunner/bin"
fi
ACTIONLINT_VERSION=v1.7.7
if [ -x "$ACTIONLINT_BIN/actionlint" ]; then
  step actionlint "$ACTIONLINT_BIN/actionlint already built"
elif command -v go >/dev/null 2>&1; then
  mkdir -p "$ACTIONLINT_BIN"
  run "building actionlint with go" env GOBIN="$ACTIONLINT_BIN" GOFLAGS=-mod=mod \
    go install "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"
  step actionlint "$ACTIONLINT_BIN/actionlint $ACTIONLINT_VERSION built in $((SECONDS - t)) s"
else
  step actionlint "skipped: no Go toolchain (ph6.9 needs it: go install github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION)"
fi

# --- launcher -------------------------------------------------------------------------------
MARK="# labrunner launcher (scripts/setup.sh)"
if [ "$(id -u)" -eq 0 ]; then BIN_DIR=${LABRUNNER_BIN_DIR:-/usr/local/bin}; else
  BIN_DIR=${LABRUNNER_BIN_DIR:-$HOME/.local/bin}; fi
if [ "$BIN_DIR" = none ]; then
  step launcher "none (LABRUNNER_BIN_DIR=none): use $REPO/.venv/bin/labrunner"
else
  launcher="$BIN_DIR/labrunner"
  if [ -e "$launcher" ] && ! grep -qF "$MARK" "$launcher" 2>/dev/null; then
    step launcher "$launcher exists and is not ours: left alone; use $REPO/.venv/bin/labrunner"
  else
    mkdir -p "$BIN_DIR"
    printf '#!/bin/sh\n%s\nexec "%s/.venv/bin/labrunner" "$@"\n' "$MARK" "$REPO" >"$launcher.tmp"
    chmod 755 "$launcher.tmp"
    mv "$launcher.tmp" "$launcher"
    case ":$PATH:" in
      *":$BIN_DIR:"*) step launcher "$launcher runs this checkout's labrunner" ;;
      *) step launcher "$launcher runs this checkout's labrunner; $BIN_DIR is not on your PATH:"
         echo "             export PATH=\"$BIN_DIR:\$PATH\""
         if [ "$BIN_DIR" = "$HOME/.local/bin" ]; then
           echo "             (Debian's ~/.profile adds ~/.local/bin to the PATH at your next login)"
         fi ;;
    esac
  fi
fi

say "done in $((SECONDS - START)) s. Next: labrunner doctor, then labrunner init ~/backend-labs"
