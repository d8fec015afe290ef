"""Prometheus: scrape targets and jobs of each test's own.

Locally Debian's prometheus server on a free loopback port, with a throwaway TSDB and its own
config; in a container ``prom/prometheus`` on the host's network (listening on 127.0.0.1
only), so it reaches the tests' apps on the host's loopback; external: a URL, and a folder
of target files that server reads.

Nothing is scraped statically: the config reads its targets from JSON files in a folder
(``file_sd_configs``), which Prometheus watches, so each test registers the targets it wants
(with a ``job`` label of its own) at run time and removes them at its end. The scrape interval
is short (labs wait for a few scrapes, not minutes); ``--web.enable-lifecycle`` lets a test or
the runner ask for a reload or a clean quit over HTTP. ``--web.enable-remote-write-receiver``
lets a test write samples straight into the TSDB (``POST /api/v1/write``), without a target.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base import ContainerSpec, Endpoint, Launch, ServiceKind, register
from ..local.process import free_port, service_owner, which

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..base import ServiceScope

SCRAPE_INTERVAL = "500ms"
# A scrape that times out is not counted as a success; the fixture just waits for the next.
SCRAPE_TIMEOUT = "500ms"
# How often Prometheus applies changed target files (it also watches them with inotify; its
# discovery and scrape managers then apply target changes at most every 5 s).
FILE_SD_REFRESH = "1s"


# A folder the external Prometheus reads targets from (file_sd_configs over '<folder>/*.json',
# with the target files' labels kept): without it, tests cannot register their own targets.
TARGETS_ENV = "LABRUNNER_PROMETHEUS_TARGETS_DIR"


def binary() -> str | None:
    return os.environ.get("LABRUNNER_PROMETHEUS") or which("prometheus", "/usr/bin")


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


def flags(config: str, data: str, port: int) -> list[str]:
    return [
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
        # POST /api/v1/write: a test may store samples it computed itself, at once, rather
        # than wait about 5 s for a new scrape target to be picked up (ph7.4).
        "--web.enable-remote-write-receiver",
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",
    ]


def _config_folder(root: Path) -> Path:
    """Write the config into ``root`` beside an empty, world-writable folder of target files
    (the tests, maybe another uid when grading, write there); return that folder."""
    targets = root / "targets"
    targets.mkdir(parents=True, exist_ok=True)
    os.chmod(targets, 0o777)
    (root / "prometheus.yml").write_text(config_text(str(targets)), encoding="utf-8")
    return targets


@register
class Prometheus(ServiceKind):
    name = "prometheus"
    fixture = "prometheus"
    folder = "prometheus"
    ready_interval = 0.02
    image = "prom/prometheus:v2.42.0"
    container_poll = 0.05
    external_env = "LABRUNNER_PROMETHEUS_URL"  # http://host:9090

    def url(self, endpoint: Endpoint) -> str:
        return str(endpoint.extra.get("url") or
                   f"http://{endpoint.host}:{endpoint.port}").rstrip("/")

    def ready(self, endpoint: Endpoint) -> bool:
        import urllib.request  # here: every labrunner command imports the kinds

        with urllib.request.urlopen(endpoint.url + "/-/ready", timeout=2) as response:
            return int(response.status) == 200

    def missing(self) -> str | None:
        if binary() is None:
            return ("prometheus not found. Install it: sudo apt-get install "
                    "--no-install-recommends prometheus  (or set LABRUNNER_PROMETHEUS)")
        return None

    def prepare(self, folder: Path) -> Endpoint:
        root = folder
        targets = _config_folder(root)
        (root / "data").mkdir(mode=0o700)
        # The tests (another uid when grading) pass through to the target files.
        os.chmod(root, 0o711)
        return Endpoint(
            service="prometheus", backend="local", host="127.0.0.1", port=free_port(),
            extra={"dir": str(root), "targets_dir": str(targets), "binary": binary(),
                   "log": str(root / "prometheus.log")},
        )

    def launches(self, endpoint: Endpoint) -> list[Launch]:
        root = Path(endpoint.extra["dir"])
        cmd = [endpoint.extra["binary"],
               *flags(str(root / "prometheus.yml"), str(root / "data"), endpoint.port)]
        # Prometheus writes no pid file of its own.
        return [Launch(cmd, Path(endpoint.extra["log"]), cwd=root,
                       as_service_user=service_owner() is not None,
                       pidfile=root / "prometheus.pid")]

    def container(self, workdir: Path) -> ContainerSpec:
        """On the host's network, listening on 127.0.0.1 only; its config and target files
        in a host folder mounted at the same path. The image's entrypoint is the server:
        the command is its flags."""
        root = workdir / "prometheus"
        targets = _config_folder(root)
        port = free_port()
        endpoint = Endpoint("prometheus", "docker", "127.0.0.1", port,
                            extra={"targets_dir": str(targets), "dir": str(root)})
        command = flags(str(root / "prometheus.yml"), "/prometheus", port)
        return ContainerSpec(endpoint, command=command, volumes=[str(root)], host_network=True)

    def external_extra(self, url: urllib.parse.SplitResult) -> dict[str, Any]:
        extra = {"url": url.geturl().rstrip("/")}
        if os.environ.get(TARGETS_ENV):
            extra["targets_dir"] = os.environ[TARGETS_ENV]
        return extra

    def open(self, endpoint: Endpoint, scope: ServiceScope) -> PrometheusServer:
        return PrometheusServer(endpoint.url, endpoint, scope)

    def close(self, handle: Any, scope: ServiceScope) -> None:
        handle.close()


@dataclass
class PrometheusServer:
    """A real Prometheus server; the targets a test registers are its own (one ``job`` label
    per registration) and are removed when the test ends."""

    url: str
    endpoint: Endpoint
    _scope: ServiceScope
    _jobs: dict[str, tuple[Path, list[str]]] = field(default_factory=dict)  # file, targets

    def scrape(self, target: str | Sequence[str], *, path: str = "/metrics",
               job: str | None = None, interval: float | None = None) -> str:
        """Have Prometheus scrape ``host:port`` (at ``path``) for this test; return the job
        name to filter every query on (``job="<name>"``). Several targets (a list) are the
        instances of one service scaled out: one job, each target's series telling apart
        by its ``instance`` label (the ``host:port``).

        ``job`` registers under that name exactly instead of a fresh one, for a lab whose
        queries must pick one job among look-alikes (names one character or a suffix apart,
        holding quotes or backslashes: ph7.5). Making it unique beyond this test is the
        caller's part (series outlive their test): put a fresh token in it.

        ``interval`` (seconds, whole milliseconds) scrapes this job's targets that often
        instead of every SCRAPE_INTERVAL, each scrape timing out after the same time (the
        target labels ``__scrape_interval__`` and ``__scrape_timeout__``). A new target is
        picked up after about 5 s (fixed timers): samples needed at once are written (ph7.4)."""
        import pytest

        targets = [target] if isinstance(target, str) else list(target)
        if not targets or len(set(targets)) != len(targets):
            raise pytest.UsageError(f"prometheus.scrape({target!r}): give one or more "
                                    "distinct 'host:port' targets")
        for one in targets:
            if not isinstance(one, str) or "/" in one or ":" not in one:
                raise pytest.UsageError(f"prometheus.scrape({target!r}): give each target "
                                        "as 'host:port' and the path as path=...")
        labels = {"__metrics_path__": path}
        if interval is not None:
            milliseconds = round(interval * 1000)
            if milliseconds <= 0 or abs(interval * 1000 - milliseconds) > 1e-6:
                raise pytest.UsageError(f"prometheus.scrape(interval={interval!r}): give "
                                        "seconds, a positive whole number of milliseconds")
            labels["__scrape_interval__"] = labels["__scrape_timeout__"] = f"{milliseconds}ms"
        folder = self.endpoint.extra.get("targets_dir")
        if not folder:
            pytest.fail(
                f"this lab registers its own scrape targets, and the external Prometheus at "
                f"{self.url} has no folder of target files for that: set "
                "LABRUNNER_PROMETHEUS_TARGETS_DIR to a folder that Prometheus reads with "
                "file_sd_configs (files: ['<folder>/*.json']), or run with --backend local",
                pytrace=False)
        # Unique beyond this run too: series outlive their test (for 5 minutes, or for good
        # with explicit timestamps), and another pytest process of the same run (dev check,
        # grading) counts its names from 1 as well.
        fresh = f"{self._scope.new_name()}_{secrets.token_hex(3)}"
        if job is None:
            job = fresh
        elif not isinstance(job, str) or not job or job in self._jobs:
            raise pytest.UsageError(f"prometheus.scrape(job={job!r}): give a job name not "
                                    "registered yet")
        file = Path(folder) / f"{fresh}.json"  # the test's name may hold any character
        tmp = file.with_name(file.name + ".tmp")  # not *.json: Prometheus ignores it
        tmp.write_text(json.dumps([{"targets": targets,
                                    "labels": {"job": job, **labels}}]),
                       encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, file)
        self._jobs[job] = (file, targets)
        return job

    def wait_for_scrapes(self, job: str, count: int = 1, timeout: float = 30) -> None:
        """Return once Prometheus has scraped each of ``job``'s targets successfully
        ``count`` times, each scrape begun after this call (so it saw what the test did
        before calling)."""
        import pytest

        if job not in self._jobs:
            raise pytest.UsageError(f"prometheus.wait_for_scrapes({job!r}): not a job this "
                                    "test registered with prometheus.scrape()")
        since = time.time()
        deadline = time.monotonic() + timeout
        seen: dict[str, int] = {}
        while True:
            window = int(time.time() - since) + 5
            series = self.query(f"up{{job={json.dumps(job, ensure_ascii=False)}}}[{window}s]")
            seen = {target: 0 for target in self._jobs[job][1]}
            for s in series:
                instance = s.get("metric", {}).get("instance", "")
                if instance in seen:
                    seen[instance] = sum(1 for stamp, value in s.get("values", [])
                                         if float(stamp) > since + 0.003 and value == "1")
            if min(seen.values()) >= count:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        pytest.fail(self._not_scraped(job, count, seen, timeout), pytrace=False)

    def _not_scraped(self, job: str, count: int, seen: dict[str, int], timeout: float) -> str:
        targets = self._api("/api/v1/targets", {"state": "active"}).get("activeTargets", [])
        mine = {t.get("labels", {}).get("instance"): t for t in targets
                if t.get("labels", {}).get("job") == job}
        lagging = [instance for instance, n in seen.items() if n < count]
        never = [instance for instance in lagging if instance not in mine]
        if never:
            return (f"Prometheus never started scraping {', '.join(never)} (job {job!r}) "
                    f"within {timeout:.0f} s (it picks new targets up within about 10 s): "
                    "is the machine overloaded?")
        target = mine[lagging[0]]
        error = target.get("lastError") or "(none)"
        return (f"Prometheus scraped {target.get('scrapeUrl')} successfully "
                f"{seen[lagging[0]]} of the {count} time(s) waited for in {timeout:.0f} s; "
                f"target health {target.get('health')!r}, last scrape error: {error}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query (``/api/v1/query``) evaluated now: ``data.result``."""
        data = self._api("/api/v1/query", {"query": expr}, what=expr)
        return list(data.get("result", []))

    def query_range(self, expr: str, start: float, end: float,
                    step: float | str) -> list[dict[str, Any]]:
        """A range query (``/api/v1/query_range``), start and end in Unix seconds."""
        data = self._api("/api/v1/query_range",
                         {"query": expr, "start": start, "end": end, "step": step}, what=expr)
        return list(data.get("result", []))

    def write(self, series: dict[tuple[tuple[str, str], ...], list[tuple[int, float]]]
              ) -> None:
        """Store samples at once with Prometheus' remote-write protocol (the receiver is
        on: ``flags()``), rather than wait about 5 s for a new scrape target: each series'
        labels (``__name__`` among them, sorted) to its (ms timestamp, value) samples."""
        import urllib.error
        import urllib.request

        import pytest

        request = urllib.request.Request(
            f"{self.url}/api/v1/write", data=_snappy(_write_request(series)), method="POST",
            headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
                     "X-Prometheus-Remote-Write-Version": "0.1.0"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            pytest.fail(f"Prometheus at {self.url} did not store the test's samples "
                        f"(HTTP {exc.code}: {exc.read().decode(errors='replace').strip()}): "
                        "start it with --web.enable-remote-write-receiver", pytrace=False)

    def _api(self, path: str, params: dict[str, Any], what: str = "") -> dict[str, Any]:
        import urllib.error
        import urllib.request

        import pytest

        body = urllib.parse.urlencode(params)
        if path.endswith("/targets"):  # GET only; the queries go by POST (they may be long)
            request = urllib.request.Request(f"{self.url}{path}?{body}")
        else:
            request = urllib.request.Request(self.url + path, data=body.encode(), method="POST")
            request.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read()).get("error") or str(exc)
            except ValueError:
                error = str(exc)
            pytest.fail(f"Prometheus rejected the query {what!r}: {error}" if what else
                        f"Prometheus {path}: {error}", pytrace=False)
        return dict(payload.get("data") or {})

    def close(self) -> None:
        for file, _ in self._jobs.values():
            file.unlink(missing_ok=True)
        self._jobs.clear()


# Remote write's body, written here: no library in the venv builds a prompb WriteRequest, and
# its three messages need only length-delimited fields, a double and a varint.
def _write_request(series: dict[tuple[tuple[str, str], ...], list[tuple[int, float]]]) -> bytes:
    """A WriteRequest: TimeSeries (1) of Labels (1: name 1, value 2) and Samples (2: value 1
    as a double, timestamp 2 as a varint of milliseconds)."""
    return b"".join(
        _field(1, b"".join(_field(1, _field(1, name.encode()) + _field(2, value.encode()))
                           for name, value in labels)
               + b"".join(_field(2, b"\x09" + struct.pack("<d", value) + b"\x10"
                                 + _varint(ms)) for ms, value in samples))
        for labels, samples in series.items())


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _snappy(data: bytes) -> bytes:
    """Snappy's block format with every byte a literal: valid snappy, uncompressed."""
    out = bytearray(_varint(len(data)))
    for at in range(0, len(data), 65536):
        chunk = data[at:at + 65536]
        n = len(chunk) - 1
        out += bytes([n << 2]) if n < 60 else (
            bytes([60 << 2, n]) if n < 256 else bytes([61 << 2]) + n.to_bytes(2, "little"))
        out += chunk
    return bytes(out)
