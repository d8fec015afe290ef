#!/usr/bin/env bash
# Installs what labrunner needs on Debian 12 (root or a sudoer), once; later runs are quick.
#   - Debian packages: Postgres 15 server, redis-server, RabbitMQ + Erlang, a JDK and Maven
#     (for the Kafka broker), a C toolchain and the client libraries the C examples use;
#   - a virtualenv in .venv with labrunner and its Python dependencies;
#   - the Kafka 4.3.1 jars, fetched once through Maven into ~/.cache/labrunner.
# No system service is started or left running: labrunner starts its own on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup: not root and no sudo: install the packages listed in scripts/setup.sh by hand" >&2
  fi
fi

PACKAGES=(postgresql-15 redis-server rabbitmq-server erlang-base prometheus build-essential pkg-config
          libpq-dev libhiredis-dev librdkafka-dev libssl-dev openssl git patch)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Tools that may come from elsewhere than Debian (a JDK from Temurin, a Python from pyenv):
# only installed when the command is missing.
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  epmd_before=$(pgrep -x epmd || true)
  # Package scripts must not start system-wide Redis/RabbitMQ/Postgres/Prometheus:
  # policy-rc.d says no.
  policy_added=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    policy_added=1
  fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  [ -n "$policy_added" ] && $SUDO rm -f /usr/sbin/policy-rc.d
  # RabbitMQ's package scripts start an epmd on the standard port; stop it if it is new.
  if [ -z "$epmd_before" ] && pgrep -x epmd >/dev/null; then $SUDO pkill -x epmd || true; fi
  # Debian's prometheus package enables a system-wide server for the next boot: the runner
  # starts its own, so keep that one off (policy-rc.d already kept it from starting now).
  if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/labrunner setup --kafka
# actionlint (ph6.9 lints the learner's workflow with it): a Go program, built once, pinned.
ACTIONLINT_BIN="${XDG_CACHE_HOME:-$HOME/.cache}/labrunner/bin"
[ -x "$ACTIONLINT_BIN/actionlint" ] || { command -v go >/dev/null 2>&1 && mkdir -p "$ACTIONLINT_BIN" && GOBIN="$ACTIONLINT_BIN" GOFLAGS=-mod=mod go install github.com/rhysd/actionlint/cmd/actionlint@v1.7.7 2>/dev/null; } || echo "setup: no Go toolchain: ph6.9 needs actionlint (go install github.com/rhysd/actionlint/cmd/actionlint@v1.7.7)" >&2
echo "setup: done. Try: .venv/bin/labrunner doctor"
