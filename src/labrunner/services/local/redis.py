"""Debian's redis-server on a free loopback port with its own config and data dir.

Many logical databases are configured so that every lab run gets one of its own
(see :mod:`labrunner.services.isolation`)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from ..base import Endpoint, ServiceError, free_port, tail, wait_until
from .process import (
    chown_for_service,
    pid_alive,
    remove_tree,
    service_owner,
    spawn,
    terminate,
    which,
)

DATABASES = 1024


def binary() -> str | None:
    return os.environ.get("LABRUNNER_REDIS_SERVER") or which("redis-server", "/usr/sbin")


def missing() -> str | None:
    if binary() is None:
        return "redis-server not found. Install it: sudo apt-get install redis-server"
    return None


def start(workdir: Path, tied_to_parent: bool = True) -> Endpoint:
    exe = binary()
    if exe is None:
        raise ServiceError(missing() or "redis missing")
    data = workdir / "redis"
    remove_tree(data)
    data.mkdir(parents=True)
    port = free_port()
    conf = data / "redis.conf"
    conf.write_text(
        "\n".join([
            "bind 127.0.0.1",
            f"port {port}",
            "protected-mode yes",
            f"dir {data}",
            f"pidfile {data / 'redis.pid'}",
            f"logfile {data / 'redis.log'}",
            f"databases {DATABASES}",
            'save ""',
            "appendonly no",
            "daemonize no",
            # Labs enable AOF at run time (CONFIG SET appendonly yes) and restart the server:
            # the restart must read the same dir, which CONFIG REWRITE records here.
            "enable-debug-command local",
        ]) + "\n",
        encoding="utf-8",
    )
    if service_owner() is not None:
        chown_for_service(data)  # a graded run's private server runs as its own uid
    endpoint = Endpoint(
        service="redis", backend="local", host="127.0.0.1", port=port,
        extra={"dir": str(data), "conf": str(conf), "binary": exe,
               "log": str(data / "redis.log")},
    )
    _launch(endpoint, tied_to_parent)
    return endpoint


def _launch(endpoint: Endpoint, tied_to_parent: bool) -> None:
    extra = endpoint.extra
    log = Path(extra["log"])
    proc = spawn([extra["binary"], extra["conf"]], Path(extra["dir"]) / "stdout.log",
                 tied_to_parent=tied_to_parent, cwd=Path(extra["dir"]),
                 as_service_user=service_owner() is not None)
    extra["pid"] = proc.pid
    wait_until(
        lambda: ready(endpoint),
        timeout=15,
        what=f"redis on port {endpoint.port}",
        failed=lambda: None if proc.poll() is None else
        f"redis-server exited with {proc.returncode}; last log lines:\n{tail(log)}",
        interval=0.01,
    )


def ready(endpoint: Endpoint) -> bool:
    import redis

    client = redis.Redis(host=endpoint.host, port=endpoint.port, socket_timeout=2)
    try:
        return bool(client.ping())
    finally:
        client.close()


def current_pid(endpoint: Endpoint) -> int:
    try:
        return int((Path(endpoint.extra["dir"]) / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return int(endpoint.extra.get("pid", 0))


def stop(endpoint: Endpoint, remove: bool = True) -> None:
    pid = current_pid(endpoint)
    if pid and pid_alive(pid):
        # SIGTERM: redis flushes the AOF (if on) and exits cleanly.
        terminate(pid, timeout=10, sig=signal.SIGTERM, group=False)
    if remove:
        remove_tree(Path(endpoint.extra["dir"]))


def restart(endpoint: Endpoint) -> Endpoint:
    """Restart with the same data dir. Settings changed with CONFIG SET are written back to
    the config file first, so a lab that turned AOF on gets it loaded at start."""
    import redis

    client = redis.Redis(host=endpoint.host, port=endpoint.port, socket_timeout=5)
    try:
        # An AOF switched on at run time only exists once its first rewrite is done;
        # stopping before that would lose the very data the lab wants to see survive.
        wait_until(lambda: _rewrite_done(client), timeout=30, what="redis AOF rewrite")
        client.config_rewrite()
    finally:
        client.close()
    stop(endpoint, remove=False)
    _launch(endpoint, tied_to_parent=False)
    return endpoint


def _rewrite_done(client: object) -> bool:
    info = client.info("persistence")  # type: ignore[attr-defined]
    return not (info.get("aof_rewrite_in_progress") or info.get("aof_rewrite_scheduled"))
