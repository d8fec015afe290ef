"""RabbitMQ: a vhost per test, made through the management HTTP API (the same way on the
local, docker and external backends).

Locally a private node: its own node name, AMQP, distribution and management ports, its own
epmd on a private port, and its own directories, so it never meets a system RabbitMQ. In a
container the official ``rabbitmq:3-management`` image."""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import secrets
import shutil
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base import ContainerSpec, Endpoint, Launch, ServiceError, ServiceKind, register
from ..local.process import free_port, service_owner, which

if TYPE_CHECKING:
    from ..base import ServiceScope

SBIN_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/sbin", "/usr/local/sbin")
MANAGEMENT_ENV = "LABRUNNER_RABBITMQ_MANAGEMENT_URL"  # http://host:15672/api (external)
ADMIN_USER, LAB_USER = "labrunner", "lab"
# What the labs use beyond AMQP: the management API makes each test's vhost.
PLUGINS = ("rabbitmq_management",)
PRELOAD_FILE = "preload.eterm"   # in the private server folder: see _preload_term
# Run first by the node's init (ERL_AFLAGS come before rabbit's own `-s rabbit boot`), in a
# process of its own. erlexec splits ERL_AFLAGS at blanks and drops quotes: hence no blank
# and no string in it, and the list's path comes through an environment variable.
PRELOAD_EVAL = ("-eval spawn(fun()->{ok,[M]}=file:consult(os:getenv(atom_to_list("
                "labrunner_preload))),code:ensure_modules_loaded(M)end)")
MEMORY_HIGH_WATERMARK = 256 * 1024 * 1024   # bytes the node may use before it blocks publishers
DISK_FREE_LIMIT = 64 * 1024 * 1024


def server() -> str | None:
    # The Debian wrapper in /usr/sbin switches to the 'rabbitmq' user and the system node;
    # the script in /usr/lib/rabbitmq/bin runs a node as whoever we are, with our settings.
    direct = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
    if direct.is_file():
        return str(direct)
    return os.environ.get("LABRUNNER_RABBITMQ_SERVER") or which("rabbitmq-server", *SBIN_DIRS)


def private_server(folder: Path, plugins: tuple[str, ...]) -> str | None:
    """A start script whose plugins folder holds only what the node loads: the ``rabbit``
    application, the given plugins and what they depend on (about 25 of the 70 Debian
    ships). The node searches every folder on its code path for each module it loads, and
    loads every module of every application there at boot to find its boot steps, so the
    full folder costs seconds of start-up on a small machine. The scripts are copied, not
    linked: rabbitmq-env takes RABBITMQ_HOME from where the script really is. None when
    this RabbitMQ is not laid out that way (sbin/ and plugins/ under one home, as Debian's
    and upstream's packages are): the caller then starts the installed script as it is."""
    script = server()
    if script is None:
        return None
    home = Path(script).resolve().parent.parent
    apps = _applications(home / "plugins")
    if not apps or "rabbit" not in apps or not (home / "sbin" / "rabbitmq-env").is_file():
        return None
    # The OTP applications are not in this folder: Erlang's own lib folder has them.
    wanted = _closure(apps, ["rabbit", "rabbitmq_prelaunch", *plugins])
    (folder / "sbin").mkdir(parents=True)
    (folder / "plugins").mkdir()
    for name in ("rabbitmq-server", "rabbitmq-env", "rabbitmq-defaults"):
        shutil.copy2(home / "sbin" / name, folder / "sbin" / name)
    if (home / "escript").is_dir():
        (folder / "escript").symlink_to(home / "escript")
    for name in wanted:
        app_dir = apps[name][0]
        (folder / "plugins" / app_dir.name).symlink_to(app_dir)
    term = _preload_term(home / "plugins", plugins)
    if term is not None:
        (folder / PRELOAD_FILE).write_text(term, encoding="utf-8")
    return str(folder / "sbin" / "rabbitmq-server")


def _closure(apps: dict[str, tuple[Path, frozenset[str]]], roots: list[str]) -> set[str]:
    """The applications of ``apps`` that ``roots`` need, directly or not."""
    wanted: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in wanted and name in apps:
            wanted.add(name)
            todo.extend(apps[name][1])
    return wanted


