"""The warm sets as the ``labrunner services`` commands see them: pin one (``services
up``), list them all (``services status``). Apart from :mod:`.warm`, which the manager
uses, so that neither imports the other."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from .local.process import remove_tree
from .warm import WarmSet


def pin_warm_set(backend_name: str, owner: Path, names: list[str],
                 on_start: Any = None) -> tuple[Any, Any]:
    """``labrunner services up``: start ``names`` at once in ``owner``'s warm set and keep
    it with no idle deadline; the set and its finished :class:`Startup` (errors, times).
    Ctrl-C stops what was being started."""
    from .manager import ServiceSet, Startup

    warm = WarmSet.of(backend_name, owner)
    with warm.locked():
        service_set = ServiceSet.warm_set(backend_name, owner)
        service_set.meta["warm"].update(pinned=True, deadline=None)
        service_set.save()
        startup = Startup(service_set, names, keep_threads=False, on_start=on_start)
        try:
            startup.begin().wait()
        except KeyboardInterrupt:
            startup.cancel()
            startup.join()
            raise
    return service_set, startup


def status_rows() -> list[dict[str, Any]]:
    """Every warm service (whose, alive, idle deadline, used by which runs) and what crashed
    runs left behind: what ``labrunner services status`` shows."""
    import time

    from .manager import leftovers, make_backend, read_state, read_state_backend

    rows: list[dict[str, Any]] = []
    now = time.time()
    for warm in WarmSet.all():
        meta = warm.meta()
        deadline = warm.deadline()
        backend = make_backend(warm.backend_name(), tied_to_parent=False)
        users = warm.live_users()
        for name, ep in warm.endpoints().items():
            rows.append({
                "service": name, "backend": ep.backend, "host": ep.host, "port": ep.port,
                "alive": backend.alive(ep), "kind": "warm",
                "owner": meta.get("owner"), "pinned": bool(meta.get("pinned")),
                "idle_deadline": deadline,
                "idle_left": None if deadline is None else max(0.0, round(deadline - now, 1)),
                "users": users})
    for state in leftovers():
        if state.parent.name.startswith("warm-"):
            continue
        backend = make_backend(read_state_backend(state), tied_to_parent=False)
        for name, ep in read_state(state).items():
            kind = "warm" if state.name.startswith("warm-") else "left by a crashed run"
            rows.append({"service": name, "backend": ep.backend, "host": ep.host,
                         "port": ep.port, "alive": backend.alive(ep), "kind": kind,
                         "owner": None, "pinned": kind == "warm", "idle_deadline": None,
                         "idle_left": None, "users": []})
    return rows


def stop_some(warm: WarmSet, names: list[str]) -> None:
    """Stop ``names`` (a run's own starts, on Ctrl-C) and forget them; the set goes when
    nothing is left in it (call under the lock)."""
    from .manager import ServiceSet, make_backend

    data = warm.read()
    backend = make_backend(warm.backend_name(), tied_to_parent=False)
    service_set = ServiceSet(backend, warm.folder, warm.state_file, warm=True,
                             endpoints=warm.endpoints(), meta={"warm": warm.meta()})
    with contextlib.suppress(Exception):
        service_set.stop(names)
    for name in names:  # a start that was cancelled may have left its folder
        remove_tree(warm.folder / name)
    if not service_set.endpoints and not warm.live_users(exclude=os.getpid()):
        warm.stop_all()
    elif data and not service_set.endpoints:
        warm.state_file.unlink(missing_ok=True)
