"""``labrunner doctor`` and the set-up it reports on: versions parsed from the tools' own
output, what is missing with its fix, the launcher, and set-up's refusal to half-install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from labrunner import doctor

from .conftest import cli_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("parse", "text", "expected"), [
    (doctor.postgres_version, "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n", "15.18"),
    (doctor.redis_version,
     "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=ae4d7c971a\n",
     "7.0.15"),
    (doctor.java_version, 'openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment '
                          '(build 17.0.15+6-Debian-1deb12u1)\n', "17.0.15"),
    (doctor.java_version, 'java version "21.0.2" 2024-01-16 LTS\n', "21.0.2"),
    (doctor.gcc_version, "gcc (Debian 12.2.0-14+deb12u1) 12.2.0\nCopyright (C) 2022\n", "12.2.0"),
    (doctor.make_version, "GNU Make 4.3\nBuilt for x86_64-pc-linux-gnu\n", "4.3"),
    (doctor.postgres_version, "", ""),
    (doctor.java_version, "bash: java: command not found", ""),
])
def test_versions_are_read_from_the_tools_own_output(parse, text, expected) -> None:  # type: ignore[no-untyped-def]
    assert parse(text) == expected, (
        f"{parse.__name__} read {parse(text)!r} from {text!r}; expected {expected!r}")


def test_rabbitmq_and_erlang_versions_come_from_their_folders(tmp_path: Path) -> None:
    server = tmp_path / "rabbitmq" / "bin" / "rabbitmq-server"
    server.parent.mkdir(parents=True)
    server.write_text("#!/bin/sh\n")
    (tmp_path / "rabbitmq" / "lib" / "rabbitmq_server-3.12.1").mkdir(parents=True)
    assert doctor.rabbitmq_version(str(server)) == "3.12.1"
    erlang = tmp_path / "erlang"
    (erlang / "releases" / "25").mkdir(parents=True)
    (erlang / "releases" / "25" / "OTP_VERSION").write_text("25.2.3\n")
    assert doctor.erlang_version(erlang) == "25.2.3"
    assert doctor.erlang_version(tmp_path / "nothing") == ""


def test_after_setup_doctor_reports_everything_ready_with_versions() -> None:
    """What CI's set-up installed, doctor must find, each service with its version."""
    done = subprocess.run([sys.executable, "-m", "labrunner.cli", "doctor", "--json"],
                          capture_output=True, text=True, env=cli_env(), timeout=120)
    found = {c["name"]: c for c in json.loads(done.stdout)}
    not_ready = [f"{c['name']}: {c['detail']} ({c['remedy']})" for c in found.values()
                 if not c["ok"]]
    assert done.returncode == 0 and not not_ready, (
        f"doctor after set-up should report everything ready; not ready: {not_ready}")
    for name in ("local postgres", "local redis", "local kafka", "local rabbitmq", "cc",
                 "libpq-dev", "libhiredis-dev", "librdkafka-dev", "python"):
        assert found[name]["version"], (
            f"doctor found {name} ({found[name]['detail']}) but no version: the line should "
            f"say which version it found")
    assert "Java " in found["local kafka"]["detail"]
    assert "Erlang/OTP " in found["local rabbitmq"]["detail"]


def test_a_missing_service_says_what_and_how_to_install_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor._module("postgres"), "bindir", lambda: None)
    check = next(c for c in doctor.checks() if c.name == "local postgres")
    assert not check.ok
    assert "not found" in check.detail and "apt-get install postgresql-15" in check.remedy, check


def test_a_missing_tool_names_its_package(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    check = doctor._tool("cc", "build-essential", doctor.gcc_version, "gcc")
    assert not check.ok and check.remedy == "sudo apt-get install build-essential", check


def test_launcher_written_by_setup_is_recognised(tmp_path: Path) -> None:
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert doctor.LAUNCHER_MARK in setup, "setup.sh and doctor must agree on the launcher mark"
    launcher = tmp_path / "labrunner"
    launcher.write_text(
        f'#!/bin/sh\n{doctor.LAUNCHER_MARK}\nexec "/src/.venv/bin/labrunner" "$@"\n')
    launcher.chmod(0o755)
    check = doctor.launcher_check(str(tmp_path))
    assert check.ok and check.detail == f"{launcher} → /src/.venv/bin/labrunner", check
    missing = doctor.launcher_check(str(tmp_path / "empty"))
    assert missing.detail == "not on the PATH" and "export PATH=" in missing.remedy, missing


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run set-up as another user")
def test_setup_without_root_or_sudo_lists_the_packages_and_creates_nothing() -> None:
    """A user who cannot install: the missing packages and the command, exit 1, and nothing
    made (no out/, no .venv, no launcher). A package that cannot be installed is injected so
    the check does not depend on what this machine lacks."""
    with tempfile.TemporaryDirectory(prefix="labrunner-setup-") as folder:
        _setup_as_nobody(Path(folder))


def _setup_as_nobody(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for script in ("setup.sh", "apt-lib.sh"):   # set-up sources apt-lib.sh
        shutil.copy(REPO / "scripts" / script, repo / "scripts" / script)
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    home = tmp_path / "home"
    home.mkdir()
    for path in (tmp_path, repo, repo / "scripts", home):
        shutil.chown(path, "nobody")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           "LABRUNNER_SETUP_EXTRA_PACKAGES": "labrunner-no-such-package"}
    done = subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], capture_output=True,
                          text=True, env=env, user="nobody", stdin=subprocess.DEVNULL,
                          timeout=60)
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "labrunner-no-such-package" in done.stderr and "apt-get install" in done.stderr, (
        f"the message should list the packages and the command; it was:\n{done.stderr}")
    made = [p.name for p in (repo / "out", repo / ".venv", home / ".local", home / ".cache")
            if p.exists()]
    assert not made, f"set-up stopped but created {made} first"


