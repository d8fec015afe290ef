"""ph4.10 verification: two instances of the learner's app, each its own process
(learner.python), behind a round-robin balancer the test runs, with state in a real Redis
(a database of the test's own).

* a session started on one instance continues on the other;
* 8 clients x 25 increments of a shared counter through the balancer: the values handed
  out are exactly 1..200;
* mid-run one instance is killed with SIGKILL; the balancer retries the refused request on
  the survivor; the cart still holds every item, in order.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

READY = 20.0


class Instance:
    def __init__(self, learner: Any, name: str, redis_url: str) -> None:
        self.name = name
        self.proc = learner.python("app", env={"REDIS_URL": redis_url, "INSTANCE": name},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.port = 0
        self.stderr = b""
        found = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in iter(self.proc.stdout.readline, b""):
                m = re.match(rb"listening on (\d+)", line)
                if m and not found.is_set():
                    self.port = int(m.group(1))
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(READY):
            self.stop()
            assert self.proc.stderr is not None
            err = self.proc.stderr.read().decode(errors="replace")[-1500:]
            pytest.fail(f"instance {name}: app.py did not print 'listening on <port>' within "
                        f"{READY:.0f} s (exit status {self.proc.returncode})\n{err}",
                        pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class Reply:
    def __init__(self, status: int, body: bytes, headers: dict[str, str], served_by: str):
        self.status, self.body, self.headers, self.served_by = status, body, headers, served_by

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            pytest.fail(f"the app answered {self.status} with a body that is not JSON: "
                        f"{self.body[:200]!r}", pytrace=False)


class RoundRobin:
    """The balancer: each request to the next live instance; a refused connection marks
    the instance dead and the request goes to the next one (nothing was processed)."""

    def __init__(self, instances: list[Instance]) -> None:
        self.instances = instances
        self.dead: set[str] = set()
        self.next = 0
        self.lock = threading.Lock()

    def pick(self) -> Instance:
        with self.lock:
            live = [i for i in self.instances if i.name not in self.dead]
            if not live:
                pytest.fail("no instance left alive", pytrace=False)
            inst = live[self.next % len(live)]
            self.next += 1
            return inst

    def request(self, method: str, path: str, doc: Any = None, cookie: str | None = None
                ) -> Reply:
        for _ in range(len(self.instances)):
            inst = self.pick()
            conn = http.client.HTTPConnection("127.0.0.1", inst.port, timeout=30)
            body = json.dumps(doc).encode() if doc is not None else None
            headers = {"Content-Type": "application/json"} if body else {}
            if cookie:
                headers["Cookie"] = cookie
            try:
                conn.request(method, path, body=body, headers=headers)
            except ConnectionRefusedError:
                with self.lock:
                    self.dead.add(inst.name)
                continue
            resp = conn.getresponse()
            reply = Reply(resp.status, resp.read(), dict(resp.getheaders()), inst.name)
            conn.close()
            return reply
        pytest.fail(f"{method} {path}: every instance refused the connection", pytrace=False)


@pytest.fixture
def cluster(learner: Any, redis_db: Any) -> Iterator[tuple[RoundRobin, list[Instance]]]:
    learner.path("app.py")
    instances: list[Instance] = []
    try:
        for name in ("A", "B"):
            instances.append(Instance(learner, name, redis_db.url))
        yield RoundRobin(instances), instances
    finally:
        for inst in instances:
            inst.stop()


def login(lb: RoundRobin, user: str) -> str:
    reply = lb.request("POST", "/login", {"user": user})
    assert reply.status == 200, f"POST /login answered {reply.status}: {reply.body[:200]!r}"
    cookie = reply.headers.get("Set-Cookie", "")
    m = re.match(r"\s*(session=[^;]+)", cookie)
    assert m, f"POST /login set no session cookie (Set-Cookie: {cookie!r})"
    return m.group(1)


def test_a_session_continues_on_the_other_instance(cluster: Any) -> None:
    lb, _ = cluster
    cookie = login(lb, "ann")                       # served by A
    for _ in range(4):                              # B, A, B, A
        reply = lb.request("GET", "/me", cookie=cookie)
        assert reply.status == 200 and reply.json().get("user") == "ann", (
            f"logged in on instance A; GET /me on instance {reply.served_by} answered "
            f"{reply.status} {reply.body[:120]!r}, expected 200 with user 'ann'\nThe "
            "session lives where the login happened: keep sessions in Redis (a key per "
            "session id, with a TTL) and keep nothing per instance - no dict in the "
            "process, no key or secret that differs between instances.")


def test_a_shared_counter_is_exact(cluster: Any) -> None:
    lb, _ = cluster
    values: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(25):
            reply = lb.request("POST", "/counter")
            if reply.status != 200:
                errors.append(f"{reply.status} {reply.body[:100]!r}")
                return
            with lock:
                values.append(int(reply.json()["value"]))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, f"POST /counter failed: {errors[0]}"
    final = lb.request("GET", "/counter").json().get("value")
    dupes = len(values) - len(set(values))
    assert sorted(values) == list(range(1, 201)) and final == 200, (
        f"200 increments through two instances handed out {len(set(values))} distinct "
        f"values ({dupes} repeated), highest {max(values, default=0)}, and GET /counter "
        f"says {final}; expected exactly 1..200\nEach instance counting in its own memory "
        "hands out the same numbers twice; read-then-write in Redis (GET, then SET) loses "
        "increments that interleave. Use one atomic command: INCR.")


def test_killing_an_instance_loses_nothing(cluster: Any) -> None:
    lb, instances = cluster
    cookie = login(lb, "bob")
    served = set()
    for i in range(20):
        if i == 10:
            victim = instances[1]
            victim.proc.send_signal(signal.SIGKILL)   # no goodbye, no flush
            victim.proc.wait()
        reply = lb.request("POST", "/cart", {"item": f"item-{i}"}, cookie=cookie)
        served.add(reply.served_by)
        assert reply.status == 200, (
            f"adding item {i} on instance {reply.served_by}"
            f"{' after B was killed' if i >= 10 else ''} answered {reply.status} "
            f"{reply.body[:120]!r}\nThe session must be readable by every instance.")
    assert served == {"A", "B"}, f"test setup: only {served} served requests"
    reply = lb.request("GET", "/cart", cookie=cookie)
    items = reply.json().get("items") if reply.status == 200 else None
    want = [f"item-{i}" for i in range(20)]
    assert items == want, (
        f"after instance B was killed with SIGKILL halfway, the cart read on "
        f"{reply.served_by} holds {items!r}, expected all 20 items in order\nItems that "
        "instance B kept in its memory died with it. Keep the cart in Redis (RPUSH onto a "
        "list per session): a killed instance then takes nothing with it.")
