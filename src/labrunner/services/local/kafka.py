"""Apache Kafka 4.3.1 in KRaft mode (one node, broker and controller) on the JVM.

The jars come from Maven Central once (``labrunner setup`` runs Maven on the pom shipped in
``labrunner/data``) into the user's cache, or from an existing ``$KAFKA_HOME``. Storage is
formatted once into a template and copied per start: formatting costs a JVM start of its
own. The quorum is static (``controller.quorum.voters``), so a formatted template does not
depend on the ports a later start picks.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import uuid
from base64 import urlsafe_b64encode
from importlib import resources
from pathlib import Path

from ..base import Endpoint, ServiceError, free_port, tail, wait_until
from .process import pid_alive, remove_tree, runtime_dir, spawn, terminate

KAFKA_VERSION = "4.3.1"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "labrunner" / f"kafka-{KAFKA_VERSION}"


def libs_dir() -> Path | None:
    """The broker's jars: $KAFKA_HOME/libs when set, else the labrunner cache."""
    home = os.environ.get("KAFKA_HOME")
    if home and list(Path(home, "libs").glob("kafka_2.13-*.jar")):
        return Path(home, "libs")
    libs = cache_dir() / "libs"
    if list(libs.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
        return libs
    return None


def java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and Path(home, "bin", "java").is_file():
        return str(Path(home, "bin", "java"))
    return shutil.which("java")


def missing() -> str | None:
    if java() is None:
        return "Java 17+ not found. Install it: sudo apt-get install default-jre-headless"
    if libs_dir() is None:
        return (f"Kafka {KAFKA_VERSION} jars not found in {cache_dir() / 'libs'}. "
                "Fetch them once with: labrunner setup --kafka  (needs Maven), "
                "or set KAFKA_HOME to an unpacked Apache Kafka")
    return None


def fetch_jars(progress: bool = False) -> Path:
    """Download the broker's jars through Maven into the cache (once)."""
    libs = cache_dir() / "libs"
    if libs_dir() == libs:
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceError("Maven (mvn) is needed once to fetch the Kafka jars: "
                           "sudo apt-get install maven")
    pom = resources.files("labrunner").joinpath("data", "kafka-pom.xml")
    staging = cache_dir() / f"libs.{os.getpid()}"
    remove_tree(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    with resources.as_file(pom) as pom_path:
        cmd = [mvn, "-B", "-f", str(pom_path), "dependency:copy-dependencies",
               f"-DoutputDirectory={staging}", "-DincludeScope=runtime"]
        if not progress:
            cmd.insert(2, "-q")
        done = subprocess.run(cmd, capture_output=not progress, text=True)
    if done.returncode != 0:
        raise ServiceError(
            f"Maven could not fetch Kafka {KAFKA_VERSION}:\n{(done.stdout or '')[-2000:]}"
        )
    remove_tree(libs)
    os.replace(staging, libs)
    return libs


LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = out
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = info
"""


def _properties(data: Path, port: int, controller_port: int) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data),
        # One node: internal topics cannot have more replicas than brokers.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Fewer internal partitions: the first consumer group or transaction then takes
        # well under a second instead of creating 50 partitions.
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.num.partitions": "4",
        # Tests form groups quickly: no initial delay, short minimum timeouts.
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "2000",
        "group.consumer.min.session.timeout.ms": "2000",
        "group.consumer.session.timeout.ms": "10000",
        "group.consumer.min.heartbeat.interval.ms": "100",
        "group.consumer.heartbeat.interval.ms": "500",
        "num.partitions": "1",
        "auto.create.topics.enable": "true",
        "delete.topic.enable": "true",
        "log.segment.bytes": "16777216",
    }
    return "".join(f"{k}={v}\n" for k, v in settings.items())


def _java_command(libs: Path, main: str, *args: str, log4j: Path | None = None) -> list[str]:
    cmd = [java() or "java", "-Xms128m", "-Xmx768m", "-XX:+UseSerialGC",
           # C1 only: a one-node test broker starts a second faster and needs no peak speed.
           "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true"]
    if log4j is not None:
        cmd.append(f"-Dlog4j2.configurationFile={log4j}")
    return [*cmd, "-cp", f"{libs}/*", main, *args]


def template_dir(libs: Path) -> Path:
    root = runtime_dir()
    template = root / f"kafka-{KAFKA_VERSION}-template"
    if (template / "meta.properties").is_file():
        return template
    with open(root / "kafka-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (template / "meta.properties").is_file():
            return template
        staging = root / f"kafka-template.{os.getpid()}"
        remove_tree(staging)
        staging.mkdir(parents=True)
        props = staging.parent / f"kafka-format.{os.getpid()}.properties"
        props.write_text(_properties(staging, free_port(), free_port()), encoding="utf-8")
        cluster_id = urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        done = subprocess.run(
            # "--cluster-id=…" in one argument: a base64 id may start with "-".
            _java_command(libs, "kafka.tools.StorageTool", "format",
                          f"--cluster-id={cluster_id}", "-c", str(props)),
            capture_output=True, text=True,
        )
        props.unlink(missing_ok=True)
        if done.returncode != 0:
            raise ServiceError(f"kafka storage format failed:\n{done.stdout}{done.stderr}")
        os.replace(staging, template)
    return template


def start(workdir: Path, tied_to_parent: bool = True) -> Endpoint:
    reason = missing()
    if reason:
        raise ServiceError(reason)
    libs = libs_dir()
    assert libs is not None
    home = workdir / "kafka"
    remove_tree(home)
    home.mkdir(parents=True)
    data = home / "data"
    shutil.copytree(template_dir(libs), data)
    port, controller_port = free_port(), free_port()
    (home / "server.properties").write_text(
        _properties(data, port, controller_port), encoding="utf-8")
    (home / "log4j2.properties").write_text(LOG4J2, encoding="utf-8")
    endpoint = Endpoint(
        service="kafka", backend="local", host="127.0.0.1", port=port,
        extra={"home": str(home), "libs": str(libs), "controller_port": controller_port,
               "log": str(home / "kafka.log")},
    )
    _launch(endpoint, tied_to_parent)
    return endpoint


def _launch(endpoint: Endpoint, tied_to_parent: bool) -> None:
    home = Path(endpoint.extra["home"])
    log = Path(endpoint.extra["log"])
    proc = spawn(
        _java_command(Path(endpoint.extra["libs"]), "kafka.Kafka",
                      str(home / "server.properties"), log4j=home / "log4j2.properties"),
        log,
        tied_to_parent=tied_to_parent,
        cwd=home,
    )
    endpoint.extra["pid"] = proc.pid
    (home / "kafka.pid").write_text(str(proc.pid), encoding="ascii")

    def exited() -> str | None:
        if proc.poll() is None:
            return None
        return f"the Kafka JVM exited with {proc.returncode}; last log lines:\n{tail(log)}"

    wait_until(lambda: ready(endpoint), timeout=90, what=f"kafka on port {endpoint.port}",
               failed=exited, interval=0.1)
    wait_until(lambda: coordinator_ready(endpoint), timeout=60,
               what=f"kafka's group coordinator on port {endpoint.port}", failed=exited,
               interval=0.2)


def ready(endpoint: Endpoint) -> bool:
    """Metadata from the broker naming itself: the broker is registered and unfenced."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": endpoint.url, "log_level": 0,
                         "socket.connection.setup.timeout.ms": 1000})
    metadata = admin.list_topics(timeout=2)
    return bool(metadata.brokers)


