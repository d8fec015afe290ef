"""Apache Kafka 4.3.1 in KRaft mode (one node, broker and controller): a topic and group
prefix per test.

Locally on the JVM; in a container the official ``apache/kafka`` image with the same settings.

The jars come from Maven Central once (``labrunner setup`` runs Maven on the pom shipped in
``labrunner/data``) into the user's cache, or from an existing ``$KAFKA_HOME``. Storage is
formatted once into a template and copied per start: formatting costs a JVM start of its
own. The quorum is static (``controller.quorum.voters``), so a formatted template does not
depend on the ports a later start picks.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from base64 import urlsafe_b64encode
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base import ContainerSpec, Endpoint, Launch, ServiceError, ServiceKind, register
from ..local.process import free_port, remove_tree, runtime_dir, service_owner
from .kafka_config import broker_properties as _properties

if TYPE_CHECKING:
    from ..base import ServiceScope

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


def _java_command(libs: Path, main: str, *args: str, log4j: Path | None = None,
                  cds: list[str] | None = None) -> list[str]:
    cmd = [java() or "java", "-Xms128m", "-Xmx768m", "-XX:+UseSerialGC",
           # C1 only: a one-node test broker starts a second faster and needs no peak speed.
           "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true", *(cds or [])]
    if log4j is not None:
        cmd.append(f"-Dlog4j2.configurationFile={log4j}")
    return [*cmd, "-cp", f"{libs}/*", main, *args]


# --- class-data sharing -----------------------------------------------------------------
# The broker's JVM spends most of its start loading and verifying some 4,000 classes. An
# AppCDS archive (JDK 13+ dynamic archive: -XX:ArchiveClassesAtExit) made once at set-up
# maps them ready-parsed instead. The JVM checks the archive against the class path and its
# own build and runs without it if they differ; we also use it only while its stamp (the
# java binary and every jar, with sizes and times) matches, so a Kafka or JDK upgrade
# rebuilds it at the next ``labrunner setup`` and never half-uses a stale one.

log = logging.getLogger(__name__)


def cds_archive() -> Path:
    return cache_dir() / "kafka-broker.jsa"


def _cds_stamp(libs: Path) -> str:
    binary = Path(os.path.realpath(java() or "java"))
    parts = [str(binary), str(binary.stat().st_size) if binary.exists() else "?"]
    for jar in sorted(libs.glob("*.jar")):
        stat = jar.stat()
        parts.append(f"{jar.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def cds_options(libs: Path) -> tuple[list[str], str]:
    """The JVM options that use the archive, and what to log: none and why when it is
    missing or stale."""
    archive = cds_archive()
    stamp = archive.with_suffix(".stamp")
    if not archive.is_file():
        return [], f"no AppCDS archive at {archive} (labrunner setup makes it): JVM starts cold"
    try:
        current = stamp.read_text(encoding="ascii").strip() == _cds_stamp(libs)
    except OSError:
        current = False
    if not current:
        return [], (f"the AppCDS archive {archive} was made for other jars or another JVM "
                    "(labrunner setup makes it again): JVM starts cold")
    return ([f"-XX:SharedArchiveFile={archive}", "-Xshare:auto", "-Xlog:cds=off",
             "-Xlog:cds+dynamic=off"], f"AppCDS archive {archive}")


def build_cds_archive(force: bool = False) -> Path | None:
    """Make the broker's AppCDS archive once: start a broker with -XX:ArchiveClassesAtExit,
    wait until it is ready (a group coordinator too: those classes load then), stop it
    cleanly (the JVM writes the archive as it exits). Idempotent; None if no Kafka here."""
    libs = libs_dir()
    if libs is None or java() is None:
        return None
    archive = cds_archive()
    stamp = archive.with_suffix(".stamp")
    if not force and archive.is_file() and stamp.is_file() and \
            stamp.read_text(encoding="ascii").strip() == _cds_stamp(libs):
        return archive
    from ..base import wait_until
    from ..local.process import spawn, terminate

    work = runtime_dir() / f"kafka-cds.{os.getpid()}"
    remove_tree(work)
    work.mkdir(parents=True)
    staging = archive.with_name(f"{archive.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    try:
        endpoint = Kafka().prepare(work)
        cmd = _java_command(libs, "kafka.Kafka", str(work / "server.properties"),
                            log4j=work / "log4j2.properties",
                            cds=[f"-XX:ArchiveClassesAtExit={staging}"])
        proc = spawn(cmd, work / "kafka.log", cwd=work)
        wait_until(lambda: broker_ready(endpoint) and coordinator_ready(endpoint), 150,
                   "kafka (making the AppCDS archive)",
                   failed=lambda: None if proc.poll() is None else "the broker exited")
        terminate(proc.pid, timeout=60, sig=signal.SIGTERM, group=False)
        proc.wait(timeout=10)
        if not staging.is_file():
            raise ServiceError("the JVM wrote no AppCDS archive: "
                               f"{(work / 'kafka.log').read_text(errors='replace')[-500:]}")
        os.replace(staging, archive)
        stamp.write_text(_cds_stamp(libs), encoding="ascii")
        return archive
    finally:
        staging.unlink(missing_ok=True)
        remove_tree(work)


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
        cluster_id = _cluster_id()
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


def _cluster_id() -> str:
    """A KRaft cluster id as Kafka's ``random-uuid`` makes them: base64 of 16 random bytes,
    never starting with "-" (a command line would read it as an option)."""
    while True:
        candidate = urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not candidate.startswith("-"):
            return candidate


CONTAINER_LOG_DIR = "/tmp/kraft-combined-logs"  # the official image's default


def container_env(port: int) -> dict[str, str]:
    """The local broker's settings as the official image's KAFKA_* variables, with the
    listener inside the container on the same port the host publishes, so the address it
    advertises (127.0.0.1:port) is the one clients use."""
    lines = _properties(Path(CONTAINER_LOG_DIR), port, 9093).splitlines()
    settings = dict(line.split("=", 1) for line in lines if "=" in line)
    settings.update({
        "listeners": f"PLAINTEXT://0.0.0.0:{port},CONTROLLER://localhost:9093",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.quorum.voters": "1@localhost:9093",
        "log.dirs": CONTAINER_LOG_DIR,
    })
    env = {
        "KAFKA_" + key.replace("_", "___").replace("-", "__").replace(".", "_").upper(): value
        for key, value in settings.items()
    }
    env.update({
        "CLUSTER_ID": _cluster_id(),
        "KAFKA_HEAP_OPTS": "-Xms128m -Xmx768m",
        "KAFKA_JVM_PERFORMANCE_OPTS": "-XX:+UseSerialGC -XX:TieredStopAtLevel=1 "
                                      "-Djava.awt.headless=true",
    })
    return env


@register
class Kafka(ServiceKind):
    name = "kafka"
    fixture = "kafka"
    folder = "kafka"
    ready_timeout = 150.0
    ready_interval = 0.1
    # Throwaway data: no need for a controlled shutdown's seconds of leader moves.
    discard_timeout = 3.0
    image = f"apache/kafka:{KAFKA_VERSION}"
    container_ready_timeout = 120.0
    container_poll = 0.2
    external_env = "LABRUNNER_KAFKA_BOOTSTRAP"  # host:9092

    def url(self, endpoint: Endpoint) -> str:
        return f"{endpoint.host}:{endpoint.port}"

    def ready(self, endpoint: Endpoint) -> bool:
        return broker_ready(endpoint) and coordinator_ready(endpoint)

    def missing(self) -> str | None:
        return missing()

    def prepare(self, folder: Path) -> Endpoint:
        libs = libs_dir()
        assert libs is not None  # missing() said so
        home = folder
        data = home / "data"
        shutil.copytree(template_dir(libs), data)
        port, controller_port = free_port(), free_port()
        (home / "server.properties").write_text(
            _properties(data, port, controller_port), encoding="utf-8")
        (home / "log4j2.properties").write_text(LOG4J2, encoding="utf-8")
        return Endpoint(
            service="kafka", backend="local", host="127.0.0.1", port=port,
            extra={"dir": str(home), "libs": str(libs), "controller_port": controller_port,
                   "log": str(home / "kafka.log")},
        )

    def launches(self, endpoint: Endpoint) -> list[Launch]:
        home = Path(endpoint.extra["dir"])
        libs = Path(endpoint.extra["libs"])
        cds, why = cds_options(libs)
        log_file = Path(endpoint.extra["log"])
        if not log_file.exists() or cds:
            log.info("kafka: %s", why)
        if not cds:
            # Said in the broker's own log, where one looks when it starts slowly.
            with open(log_file, "a", encoding="utf-8") as out:
                out.write(f"labrunner: {why}\n")
        cmd = _java_command(libs, "kafka.Kafka", str(home / "server.properties"),
                            log4j=home / "log4j2.properties", cds=cds)
        # A graded run's broker is its service uid's, like its Postgres and Redis. Its
        # PLAINTEXT listeners are on the loopback of the run's own network namespace, which
        # nothing else on the machine can reach.
        return [Launch(cmd, Path(endpoint.extra["log"]), cwd=home,
                       pidfile=home / "kafka.pid", as_service_user=service_owner() is not None)]

    def container(self, workdir: Path) -> ContainerSpec:
        port = free_port()
        endpoint = Endpoint("kafka", "docker", "127.0.0.1", port,
                            extra={"bootstrap": f"127.0.0.1:{port}"})
        return ContainerSpec(endpoint, {port: port}, container_env(port))

    def parse_external(self, value: str) -> Endpoint:
        host, _, port = value.split(",")[0].rpartition(":")
        return Endpoint(self.name, "external", host or "127.0.0.1", int(port),
                        extra={"bootstrap": value})

    def open(self, endpoint: Endpoint, scope: ServiceScope) -> KafkaNS:
        bootstrap = str(endpoint.extra.get("bootstrap") or endpoint.url)
        return KafkaNS(bootstrap, scope.new_name(), endpoint)

    def close(self, handle: Any, scope: ServiceScope) -> None:
        delete_prefix(handle.endpoint, handle.prefix)


def broker_ready(endpoint: Endpoint) -> bool:
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


# Consumer groups must form in a test in well under a second, not the client defaults.
FAST_CONSUMER = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    "auto.offset.reset": "earliest",
    "topic.metadata.refresh.interval.ms": 1000,
}


def offsets_served(admin: Any, topic: str, partitions: int) -> bool:
    """Every partition's leader answers ListOffsets. The metadata names a new partition's
    leader a moment before that broker serves it (KRaft publishes the metadata first): a
    client's get_watermark_offsets then fails with NOT_LEADER_FOR_PARTITION."""
    from confluent_kafka import KafkaException, TopicPartition
    from confluent_kafka.admin import OffsetSpec  # type: ignore[attr-defined]

    latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
    asked = {TopicPartition(topic, p): latest for p in range(partitions)}
    try:
        for future in admin.list_offsets(asked, request_timeout=5).values():
            future.result(timeout=10)
    except KafkaException:
        return False
    return True


