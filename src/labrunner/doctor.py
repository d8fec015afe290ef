"""``labrunner doctor``: which backend would run, what was found (with its version), and what
is missing with the command that fixes it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from .services.manager import docker_answers, resolve_backend_name

#: The first line of the launcher ``scripts/setup.sh`` writes (see there).
LAUNCHER_MARK = "# labrunner launcher (scripts/setup.sh)"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    remedy: str = ""
    version: str = ""


# --- versions: each from the tool itself, parsed by a pure function ----------------------------


def _output(cmd: list[str]) -> str:
    """What ``cmd`` prints (stdout and stderr: ``java -version`` writes to stderr); "" when it
    cannot run."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or "") + (done.stderr or "")


def _first(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    return found.group(1) if found else ""


def postgres_version(text: str) -> str:
    """``postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`` → ``15.18``."""
    return _first(r"PostgreSQL\)?\s+(\d+(?:\.\d+)*)", text)


def redis_version(text: str) -> str:
    """``Redis server v=7.0.15 sha=...`` → ``7.0.15``."""
    return _first(r"\bv=(\d+(?:\.\d+)*)", text)


def java_version(text: str) -> str:
    """``openjdk version "17.0.15" 2025-04-15`` → ``17.0.15``."""
    return _first(r'version\s+"([^"]+)"', text)


def gcc_version(text: str) -> str:
    """``gcc (Debian 12.2.0-14+deb12u1) 12.2.0`` → ``12.2.0`` (the last word of line one)."""
    line = text.splitlines()[0] if text.strip() else ""
    return _first(r"(\d+(?:\.\d+)+)\s*$", line)


def make_version(text: str) -> str:
    """``GNU Make 4.3`` → ``4.3``."""
    return _first(r"Make\s+(\d+(?:\.\d+)*)", text)


def rabbitmq_version(server: str | None) -> str:
    """From the server's own folder: ``/usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8``."""
    roots = [Path("/usr/lib/rabbitmq/lib")]
    if server:
        roots.insert(0, Path(server).resolve().parent.parent / "lib")
    for root in roots:
        found = sorted(root.glob("rabbitmq_server-*")) if root.is_dir() else []
        if found:
            return found[-1].name.removeprefix("rabbitmq_server-")
    return ""


def erlang_version(root: Path = Path("/usr/lib/erlang")) -> str:
    """Erlang/OTP's full version, from ``releases/<major>/OTP_VERSION``."""
    for path in sorted(root.glob("releases/*/OTP_VERSION")):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            return text
    return ""


def _pkg_config(module: str) -> str:
    """The library's version as pkg-config knows it; "" without pkg-config or the module."""
    if not shutil.which("pkg-config"):
        return ""
    lines = _output(["pkg-config", "--modversion", module]).strip().splitlines()
    return lines[0] if lines and re.match(r"\d", lines[0]) else ""


# --- the checks ---------------------------------------------------------------------------


def _module(name: str) -> Any:
    """A service's module: ``services/kinds/<name>.py``."""
    return import_module(f"{__package__}.services.kinds.{name}")


def _services() -> list[tuple[str, Any]]:
    """(name, kind) for every service, in the order a run starts them."""
    from .services.base import kinds

    return [(kind.name, kind) for kind in kinds()]


def _service(name: str, service: Any,
             found: Callable[[], tuple[str, str]] | None) -> Check:
    """A local service: its own ``missing()`` decides; ``found`` gives the version and what
    was found, for the line."""
    reason = service.missing()
    if reason is not None:
        first, _, rest = reason.partition(". ")
        return Check(f"local {name}", False, first, rest or reason)
    version, detail = found() if found else ("", "ready to start")
    return Check(f"local {name}", True, detail, version=version)


def _postgres() -> tuple[str, str]:
    postgres = _module("postgres")
    bins = postgres.bindir()
    version = postgres_version(_output([str(bins / "postgres"), "--version"])) if bins else ""
    return version, f"PostgreSQL {version or '?'} ({bins})"


def _redis() -> tuple[str, str]:
    redis = _module("redis")
    exe = redis.binary() or ""
    version = redis_version(_output([exe, "--version"]))
    return version, f"redis-server {version or '?'} ({exe})"


def _kafka() -> tuple[str, str]:
    kafka = _module("kafka")
    exe = kafka.java() or ""
    libs = kafka.libs_dir()
    jars = len(list(libs.glob("*.jar"))) if libs else 0
    java = java_version(_output([exe, "-version"]))
    return kafka.KAFKA_VERSION, (f"Kafka {kafka.KAFKA_VERSION} ({jars} jars in {libs}), "
                                 f"Java {java or '?'}")


def _prometheus() -> tuple[str, str]:
    exe = _module("prometheus").binary() or ""
    version = _first(r"version\s+(\d+(?:\.\d+)*)", _output([exe, "--version"]))
    return version, f"Prometheus {version or '?'} ({exe})"


def _rabbitmq() -> tuple[str, str]:
    rabbitmq = _module("rabbitmq")
    version = rabbitmq_version(rabbitmq.server())
    return version, f"RabbitMQ {version or '?'}, Erlang/OTP {erlang_version() or '?'}"


def _tool(name: str, package: str, parse: Callable[[str], str], label: str) -> Check:
    found = shutil.which(name)
    if not found:
        return Check(name, False, "not found", f"sudo apt-get install {package}")
    version = parse(_output([found, "--version"]))
    return Check(name, True, f"{label} {version or '?'} ({found})", version=version)


def _headers(package: str, header: str, module: str, label: str) -> Check:
    if not os.path.exists(header):
        return Check(package, False, "headers missing", f"sudo apt-get install {package}")
    version = _pkg_config(module)
    return Check(package, True, f"{label} {version or '?'} ({header})", version=version)


def _python() -> Check:
    from . import __version__

    version = ".".join(map(str, sys.version_info[:3]))
    return Check("python", True, f"Python {version}, labrunner {__version__} ({sys.prefix})",
                 version=version)


def launcher_check(path_env: str | None = None) -> Check:
    """Is ``labrunner`` on the PATH (the README's learner commands need it)? Informational:
    ``.venv/bin/labrunner`` works without it."""
    found = shutil.which("labrunner", path=path_env)
    if found is None:
        local_bin = Path.home() / ".local" / "bin"
        return Check("labrunner on PATH", True, "not on the PATH",
                     "bash scripts/setup.sh puts a launcher in /usr/local/bin (root) or "
                     f"{local_bin}; if that is not on your PATH: "
                     f'export PATH="{local_bin}:$PATH"')
    detail = found
    try:
        text = Path(found).read_text(encoding="utf-8", errors="replace")[:2000]
    except OSError:
        text = ""
    if LAUNCHER_MARK in text:
        target = _first(r'exec "([^"]+)"', text)
        detail = f"{found} → {target}"
    return Check("labrunner on PATH", True, detail)


def checks() -> list[Check]:
    results: list[Check] = []
    backend = resolve_backend_name(None)
    results.append(Check("backend (auto)", True,
                         f"{backend}" + (" — a Docker daemon answers" if docker_answers()
                                         else " — no Docker daemon answers; local processes")))
    results.append(_python())
    found = {"postgres": _postgres, "redis": _redis, "kafka": _kafka, "rabbitmq": _rabbitmq,
             "prometheus": _prometheus}
    for name, service in _services():
        results.append(_service(name, service, found.get(name)))
    results.append(_tool("cc", "build-essential", gcc_version, "gcc"))
    results.append(_tool("make", "make", make_version, "GNU Make"))
    for package, header, module, label in (
            ("libpq-dev", "/usr/include/postgresql/libpq-fe.h", "libpq", "libpq"),
            ("libhiredis-dev", "/usr/include/hiredis/hiredis.h", "hiredis", "hiredis"),
            ("librdkafka-dev", "/usr/include/librdkafka/rdkafka.h", "rdkafka", "librdkafka")):
        results.append(_headers(package, header, module, label))
    results.append(launcher_check())
    results.append(_grading_isolation())
    return results


def _grading_isolation() -> Check:
    """What ``labrunner grade`` can give each submission on this machine (informational:
    learners do not need any of it)."""
    from .cgroups import memory_cgroups_available
    from .services.private import private_networks_available

    if os.geteuid() != 0:
        return Check("grading sandbox", True, "not root: submissions would run as this user, "
                     "with shared services", "grade untrusted code as root")
    parts = ["a uid per run"]
    parts.append("private services in a network namespace per run"
                 if private_networks_available() else "shared services (no network namespaces)")
    parts.append("memory cgroups for C labs" if memory_cgroups_available()
                 else "no memory cgroup (C labs without a memory cap)")
    return Check("grading sandbox", True, ", ".join(parts))