def coordinator_ready(endpoint: Endpoint) -> bool:
    """A group's committed offsets can be read: the offsets topic exists and is loaded.
    On a new broker the first group to ask creates that topic, and for a second or so every
    group gets NOT_COORDINATOR: a lab's first commit must not be the one that pays for it."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": endpoint.url, "log_level": 0})
    # Describing a group that does not exist asks its coordinator (list_consumer_group_offsets
    # would too, but crashes librdkafka 2.16 on a broker this new).
    futures = admin.describe_consumer_groups(["labrunner-readiness"], request_timeout=5)
    try:
        for future in futures.values():
            future.result(timeout=10)
    except KafkaException:
        return False
    return True


def current_pid(endpoint: Endpoint) -> int:
    try:
        return int((Path(endpoint.extra["home"]) / "kafka.pid").read_text().strip())
    except (OSError, ValueError):
        return int(endpoint.extra.get("pid", 0))


def stop(endpoint: Endpoint, remove: bool = True) -> None:
    pid = current_pid(endpoint)
    if pid and pid_alive(pid):
        # Throwaway data: no need for a controlled shutdown's seconds of leader moves.
        terminate(pid, timeout=10 if not remove else 3, sig=signal.SIGTERM, group=False)
    if remove:
        remove_tree(Path(endpoint.extra["home"]))


def restart(endpoint: Endpoint) -> Endpoint:
    stop(endpoint, remove=False)
    _launch(endpoint, tied_to_parent=False)
    return endpoint