@functools.cache
def _preload_term(plugins_folder: Path, plugins: tuple[str, ...]) -> str | None:
    """The list of every module of every application the node will run (rabbit's, the
    plugins', and the OTP ones they need: about 1,100), as an Erlang term. At boot, RabbitMQ
    loads all of them one by one, through the code server, to read their boot-step
    attributes: about 2 s of the node's 4. Given this list, the node loads them in one
    batch in the background from its first instant (``code:ensure_modules_loaded``, which
    prepares modules in parallel and never searches the path), and is ready in about 1.5 s.
    Made once per process (every node of a test worker or a grading command has the same
    list: 40 folders listed). None when Erlang's lib folder cannot be found: the node then
    starts the slow way."""
    erl = which("erl", "/usr/lib/erlang/bin")
    otp_lib = Path(erl).resolve().parent.parent / "lib" if erl else None
    if otp_lib is None or not otp_lib.is_dir():
        return None
    apps = {**_applications(otp_lib), **_applications(plugins_folder)}
    wanted = _closure(apps, ["kernel", "stdlib", "sasl", "rabbit", "rabbitmq_prelaunch",
                             *plugins])
    modules = sorted({beam.stem for name in wanted
                      for beam in (apps[name][0] / "ebin").glob("*.beam")})
    return "[" + ",".join(f"'{m}'" for m in modules) + "].\n"


_APP_DEPENDENCIES = re.compile(r"\{\s*(?:included_)?applications\s*,\s*\[([^\]]*)\]")


@functools.cache
def _applications(plugins: Path) -> dict[str, tuple[Path, frozenset[str]]]:
    """Each application in a folder of them (a RabbitMQ plugins folder, or Erlang's own
    lib): its folder and the applications it needs, read from its ``ebin/<name>.app``
    resource file. Read once per process: every node started (each test worker's, each
    graded run's) would read the same files."""
    found: dict[str, tuple[Path, frozenset[str]]] = {}
    for resource in plugins.glob("*/ebin/*.app"):
        text = resource.read_text(encoding="utf-8", errors="replace")
        needs = frozenset(dep for deps in _APP_DEPENDENCIES.findall(text)
                          for dep in re.findall(r"[a-z][A-Za-z0-9_]*", deps))
        found[resource.stem] = (resource.parent.parent, needs)
    return found