# --- apt_get (scripts/apt-lib.sh): waiting for another apt instead of failing ----------------

FAKE_APT = """#!/bin/sh
# Stands in for apt-get: the behaviour under test is apt_get's, not apt's. Each call is
# logged with its start and end; the first $LOCKED calls fail as apt does on a held lock.
n=$(($(wc -l < "$CALLS") + 1))
echo "start $$ $(date +%s.%N)" >> "$CALLS.times"
echo "$*" >> "$CALLS"
sleep "${HOLD:-0}"
echo "end $$ $(date +%s.%N)" >> "$CALLS.times"
if [ "$n" -le "${LOCKED:-0}" ]; then
    echo "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 4242 (apt-get)"
    exit 100
fi
if [ -n "$UNKNOWN" ]; then echo "E: Unable to locate package $UNKNOWN"; exit 100; fi
echo "Reading package lists..."
"""


def _apt_get(tmp_path: Path, *args: str, background: bool = False,
             **env: str) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "apt-get").write_text(FAKE_APT)
        (bin_dir / "apt-get").chmod(0o755)
        (tmp_path / "calls").write_text("")
    script = f'. "{REPO}/scripts/apt-lib.sh"; apt_get "" {" ".join(args)}'
    full_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(tmp_path / "calls"),
                "LABRUNNER_APT_LOCK": str(tmp_path / "apt.lock"), "LABRUNNER_APT_RETRY": "0.2",
                **env}
    if background:
        return subprocess.Popen(["bash", "-c", script], env=full_env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(["bash", "-c", script], env=full_env, text=True,
                          capture_output=True, timeout=60)


def test_apt_get_waits_while_another_apt_holds_a_lock(tmp_path: Path) -> None:
    done = _apt_get(tmp_path, "update", LOCKED="2")
    assert isinstance(done, subprocess.CompletedProcess)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert done.returncode == 0 and len(calls) == 3, (
        f"with the lock held for two tries apt_get should try 3 times and succeed; it tried "
        f"{len(calls)} times and returned {done.returncode}: {done.stdout!r} {done.stderr!r}")
    assert "Reading package lists" in done.stdout and "Could not get lock" not in done.stdout
    assert done.stderr.count("waiting") == 1, (
        f"apt_get should say once that it waits, not on every try: {done.stderr!r}")


def test_apt_get_fails_at_once_on_anything_else(tmp_path: Path) -> None:
    done = _apt_get(tmp_path, "install", "-y", "postgresql-155", UNKNOWN="postgresql-155")
    assert isinstance(done, subprocess.CompletedProcess)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert (done.returncode, len(calls)) == (100, 1), (
        f"a misspelt package must fail at once with apt's status 100; apt_get tried "
        f"{len(calls)} times and returned {done.returncode}")
    assert "Unable to locate package postgresql-155" in done.stdout, done.stdout


def test_apt_get_gives_up_when_the_lock_is_never_released(tmp_path: Path) -> None:
    done = _apt_get(tmp_path, "update", LOCKED="1000", LABRUNNER_APT_WAIT="1")
    assert isinstance(done, subprocess.CompletedProcess)
    assert done.returncode == 100 and "Could not get lock" in done.stdout, (
        f"after LABRUNNER_APT_WAIT apt_get must fail with apt's own message; it returned "
        f"{done.returncode}: {done.stdout!r}")


def test_two_apt_gets_at_once_take_turns(tmp_path: Path) -> None:
    """CI's docker and pristine-root stages install beside each other: labrunner's own lock
    makes one wait for the other instead of both racing for apt's."""
    first = _apt_get(tmp_path, "update", background=True, HOLD="0.5")
    second = _apt_get(tmp_path, "update", background=True, HOLD="0.5")
    assert isinstance(first, subprocess.Popen) and isinstance(second, subprocess.Popen)
    assert (first.wait(30), second.wait(30)) == (0, 0)
    times: dict[str, dict[str, float]] = {}
    for line in (tmp_path / "calls.times").read_text().splitlines():
        what, pid, at = line.split()
        times.setdefault(pid, {})[what] = float(at)
    (a_start, a_end), (b_start, b_end) = sorted(
        (t["start"], t["end"]) for t in times.values())
    assert b_start >= a_end, (
        f"two apt_get calls ran apt-get at the same time ({a_start:.2f}-{a_end:.2f} and "
        f"{b_start:.2f}-{b_end:.2f}): they must take turns on labrunner's apt lock")
