"""A memory cgroup for one graded process tree.

An address-space limit (RLIMIT_AS) is the portable way to cap a graded process's memory, but
it counts reservations, not use: a binary built with AddressSanitizer reserves terabytes of
shadow memory it never touches and cannot start under any such limit. For those runs the
grader caps what the process tree really uses with a cgroup, where the machine lets it make
one (cgroup v2 with the memory controller delegated, or the v1 memory hierarchy)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_paths() -> dict[str, str]:
    """This process's cgroup per hierarchy: {"memory": "/a/b"} for v1, {"": "/a"} for v2."""
    paths: dict[str, str] = {}
    try:
        lines = Path("/proc/self/cgroup").read_text(encoding="ascii").splitlines()
    except OSError:
        return paths
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths[controller] = parts[2]
    return paths


def _parent_dir() -> tuple[Path, str] | None:
    """Where to make a memory cgroup, and the name of its limit file."""
    paths = _own_paths()
    v1 = CGROUP_ROOT / "memory"
    if "memory" in paths and (v1 / "memory.limit_in_bytes").exists():
        for candidate in (v1 / paths["memory"].lstrip("/"), v1):
            if (candidate / "memory.limit_in_bytes").exists() and os.access(candidate, os.W_OK):
                return candidate, "memory.limit_in_bytes"
    if "" in paths and (CGROUP_ROOT / "cgroup.controllers").exists():
        candidate = CGROUP_ROOT / paths[""].lstrip("/")
        try:
            delegated = (candidate / "cgroup.subtree_control").read_text().split()
        except OSError:
            return None
        if "memory" in delegated and os.access(candidate, os.W_OK):
            return candidate, "memory.max"
    return None


class MemoryCgroup:
    """Created with a limit, entered by the child before it drops root, removed after the
    run (once the sweep has killed what was in it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, limit_bytes: int) -> MemoryCgroup | None:
        """A new cgroup capped at ``limit_bytes``, or None where none can be made."""
        if os.geteuid() != 0:
            return None
        found = _parent_dir()
        if found is None:
            return None
        parent, limit_file = found
        path = parent / f"labrunner-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
            (path / limit_file).write_text(str(limit_bytes), encoding="ascii")
            swap = path / "memory.swap.max"   # v2: no swapping past the limit
            if swap.exists():
                swap.write_text("0", encoding="ascii")
        except OSError:
            with contextlib.suppress(OSError):
                path.rmdir()
            return None
        return cls(path)

    def enter(self) -> None:
        """Move the calling process (a child, before exec) into the cgroup."""
        with open(self.path / "cgroup.procs", "w", encoding="ascii") as procs:
            procs.write(str(os.getpid()))

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.rmdir()


def memory_cgroups_available() -> bool:
    probe = MemoryCgroup.create(1 << 30)
    if probe is None:
        return False
    probe.remove()
    return True
