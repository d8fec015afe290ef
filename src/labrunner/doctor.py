"""``labrunner doctor``: which backend would run, and what is missing with the fix."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from .services.manager import docker_answers, resolve_backend_name


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    remedy: str = ""


def _librdkafka_version() -> str | None:
    try:
        out = subprocess.run(["pkg-config", "--modversion", "rdkafka"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def checks() -> list[Check]:
    from .services import kinds

    results: list[Check] = []
    backend = resolve_backend_name(None)
    results.append(Check("backend (auto)", True,
                         f"{backend}" + (" — a Docker daemon answers" if docker_answers()
                                         else " — no Docker daemon answers; local processes")))
    for service in kinds():
        reason = service.missing()
        results.append(Check(f"local {service.name}", reason is None,
                             "ready to start" if reason is None else reason.split(". ")[0],
                             "" if reason is None else reason.split(". ", 1)[-1]))
    for tool, package in (("cc", "build-essential"), ("make", "make")):
        found = shutil.which(tool)
        results.append(Check(tool, found is not None, found or "not found",
                             "" if found else f"sudo apt-get install {package}"))
    for header, package in (("/usr/include/postgresql/libpq-fe.h", "libpq-dev"),
                            ("/usr/include/hiredis/hiredis.h", "libhiredis-dev"),
                            ("/usr/include/librdkafka/rdkafka.h", "librdkafka-dev")):
        import os

        ok = os.path.exists(header)
        results.append(Check(package, ok, header if ok else "headers missing",
                             "" if ok else f"sudo apt-get install {package}"))
    version = _librdkafka_version()
    if version:
        results.append(Check("librdkafka", True, f"system librdkafka {version}"))
    results.append(_grading_isolation())
    return results


def _grading_isolation() -> Check:
    """What ``labrunner grade`` can give each submission on this machine (informational:
    learners do not need any of it)."""
    import os

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
