"""The Prometheus service and fixture for real (a real server scraping a real
prometheus_client app), and Postgres stopped and started mid-test with its data kept."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest

from labrunner.services import kind
from labrunner.services.local.process import pid_alive
from labrunner.services.manager import ServiceSet


def _serve_app() -> Iterator[tuple[str, Any]]:
    """A prometheus_client app on a free loopback port with a counter of its own."""
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    registry = CollectorRegistry()
    counter = Counter("lr_demo_requests", "requests seen", registry=registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    yield f"127.0.0.1:{server.server_port}", counter
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def app() -> Iterator[tuple[str, Any]]:
    yield from _serve_app()


@pytest.fixture
def other_app() -> Iterator[tuple[str, Any]]:
    yield from _serve_app()


def test_prometheus_starts_and_leaves_nothing() -> None:
    service_set = ServiceSet.ephemeral("local")
    endpoint = service_set.ensure(["prometheus"])["prometheus"]
    assert endpoint.host == "127.0.0.1" and endpoint.port != 9090
    assert endpoint.url == f"http://127.0.0.1:{endpoint.port}"
    assert kind("prometheus").ready(endpoint)
    pid = int(endpoint.extra["pid"])
    assert pid_alive(pid)
    workdir = service_set.workdir
    service_set.stop()
    assert not pid_alive(pid), "prometheus still running after stop"
    assert not workdir.exists(), f"{workdir} left behind"


def test_fixture_scrapes_a_real_app(prometheus: Any, app: tuple[str, Any]) -> None:
    target, counter = app
    job = prometheus.scrape(target)
    counter.inc(7)
    prometheus.wait_for_scrapes(job, count=2)
    result = prometheus.query(f'lr_demo_requests_total{{job="{job}"}}')
    assert [float(r["value"][1]) for r in result] == [7.0], result
    # Another registration is another job: a test never sees another's series.
    other = prometheus.scrape(target)
    assert other != job
    now = time.time()
    ranged = prometheus.query_range(f'up{{job="{job}"}}', now - 30, now, 1)
    assert ranged and all(v == "1" for _, v in ranged[0]["values"])


def test_fixture_scrapes_instances_of_one_job(prometheus: Any, app: tuple[str, Any],
                                              other_app: tuple[str, Any]) -> None:
    # A service scaled out: two targets, one job, told apart by their instance label; the
    # wait is for every instance's scrapes. This job is scraped every 0.25 s, not every
    # SCRAPE_INTERVAL (0.5 s): its own interval.
    (target, counter), (other_target, other_counter) = app, other_app
    job = prometheus.scrape([target, other_target], interval=0.25)
    counter.inc(3)
    other_counter.inc(4)
    prometheus.wait_for_scrapes(job, count=3)
    result = prometheus.query(f'lr_demo_requests_total{{job="{job}"}}')
    assert sorted((r["metric"]["instance"], float(r["value"][1])) for r in result) == sorted(
        [(target, 3.0), (other_target, 4.0)]), result
    for series in prometheus.query(f'up{{job="{job}"}}[2s]'):  # a tick skipped under load
        stamps = [float(stamp) for stamp, _ in series["values"]]  # is a 0.5 s gap: the least
        gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
        assert gaps and 0.2 < min(gaps) < 0.3, (series["metric"], gaps)
    for wrong in (0, -1, 0.0001):
        with pytest.raises(pytest.UsageError, match="whole number of milliseconds"):
            prometheus.scrape(target, interval=wrong)


def test_fixture_scrapes_under_a_job_name_the_test_chose(
        prometheus: Any, app: tuple[str, Any], other_app: tuple[str, Any]) -> None:
    # Names one character apart, one holding a quote and a backslash: each registration is
    # its job, exactly as named, and the wait and the queries find it.
    import json
    import secrets

    (target, counter), (other_target, other_counter) = app, other_app
    token = secrets.token_hex(3)
    names = (f'api.v1 "eu" \\ {token}', f'api-v1 "eu" \\ {token}')
    assert prometheus.scrape(target, job=names[0]) == names[0]
    assert prometheus.scrape(other_target, job=names[1]) == names[1]
    with pytest.raises(pytest.UsageError, match="not registered yet"):
        prometheus.scrape(target, job=names[0])
    counter.inc(3)
    other_counter.inc(4)
    for name in names:
        prometheus.wait_for_scrapes(name, count=2)
    for name, want in zip(names, (3.0, 4.0), strict=True):
        result = prometheus.query(
            f"lr_demo_requests_total{{job={json.dumps(name)}}}")
        assert [(r["metric"]["job"], float(r["value"][1])) for r in result] == [
            (name, want)], result


def test_fixture_waits_for_every_instance(prometheus: Any, app: tuple[str, Any]) -> None:
    import socket

    with socket.socket() as sock:  # an instance nobody answers on: the wait names it
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
        job = prometheus.scrape([app[0], dead])
        with pytest.raises(pytest.fail.Exception, match=f"{dead}.*connection refused"):
            prometheus.wait_for_scrapes(job, timeout=15)


def test_fixture_reports_promql_errors(prometheus: Any) -> None:
    with pytest.raises(pytest.fail.Exception, match="parse error"):
        prometheus.query("rate(x[")


def test_fixture_names_the_scrape_error(prometheus: Any) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody answers on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        job = prometheus.scrape(f"127.0.0.1:{port}")
        with pytest.raises(pytest.fail.Exception, match="connection refused"):
            prometheus.wait_for_scrapes(job, timeout=15)


def test_targets_removed_at_test_end(prometheus: Any, app: tuple[str, Any]) -> None:
    from pathlib import Path

    job = prometheus.scrape(app[0])
    folder = Path(prometheus.endpoint.extra["targets_dir"])
    assert (folder / f"{job}.json").is_file()
    prometheus.close()
    assert not list(folder.glob("*.json"))


def test_postgres_stop_and_start_keep_data(postgres: Any) -> None:
    import psycopg

    with postgres.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
    postgres.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres.dsn, connect_timeout=3).close()
    postgres.start()
    with postgres.connect() as conn:
        assert conn.execute("SELECT x FROM kept").fetchone() == (42,)


def test_postgres_left_stopped_is_started_again(postgres: Any) -> None:
    postgres.stop()  # the fixture's teardown starts it again for the next test


def test_postgres_answers_after_a_test_left_it_stopped(postgres: Any) -> None:
    with postgres.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_samples_written_are_queryable_at_once(prometheus: Any) -> None:
    """write(): samples stored by remote write, stamped with their own times, are read back
    exactly by a query at one of those times - no scrape target to wait for."""
    now_ms = int(time.time() * 1000) // 1000 * 1000
    job = f"lr-write-{now_ms}"
    labels = (("__name__", "lr_written_total"), ("job", job), ("route", "/ä"))
    prometheus.write({labels: [(now_ms - 2000, 1.0), (now_ms - 1000, 2.5), (now_ms, 4.0)]})
    got = prometheus.query_range(f'lr_written_total{{job="{job}"}}', now_ms / 1000 - 2,
                                 now_ms / 1000, 1)
    assert [(s["metric"]["route"], [float(v) for _, v in s["values"]]) for s in got] == [
        ("/ä", [1.0, 2.5, 4.0])], got