@dataclass
class KafkaNS:
    """A topic and group prefix of this test's own on a real Kafka broker (the ``kafka``
    fixture)."""

    bootstrap: str
    prefix: str
    endpoint: Endpoint

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def group(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def admin(self) -> Any:
        """An AdminClient already connected: a new client's first list_offsets() waited
        about 1 s one time in two (its broker connection is made on a later tick; measured
        1.0 s against 0.06 s with a metadata request first, which connects it at once)."""
        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        with contextlib.suppress(KafkaException):   # unreachable: its own calls will say so
            admin.list_topics(timeout=5)
        return admin

    def create_topic(self, name: str, partitions: int = 1, **config: str) -> str:
        from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

        full = self.topic(name)
        # One client for the whole call: a client destroyed before its futures resolve
        # fails them with _DESTROY.
        admin = self.admin()
        futures = admin.create_topics(
            [NewTopic(full, num_partitions=partitions, replication_factor=1, config=config)],
            operation_timeout=15)
        futures[full].result(timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # wait until every partition has a leader
            meta = admin.list_topics(full, timeout=5).topics.get(full)
            if meta and meta.error is None and len(meta.partitions) == partitions and all(
                    p.leader >= 0 for p in meta.partitions.values()) and offsets_served(
                    admin, full, partitions):
                return full
            time.sleep(0.05)
        raise AssertionError(f"topic {full} has no leader for every partition after 15 s")

    def producer_config(self, **overrides: Any) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, "log_level": 0, **overrides}

    def consumer_config(self, group: str, **overrides: Any) -> dict[str, Any]:
        return {"bootstrap.servers": self.bootstrap, "group.id": self.group(group),
                "log_level": 0, **FAST_CONSUMER, **overrides}


def delete_prefix(endpoint: Endpoint, prefix: str) -> None:
    """Delete the topics and consumer groups a test made under its prefix."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": endpoint.url, "log_level": 0})
    topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    if topics:
        for future in admin.delete_topics(topics, operation_timeout=10).values():
            try:
                future.result(timeout=15)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass
    try:
        groups = admin.list_consumer_groups(request_timeout=10).result(timeout=15)
        mine = [g.group_id for g in groups.valid if g.group_id.startswith(prefix)]
        if mine:
            for future in admin.delete_consumer_groups(mine, request_timeout=10).values():
                try:
                    future.result(timeout=15)
                except Exception:  # noqa: BLE001 - a group with members left is skipped
                    pass
    except Exception:  # noqa: BLE001 - cleanup is best effort
        pass
