"""A private RabbitMQ node: its own node name, AMQP, distribution and management ports, its own
epmd on a private port, and its own directories, so it never meets a system RabbitMQ.

The management plugin is on: per-run vhosts are created through its HTTP API, the same way
for the local, docker and external backends."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from ..base import Endpoint, ServiceError, free_port, tail, wait_until
from .process import pid_alive, remove_tree, spawn, terminate, which

SBIN_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/sbin", "/usr/local/sbin")


def server() -> str | None:
    # The Debian wrapper in /usr/sbin switches to the 'rabbitmq' user and the system node;
    # the script in /usr/lib/rabbitmq/bin runs a node as whoever we are, with our settings.
    direct = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
    if direct.is_file():
        return str(direct)
    return os.environ.get("LABRUNNER_RABBITMQ_SERVER") or which("rabbitmq-server", *SBIN_DIRS)


def missing() -> str | None:
    if server() is None:
        return "rabbitmq-server not found. Install it: sudo apt-get install rabbitmq-server"
    if which("epmd", "/usr/lib/erlang/bin") is None:
        return "epmd (Erlang) not found. Install it: sudo apt-get install erlang-base"
    return None


def start(workdir: Path, tied_to_parent: bool = True) -> Endpoint:
    exe = server()
    if exe is None:
        raise ServiceError(missing() or "rabbitmq missing")
    home = workdir / "rabbitmq"
    remove_tree(home)
    home.mkdir(parents=True)
    port, dist_port, epmd_port, mgmt_port = free_port(), free_port(), free_port(), free_port()
    endpoint = Endpoint(
        service="rabbitmq", backend="local", host="127.0.0.1", port=port,
        username="guest", password="guest",
        extra={"home": str(home), "server": exe, "dist_port": dist_port,
               "epmd_port": epmd_port, "management_port": mgmt_port,
               "node": f"labrunner{port}@localhost", "log": str(home / "rabbitmq.log")},
    )
    (home / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{port}\n"
        f"management.tcp.ip = 127.0.0.1\n"
        f"management.tcp.port = {mgmt_port}\n"
        "loopback_users.guest = true\n"
        "log.file.level = warning\n"
        "log.console = true\n"
        "log.console.level = warning\n",
        encoding="utf-8",
    )
    (home / "enabled_plugins").write_text("[rabbitmq_management].\n", encoding="utf-8")
    (home / "rabbitmq-env.conf").write_text("", encoding="utf-8")
    _launch(endpoint, tied_to_parent)
    return endpoint


def _env(endpoint: Endpoint) -> dict[str, str]:
    extra = endpoint.extra
    home = Path(extra["home"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env.update({
        "HOME": str(home),  # the Erlang cookie lives here, private to this node
        "RABBITMQ_NODENAME": extra["node"],
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(endpoint.port),
        "RABBITMQ_DIST_PORT": str(extra["dist_port"]),
        "ERL_EPMD_PORT": str(extra["epmd_port"]),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(home / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
        "RABBITMQ_LOG_BASE": str(home / "log"),
        "RABBITMQ_PLUGINS_EXPAND_DIR": str(home / "plugins-expand"),
        "RABBITMQ_PID_FILE": str(home / "rabbitmq.pid"),
        "RABBITMQ_LOGS": "-",
    })
    return env


def _launch(endpoint: Endpoint, tied_to_parent: bool) -> None:
    extra = endpoint.extra
    home = Path(extra["home"])
    log = Path(extra["log"])
    epmd = which("epmd", "/usr/lib/erlang/bin") or "epmd"
    # Our own epmd, in the foreground, as our child: the node registers with it, and it
    # goes when we stop it instead of lingering as a system-wide daemon.
    epmd_proc = spawn([epmd, "-port", str(extra["epmd_port"]), "-address", "127.0.0.1"],
                      home / "epmd.log", tied_to_parent=tied_to_parent)
    (home / "epmd.pid").write_text(str(epmd_proc.pid), encoding="ascii")
    proc = spawn([extra["server"]], log, env=_env(endpoint), tied_to_parent=tied_to_parent,
                 cwd=home)
    (home / "server.pid").write_text(str(proc.pid), encoding="ascii")
    extra["pid"] = proc.pid
    wait_until(
        lambda: ready(endpoint),
        timeout=90,
        what=f"rabbitmq on port {endpoint.port}",
        failed=lambda: None if proc.poll() is None else
        f"rabbitmq-server exited with {proc.returncode}; last log lines:\n{tail(log)}",
        interval=0.2,
    )


def management_url(endpoint: Endpoint) -> str:
    return f"http://{endpoint.host}:{endpoint.extra['management_port']}/api"


def ready(endpoint: Endpoint) -> bool:
    import pika

    params = pika.ConnectionParameters(
        host=endpoint.host, port=endpoint.port,
        credentials=pika.PlainCredentials(endpoint.username, endpoint.password),
        connection_attempts=1, socket_timeout=2, blocked_connection_timeout=2,
    )
    pika.BlockingConnection(params).close()
    from ..isolation import rabbitmq_api

    rabbitmq_api(endpoint, "GET", "/overview")
    return True


def _pids(endpoint: Endpoint) -> list[int]:
    home = Path(endpoint.extra["home"])
    pids = []
    for name in ("rabbitmq.pid", "server.pid", "epmd.pid"):
        try:
            pids.append(int((home / name).read_text().strip()))
        except (OSError, ValueError):
            continue
    return pids


def current_pid(endpoint: Endpoint) -> int:
    """The node's beam process (from its pid file), else the start script's."""
    pids = _pids(endpoint)
    return pids[0] if pids else int(endpoint.extra.get("pid", 0))


def stop(endpoint: Endpoint, remove: bool = True) -> None:
    # The beam process (rabbitmq.pid) stops cleanly on SIGTERM; the script and our epmd
    # follow. Signal the whole session group so erl_child_setup and inet_gethost go too.
    for pid in _pids(endpoint):
        if pid_alive(pid):
            terminate(pid, timeout=15, sig=signal.SIGTERM, group=True)
    if remove:
        remove_tree(Path(endpoint.extra["home"]))


def restart(endpoint: Endpoint) -> Endpoint:
    stop(endpoint, remove=False)
    _launch(endpoint, tied_to_parent=False)
    return endpoint
