"""Debian's prometheus server on a free loopback port, with a throwaway TSDB and its own config.

Nothing is scraped statically: the config reads its targets from JSON files in a folder
(``file_sd_configs``), which Prometheus watches, so each test registers the targets it wants
(with a ``job`` label of its own) at run time and removes them at its end. The scrape interval
is short (labs wait for a few scrapes, not minutes); ``--web.enable-lifecycle`` lets a test or
the runner ask for a reload or a clean quit over HTTP.
"""

from __future__ import annotations

import os
import signal
import urllib.request
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

SCRAPE_INTERVAL = "500ms"
# A scrape that times out is not counted as a success; the fixture just waits for the next.
SCRAPE_TIMEOUT = "500ms"
# How often Prometheus applies changed target files (it also watches them with inotify; its
# discovery and scrape managers then apply target changes at most every 5 s).
FILE_SD_REFRESH = "1s"


def binary() -> str | None:
    return os.environ.get("LABRUNNER_PROMETHEUS") or which("prometheus", "/usr/bin")


def missing() -> str | None:
    if binary() is None:
        return ("prometheus not found. Install it: sudo apt-get install --no-install-recommends "
                "prometheus  (or set LABRUNNER_PROMETHEUS to the server binary)")
    return None


def config_text(targets_dir: str) -> str:
    """The server's whole config: one job whose targets (and per-target ``job`` label, which
    wins over the job name) come from the files in ``targets_dir``."""
    return "\n".join([
        "global:",
        f"  scrape_interval: {SCRAPE_INTERVAL}",
        f"  scrape_timeout: {SCRAPE_TIMEOUT}",
        f"  evaluation_interval: {SCRAPE_INTERVAL}",
        "scrape_configs:",
        "  - job_name: labrunner",
        "    file_sd_configs:",
        "      - files:",
        f"          - '{targets_dir}/*.json'",
        f"        refresh_interval: {FILE_SD_REFRESH}",
    ]) + "\n"


def command(exe: str, config: str, data: str, port: int, host: str = "127.0.0.1") -> list[str]:
    return [
        exe,
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address={host}:{port}",
        "--web.enable-lifecycle",
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",
    ]


def start(workdir: Path, tied_to_parent: bool = True) -> Endpoint:
    exe = binary()
    if exe is None:
        raise ServiceError(missing() or "prometheus missing")
    root = workdir / "prometheus"
    remove_tree(root)
    targets = root / "targets"
    targets.mkdir(parents=True)
    # The tests (maybe another uid when grading) write their target files here.
    os.chmod(targets, 0o777)
    (root / "data").mkdir()
    config = root / "prometheus.yml"
    config.write_text(config_text(str(targets)), encoding="utf-8")
    if service_owner() is not None:
        chown_for_service(root)
    endpoint = Endpoint(
        service="prometheus", backend="local", host="127.0.0.1", port=free_port(),
        extra={"dir": str(root), "config": str(config), "data": str(root / "data"),
               "targets_dir": str(targets), "binary": exe, "log": str(root / "prometheus.log")},
    )
    _launch(endpoint, tied_to_parent)
    return endpoint


def _launch(endpoint: Endpoint, tied_to_parent: bool) -> None:
    extra = endpoint.extra
    log = Path(extra["log"])
    proc = spawn(command(extra["binary"], extra["config"], extra["data"], endpoint.port), log,
                 tied_to_parent=tied_to_parent, cwd=Path(extra["dir"]),
                 as_service_user=service_owner() is not None)
    extra["pid"] = proc.pid
    # Prometheus writes no pid file: keep one so a later process can stop it.
    (Path(extra["dir"]) / "prometheus.pid").write_text(str(proc.pid), encoding="ascii")
    wait_until(
        lambda: ready(endpoint),
        timeout=30,
        what=f"prometheus on port {endpoint.port}",
        failed=lambda: None if proc.poll() is None else
        f"prometheus exited with {proc.returncode}; last log lines:\n{tail(log)}",
        interval=0.02,
    )


def ready(endpoint: Endpoint) -> bool:
    base = str(endpoint.extra.get("url") or f"http://{endpoint.host}:{endpoint.port}")
    with urllib.request.urlopen(base.rstrip("/") + "/-/ready", timeout=2) as response:
        return int(response.status) == 200


def current_pid(endpoint: Endpoint) -> int:
    try:
        return int((Path(endpoint.extra["dir"]) / "prometheus.pid").read_text().strip())
    except (OSError, ValueError):
        return int(endpoint.extra.get("pid", 0))


def stop(endpoint: Endpoint, remove: bool = True) -> None:
    pid = current_pid(endpoint)
    if pid and pid_alive(pid):
        terminate(pid, timeout=10, sig=signal.SIGTERM, group=False)
    if remove:
        remove_tree(Path(endpoint.extra["dir"]))


def restart(endpoint: Endpoint) -> Endpoint:
    """Stop and start again with the same TSDB and targets."""
    stop(endpoint, remove=False)
    _launch(endpoint, tied_to_parent=False)
    return endpoint