@register
class RabbitMQ(ServiceKind):
    name = "rabbitmq"
    fixture = "rabbitmq"
    folder = "rabbitmq"
    ready_timeout = 90.0
    ready_interval = 0.05
    stop_timeout = 15.0
    # The beam process stops cleanly on SIGTERM; the script and our epmd follow. The whole
    # session group is signalled so erl_child_setup and inet_gethost go too.
    stop_group = True
    image = "rabbitmq:3-management"
    container_ready_timeout = 120.0
    container_poll = 0.25
    external_env = "LABRUNNER_RABBITMQ_URL"  # amqp://user:pass@host:5672/

    def url(self, endpoint: Endpoint) -> str:
        auth = f"{endpoint.username}:{endpoint.password}@" if endpoint.username else ""
        return f"amqp://{auth}{endpoint.host}:{endpoint.port}/"

    def ready(self, endpoint: Endpoint) -> bool:
        """An AMQP connection opens (the port first: a refused connect costs nothing, a pika
        import and handshake do). The management API may come later: a test's vhost is
        made through it, and :meth:`open` waits for it there, so a lab that only needs
        AMQP never waits for it."""
        import socket

        with socket.create_connection((endpoint.host, endpoint.port), timeout=1):
            pass
        import pika

        params = pika.ConnectionParameters(
            host=endpoint.host, port=endpoint.port,
            credentials=pika.PlainCredentials(endpoint.username, endpoint.password),
            connection_attempts=1, socket_timeout=2, blocked_connection_timeout=2,
        )
        pika.BlockingConnection(params).close()
        return True

    def missing(self) -> str | None:
        if server() is None:
            return "rabbitmq-server not found. Install it: sudo apt-get install rabbitmq-server"
        if which("epmd", "/usr/lib/erlang/bin") is None:
            return "epmd (Erlang) not found. Install it: sudo apt-get install erlang-base"
        return None

    def prepare(self, folder: Path) -> Endpoint:
        home = folder
        port, dist_port, epmd_port, mgmt_port = (free_port(), free_port(), free_port(),
                                                 free_port())
        admin_password, lab_password = secrets.token_hex(16), secrets.token_hex(16)
        # The classic Erlang-term config, not rabbitmq.conf: the new format is translated
        # through every plugin's cuttlefish schema at each boot (about a second here).
        conf = home / "rabbitmq.config"
        conf.write_text(
            "[{rabbit, [\n"
            f'   {{tcp_listeners, [{{"127.0.0.1", {port}}}]}},\n'
            # The seeded user (no guest): an administrator with this start's password.
            f'   {{default_user, <<"{ADMIN_USER}">>}}, {{default_pass, <<"{admin_password}">>}},\n'
            "   {default_user_tags, [administrator]},\n"
            "   {loopback_users, []},\n"
            f"   {{vm_memory_high_watermark, {{absolute, {MEMORY_HIGH_WATERMARK}}}}},\n"
            f"   {{disk_free_limit, {{absolute, {DISK_FREE_LIMIT}}}}},\n"
            "   {log, [{console, [{enabled, true}, {level, warning}]},\n"
            "          {file, [{level, warning}]}]}]},\n"
            " {rabbitmq_management, [\n"
            f'   {{tcp_config, [{{ip, "127.0.0.1"}}, {{port, {mgmt_port}}}]}}]}}].\n',
            encoding="utf-8",
        )
        os.chmod(conf, 0o600)
        (home / "enabled_plugins").write_text(f"[{','.join(PLUGINS)}].\n", encoding="utf-8")
        (home / "rabbitmq-env.conf").write_text("", encoding="utf-8")
        start_script = private_server(home / "server", PLUGINS) or server()
        return Endpoint(
            service="rabbitmq", backend="local", host="127.0.0.1", port=port,
            username=ADMIN_USER, password=admin_password,
            extra={"dir": str(home), "server": start_script, "dist_port": dist_port,
                   "lab_username": LAB_USER, "lab_password": lab_password,
                   "epmd_port": epmd_port, "management_port": mgmt_port,
                   "node": f"labrunner{port}@localhost", "log": str(home / "rabbitmq.log")},
        )

    def launches(self, endpoint: Endpoint) -> list[Launch]:
        extra = endpoint.extra
        home = Path(extra["dir"])
        epmd = which("epmd", "/usr/lib/erlang/bin") or "epmd"
        # A graded run's node and epmd are its service uid's, like its Postgres and Redis.
        unprivileged = service_owner() is not None
        return [
            # Our own epmd, in the foreground, as our child: the node registers with it, and
            # it goes when we stop it instead of lingering as a system-wide daemon.
            Launch([epmd, "-port", str(extra["epmd_port"]), "-address", "127.0.0.1"],
                   home / "epmd.log", pidfile=home / "epmd.pid",
                   as_service_user=unprivileged, wait_port=extra["epmd_port"]),
            Launch([extra["server"]], Path(extra["log"]), env=_env(endpoint), cwd=home,
                   pidfile=home / "server.pid", as_service_user=unprivileged),
        ]

    def pid_files(self, endpoint: Endpoint) -> list[Path]:
        # The node's beam process (its own pid file) first, then what we started.
        home = Path(endpoint.extra["dir"])
        return [home / "rabbitmq.pid", home / "server.pid", home / "epmd.pid"]

    def container(self, workdir: Path) -> ContainerSpec:
        port, mgmt = free_port(), free_port()
        password = secrets.token_hex(12)
        endpoint = Endpoint("rabbitmq", "docker", "127.0.0.1", port, username="labrunner",
                            password=password,
                            extra={"management_port": mgmt,
                                   "management_url": f"http://127.0.0.1:{mgmt}/api"})
        env = {"RABBITMQ_DEFAULT_USER": "labrunner", "RABBITMQ_DEFAULT_PASS": password}
        return ContainerSpec(endpoint, {5672: port, 15672: mgmt}, env)

    def external_extra(self, url: urllib.parse.SplitResult) -> dict[str, Any]:
        mgmt = os.environ.get(MANAGEMENT_ENV)
        if not mgmt:
            raise ServiceError(
                f"{MANAGEMENT_ENV} is not set: the external RabbitMQ needs its "
                "management API (http://host:15672/api) so each run gets its own vhost")
        return {"management_url": mgmt.rstrip("/")}

    def open(self, endpoint: Endpoint, scope: ServiceScope) -> RabbitVhost:
        vhost = scope.new_name()   # create_vhost waits for the management API
        return RabbitVhost(create_vhost(endpoint, vhost), vhost, endpoint)

    def close(self, handle: Any, scope: ServiceScope) -> None:
        delete_vhost(handle.endpoint, handle.vhost)


