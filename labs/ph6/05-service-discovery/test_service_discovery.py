"""ph6.5 - a service registry on real Redis: TTL heartbeats, health, deregistration.

The learner's Registry runs against the test's own Redis database; the test reads the instance
keys itself (GET, PTTL) to see what the registry really stored. "Time passing" for a key is
simulated with PEXPIRE (as if most of its TTL had run out), and the one real expiry waits for
Redis itself. The instance process is the learner's registry.py, started, SIGTERMed and
SIGKILLed by the test."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from labrunner.testing import wait_until

API = {"a1": "127.0.0.1:7001", "a2": "127.0.0.1:7002"}


def key(service: str, instance: str) -> str:
    return f"services:{service}:{instance}"


@pytest.fixture
def world(learner: Any, redis_db: Any) -> Iterator[tuple[Any, Any]]:
    reg = learner.load("registry").Registry(redis_db.url)
    r = redis_db.client(decode_responses=True)
    yield reg, r
    reg.close()
    r.close()


def lookup(reg: Any, service: str) -> list[str]:
    return sorted(reg.lookup(service))


def test_instances_appear_with_a_ttl(world: Any) -> None:
    reg, r = world
    for iid, addr in API.items():
        reg.register("api", iid, addr, 30)
    reg.register("api-admin", "x1", "127.0.0.1:7999", 30)
    got = lookup(reg, "api")
    assert got == sorted(API.values()), (
        f"after registering api/a1 and api/a2 (and api-admin/x1), lookup('api') gave {got}: "
        f"expected {sorted(API.values())} - every live instance of that service, and only "
        "that service (match services:api:*, not services:api*)")
    pttl = r.pttl(key("api", "a1"))
    assert 0 < pttl <= 30_000, (
        f"the key {key('api', 'a1')} has PTTL {pttl} ms: expected a TTL of at most 30 s "
        "(-1 = no TTL: an instance that crashes without deregistering stays listed forever; "
        "-2 = no such key: store each instance under services:<service>:<id>)")


def test_a_silent_instance_expires(world: Any) -> None:
    reg, r = world
    reg.register("api", "a1", API["a1"], 30)
    reg.register("api", "gone", "127.0.0.1:7666", 1)
    assert "127.0.0.1:7666" in lookup(reg, "api")
    wait_until(lambda: "127.0.0.1:7666" not in lookup(reg, "api"),
               "lookup() to drop the instance registered with ttl=1 s that never sent a "
               "heartbeat (its key expires in Redis; the lookup must not keep a stale copy)")
    assert lookup(reg, "api") == [API["a1"]], "the live instance disappeared with the dead one"


def test_a_heartbeat_renews_the_ttl(world: Any) -> None:
    reg, r = world
    reg.register("api", "a1", API["a1"], 30)
    r.pexpire(key("api", "a1"), 2000)          # as if 28 of its 30 s had gone by
    reg.heartbeat("api", "a1", 30)
    pttl = r.pttl(key("api", "a1"))
    assert pttl > 20_000, (
        f"with 2 s left on {key('api', 'a1')}, heartbeat(ttl=30) left its PTTL at {pttl} ms: "
        "a heartbeat must push the expiry 30 s into the future again, or live instances "
        "expire between heartbeats (SET ... PX, or PEXPIRE)")
    assert lookup(reg, "api") == [API["a1"]]


def test_lookup_returns_healthy_instances_only(world: Any) -> None:
    reg, _ = world
    for iid, addr in API.items():
        reg.register("api", iid, addr, 30)
    reg.heartbeat("api", "a2", 30, healthy=False)
    got = lookup(reg, "api")
    assert got == [API["a1"]], (
        f"a2 reported itself unhealthy; lookup('api') gave {got}: expected only a1 - clients "
        "must not be sent to an instance failing its health check (it stays registered)")
    reg.heartbeat("api", "a2", 30, healthy=True)
    assert lookup(reg, "api") == sorted(API.values()), (
        "a2 reported healthy again but lookup() still leaves it out")


def test_deregister_removes_one_instance_at_once(world: Any) -> None:
    reg, r = world
    for iid, addr in API.items():
        reg.register("api", iid, addr, 30)
    reg.deregister("api", "a1")
    got = lookup(reg, "api")
    assert got == [API["a2"]] and not r.exists(key("api", "a1")), (
        f"after deregister('api', 'a1') lookup gives {got} and the key "
        f"{'still exists' if r.exists(key('api', 'a1')) else 'is gone'}: expected a1 gone at "
        "once (not when its TTL runs out) and a2 still listed")


def start(learner: Any, redis_db: Any, iid: str, ttl: str) -> subprocess.Popen[bytes]:
    return learner.python("registry", "--redis", redis_db.url, "--service", "pay", "--id", iid,
                          "--address", f"127.0.0.1:80{iid[-1]}", "--ttl", ttl,
                          "--interval", "0.2", stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)


def test_the_instance_process_heartbeats_and_deregisters_on_sigterm(
        learner: Any, redis_db: Any) -> None:
    r = redis_db.client(decode_responses=True)
    proc = start(learner, redis_db, "p1", "30")
    try:
        def registered() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read().decode()[-800:] if proc.stderr else ""
                pytest.fail(f"registry.py exited with {proc.returncode} before registering: "
                            f"{err}")
            return bool(r.exists(key("pay", "p1")))

        wait_until(registered, "registry.py to register pay/p1")
        r.pexpire(key("pay", "p1"), 3000)
        wait_until(lambda: r.pttl(key("pay", "p1")) > 20_000,
                   "registry.py's heartbeats (--interval 0.2) to renew the TTL of pay/p1")
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail("registry.py did not exit within 15 s of SIGTERM")
        assert code == 0 and not r.exists(key("pay", "p1")), (
            f"after SIGTERM registry.py exited with {code} and pay/p1 is "
            f"{'still registered' if r.exists(key('pay', 'p1')) else 'gone'}: expected exit 0 "
            "and the instance deregistered before exiting - Kubernetes and systemd stop a "
            "process with SIGTERM; without a handler clients keep being sent to it until "
            "the TTL runs out")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    crashed = start(learner, redis_db, "p2", "1")
    try:
        wait_until(lambda: r.exists(key("pay", "p2")), "registry.py to register pay/p2")
        crashed.kill()
        crashed.wait()
        wait_until(lambda: not r.exists(key("pay", "p2")),
                   "pay/p2, SIGKILLed (no chance to deregister), to expire with its 1 s TTL")
    finally:
        if crashed.poll() is None:
            crashed.kill()
            crashed.wait()
        r.close()