def _env(endpoint: Endpoint) -> dict[str, str]:
    extra = endpoint.extra
    home = Path(extra["dir"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env.update({
        "HOME": str(home),  # the Erlang cookie lives here, private to this node
        "RABBITMQ_NODENAME": extra["node"],
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(endpoint.port),
        "RABBITMQ_DIST_PORT": str(extra["dist_port"]),
        "ERL_EPMD_PORT": str(extra["epmd_port"]),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.config"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(home / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
        "RABBITMQ_LOG_BASE": str(home / "log"),
        "RABBITMQ_PLUGINS_EXPAND_DIR": str(home / "plugins-expand"),
        "RABBITMQ_PID_FILE": str(home / "rabbitmq.pid"),
        "RABBITMQ_LOGS": "-",
        # Start-up on a small shared machine: idle schedulers sleep instead of spinning
        # (busy-waiting steals the CPU the other services are starting on at the same time).
        # The node is distributed from its first instant, on our epmd (running already,
        # never started by erl: -start_epmd false), its distribution port on loopback: the
        # prelaunch then skips booting a second VM only to make sure an epmd runs.
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
            "+sbwt none +sbwtdcpu none +sbwtdio none -start_epmd false "
            f"-sname {extra['node']} "
            f"-kernel inet_dist_listen_min {extra['dist_port']} "
            f"-kernel inet_dist_listen_max {extra['dist_port']} "
            "-kernel inet_dist_use_interface {127,0,0,1} "
            # One scheduler, one dirty CPU and one dirty I/O scheduler: a test node needs no
            # more, and at boot the extra ones load and JIT-compile RabbitMQ's 1,100 modules
            # in parallel (2.2 s of CPU for a 1.4 s start, against 1.6 s for 1.6 s). Started
            # beside Kafka's JVM on two cores, that parallelism only takes the JVM's core:
            # the Phase 5 set was ready in 1.5x its slowest service alone, now 1.1-1.2x
            # (benchmarks/bench_runner.py, part 2).
            "+S 1:1 +SDcpu 1:1 +SDio 1"),
    })
    preload = Path(extra["server"]).parent.parent / PRELOAD_FILE
    if preload.is_file():
        env.update({"ERL_AFLAGS": PRELOAD_EVAL, "labrunner_preload": str(preload)})
    return env


def await_management(endpoint: Endpoint, timeout: float = 60.0) -> None:
    """Wait until the management API answers (readiness needs only AMQP), and make sure the
    lab user exists: it is made through that API (idempotent: the same password each time)."""
    if endpoint.extra.get("management_ready"):
        return
    from ..base import wait_until

    wait_until(lambda: api(endpoint, "GET", "/overview") is not None, timeout,
               f"the RabbitMQ management API on port {endpoint.extra.get('management_port')}",
               interval=0.1)
    lab_user = endpoint.extra.get("lab_username")
    if lab_user:
        api(endpoint, "PUT", f"/users/{urllib.parse.quote(lab_user, safe='')}",
            {"password": endpoint.extra["lab_password"], "tags": ""})
    endpoint.extra["management_ready"] = True


@dataclass
class RabbitVhost:
    """A RabbitMQ vhost of this test's own (the ``rabbitmq`` fixture)."""

    url: str
    vhost: str
    endpoint: Endpoint

    def parameters(self) -> Any:
        import pika

        return pika.URLParameters(self.url)

    def connection(self) -> Any:
        import pika

        return pika.BlockingConnection(self.parameters())

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The management HTTP API (queues, bindings, message counts)."""
        return api(self.endpoint, method, path, body)


def api(endpoint: Endpoint, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call the management HTTP API as the service's user."""
    import urllib.error
    import urllib.request  # here: every labrunner command imports the kinds

    base = endpoint.extra.get("management_url") or (
        f"http://{endpoint.host}:{endpoint.extra['management_port']}/api")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method)
    token = base64.b64encode(f"{endpoint.username}:{endpoint.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        if method == "DELETE" and exc.code == 404:
            return None
        raise ServiceError(f"RabbitMQ management API {method} {path}: {exc}") from exc
    return json.loads(payload) if payload else None


def create_vhost(endpoint: Endpoint, vhost: str) -> str:
    """Create a vhost the service's user and the lab user may use fully; return its AMQP
    URL (the lab user's). Waits for the management API first (the lab user is made there)."""
    await_management(endpoint)
    quoted = urllib.parse.quote(vhost, safe="")
    api(endpoint, "PUT", f"/vhosts/{quoted}")
    for name in dict.fromkeys([endpoint.username, endpoint.extra.get("lab_username")]):
        if not name:
            continue
        user = urllib.parse.quote(name, safe="")
        api(endpoint, "PUT", f"/permissions/{quoted}/{user}",
            {"configure": ".*", "write": ".*", "read": ".*"})
    return vhost_url(endpoint, vhost)


def vhost_url(endpoint: Endpoint, vhost: str) -> str:
    """The vhost's AMQP URL for the lab user (the endpoint's own where there is none)."""
    name = endpoint.extra.get("lab_username") or endpoint.username
    password = urllib.parse.quote(endpoint.extra.get("lab_password") or endpoint.password,
                                  safe="")
    return (f"amqp://{name}:{password}@{endpoint.host}:{endpoint.port}/"
            f"{urllib.parse.quote(vhost, safe='')}")


def delete_vhost(endpoint: Endpoint, vhost: str) -> None:
    api(endpoint, "DELETE", f"/vhosts/{urllib.parse.quote(vhost, safe='')}")
