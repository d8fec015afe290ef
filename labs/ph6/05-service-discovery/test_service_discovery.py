"""ph6.5 - a service registry on real Redis: TTL heartbeats, health, deregistration.

The learner's Registry runs against the test's own Redis database; the test reads the instance
keys itself (GET, PTTL) to see what the registry really stored. "Time passing" for a key is
simulated with PEXPIRE (as if most of its TTL had run out), and the one real expiry waits for
Redis itself. The instance process is the learner's registry.py, started, SIGTERMed and
SIGKILLed by the test."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from labrunner.testing import redis_commands, wait_until

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


def ttl_written(commands: list[list[str]], name: str) -> int | None:
    """The TTL in ms the last command writing key `name` gave it (None: none given)."""
    given = None
    for c in commands:
        if c[1:2] != [name]:
            continue
        up = [a.upper() for a in c]
        if c[0] == "SET":
            given = None
            for flag, scale in (("PX", 1), ("EX", 1000)):
                if flag in up[3:] and up.index(flag, 3) + 1 < len(c):
                    given = int(float(c[up.index(flag, 3) + 1]) * scale)
        elif c[0] in ("PSETEX", "SETEX", "PEXPIRE", "EXPIRE") and len(c) > 2:
            given = int(float(c[2]) * (1 if c[0][0] == "P" else 1000))
    return given


def test_instances_appear_with_a_ttl(world: Any, redis_db: Any) -> None:
    reg, r = world
    with redis_commands(redis_db) as seen:
        for iid, addr in API.items():
            reg.register("api", iid, addr, 30)
    given = ttl_written(seen, key("api", "a1"))
    assert given is None or given >= 1_000, (
        f"register(ttl=30) gave {key('api', 'a1')} a TTL of {given} ms: the ttl is in "
        "seconds - PX takes milliseconds (px=int(ttl * 1000)), EX seconds")
    reg.register("api-admin", "x1", "127.0.0.1:7999", 30)
    got = lookup(reg, "api")
    assert got == sorted(API.values()), (
        f"after registering api/a1 and api/a2 (and api-admin/x1), lookup('api') gave {got}: "
        f"expected {sorted(API.values())} - every live instance of that service, and only "
        "that service (match services:api:*, not services:api*)")
    try:
        nobody = lookup(reg, "billing")
    except Exception as exc:  # noqa: BLE001 - the learner's error, named below
        pytest.fail(f"lookup('billing'), a service with no instance, raised "
                    f"{type(exc).__name__}: {exc} - expected [] (an empty SCAN gives no keys: "
                    "MGET with none is an error in Redis, skip it)")
    assert nobody == [], f"lookup('billing') (no instance registered) gave {nobody}, expected []"
    pttl = r.pttl(key("api", "a1"))
    assert 0 < pttl <= 30_000, (
        f"the key {key('api', 'a1')} has PTTL {pttl} ms: expected a TTL of at most 30 s "
        "(-1 = no TTL: an instance that crashes without deregistering stays listed forever; "
        "-2 = no such key: store each instance under services:<service>:<id>)")


def test_a_fractional_ttl_is_kept_to_the_millisecond(world: Any, redis_db: Any) -> None:
    reg, r = world
    with redis_commands(redis_db) as seen:
        reg.register("api", "a1", API["a1"], 2.5)
    given = ttl_written(seen, key("api", "a1"))
    assert given == 2_500 or (given is None and 2_000 < r.pttl(key("api", "a1")) <= 2_500), (
        f"register(ttl=2.5) wrote {key('api', 'a1')} with a TTL of "
        f"{'none' if given is None else f'{given} ms'}, expected 2500 ms: "
        + ("the TTL was rounded to whole seconds (EX/EXPIRE take integers): a heartbeat "
           "interval chosen as a fraction of the TTL then outlives it. Use PX with "
           "int(ttl * 1000)" if given in (2_000, 3_000) else
           "ttl is in seconds, PX takes milliseconds" if given is not None else
           "give the TTL with the write") + f" (commands: {seen[:4]})")
    with redis_commands(redis_db) as seen:
        reg.heartbeat("api", "a1", 1.5)
    given = ttl_written(seen, key("api", "a1"))
    pttl = r.pttl(key("api", "a1"))
    assert given is not None or pttl <= 1_500, (
        f"heartbeat(ttl=1.5) gave {key('api', 'a1')} no new TTL (its PTTL is {pttl} ms, what "
        "remained of the registration's 2.5 s): a heartbeat must set the TTL it is given "
        f"(SET ... PX, not KEEPTTL); commands: {seen[:4]}")
    assert given in (None, 1_500), (
        f"heartbeat(ttl=1.5) gave {key('api', 'a1')} a TTL of {given} ms, expected 1500: "
        "keep the TTL's fraction (PX, milliseconds), not whole seconds")


def test_registry_records_are_the_shared_format(world: Any) -> None:
    reg, r = world
    reg.register("api", "a1", API["a1"], 30)
    reg.heartbeat("api", "a1", 30, healthy=False)
    raw = r.get(key("api", "a1"))
    try:
        doc = json.loads(raw or "")
    except ValueError:
        doc = raw
    assert isinstance(doc, dict) and doc.get("address") == API["a1"] and doc.get(
        "healthy") is False, (
        f"after heartbeat(healthy=False) {key('api', 'a1')} holds {raw!r}: expected the JSON "
        f'{{"address": "{API["a1"]}", "healthy": false}} (a JSON boolean) - other services, '
        "in other languages, read and write these records; a private encoding of the "
        "health is misread by them")
    # Another client (a Go service, say) registers its instances in the same format.
    r.set(key("api", "go1"), json.dumps({"address": "127.0.0.1:7101", "healthy": True}),
          px=30_000)
    r.set(key("api", "go2"), json.dumps({"address": "127.0.0.1:7102", "healthy": False}),
          px=30_000)
    got = lookup(reg, "api")
    sick = sorted(set(got) & {API["a1"], "127.0.0.1:7102"})
    assert not sick, (
        f"lookup('api') listed {sick}, whose records say \"healthy\": false (a1 after "
        f"heartbeat(healthy=False); go2 written by another client): got {got}. Leave out "
        "every instance whose record is not healthy")
    assert got == ["127.0.0.1:7101"], (
        f"lookup('api') gave {got}, without go1 (127.0.0.1:7101), a healthy instance another "
        "client wrote to Redis as services:api:go1 in the README's format: lookup must find "
        "what is in Redis under services:api:* (SCAN), not what this Registry object (or an "
        "index only it maintains) remembers")


def test_lookup_scans_the_whole_keyspace_without_blocking_it(world: Any, redis_db: Any
                                                             ) -> None:
    reg, r = world
    with r.pipeline(transaction=False) as pipe:
        for n in range(3000):
            pipe.set(f"cache:item:{n}", "x", ex=120)
        pipe.execute()
    want = sorted(f"127.0.0.1:{9000 + n}" for n in range(40))
    for n in range(40):
        reg.register("api", f"i{n}", f"127.0.0.1:{9000 + n}", 30)
    with redis_commands(redis_db) as seen:
        got = lookup(reg, "api")
    names = sorted({c[0] for c in seen})
    assert "KEYS" not in names, (
        f"lookup() ran KEYS ({[c for c in seen if c[0] == 'KEYS'][0]}): KEYS walks the whole "
        "keyspace in one command and blocks Redis for every other client meanwhile (3040 "
        "keys here, millions in production). Iterate with SCAN MATCH "
        "services:<service>:* (scan_iter)")
    assert got == want, (
        f"with 3000 other keys in the database, lookup('api') found {len(got)} of the 40 "
        f"registered instances (commands: {names}): "
        + ("SCAN returns one page per call - call it again with the cursor it returns until "
           "the cursor is 0 (scan_iter does)" if "SCAN" in names else
           "every registered instance must be listed"))


def test_a_registration_is_one_atomic_write(world: Any, redis_db: Any) -> None:
    reg, _ = world
    with redis_commands(redis_db) as seen:
        reg.register("api", "a1", API["a1"], 30)
        reg.heartbeat("api", "a1", 30)
    in_multi = False
    for command in seen:
        if command[0] == "MULTI":
            in_multi = True
        elif command[0] in ("EXEC", "DISCARD"):
            in_multi = False
        elif (command[0] == "SET" and command[1:2] == [key("api", "a1")] and not in_multi
              and not {"EX", "PX", "EXAT", "PXAT", "KEEPTTL"} & {a.upper() for a in command}):
            pytest.fail(
                f"register/heartbeat wrote {key('api', 'a1')} with {command[:2]} and no TTL in "
                f"the same command (then: {[c[0] for c in seen]}): a process killed between "
                "the SET and the EXPIRE leaves an instance that never expires. Give the TTL "
                "with the write: SET key value PX ms (or both in one MULTI)")


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
    reg.register("api", "a10", "127.0.0.1:7010", 30)
    reg.deregister("api", "a1")
    got = lookup(reg, "api")
    assert API["a2"] in got, (
        f"deregister('api', 'a1') removed other instances of the service too (lookup now "
        f"gives {got}, without a2): it must delete only services:api:a1")
    assert "127.0.0.1:7010" in got, (
        f"deregister('api', 'a1') also removed api/a10 (lookup now gives {got}): it deleted "
        "by a pattern (services:api:a1*), which matches every id starting with a1. Delete "
        "exactly the key services:api:a1")
    got = sorted(set(got) - {"127.0.0.1:7010"})
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
    crashed = start(learner, redis_db, "p2", "1.5")
    try:
        def up() -> bool:
            if crashed.poll() is not None:
                err = crashed.stderr.read().decode()[-600:] if crashed.stderr else ""
                last = err.strip().splitlines()[-1:] or [""]
                pytest.fail(f"registry.py --ttl 1.5 exited with {crashed.returncode} before "
                            f"registering ({last[0]}): the TTL is a number of seconds that "
                            f"may have a fraction (type=float)\n{err}")
            return bool(r.exists(key("pay", "p2")))

        wait_until(up, "registry.py to register pay/p2")
        crashed.kill()
        crashed.wait()
        wait_until(lambda: not r.exists(key("pay", "p2")),
                   "pay/p2, SIGKILLed (no chance to deregister), to expire with its 1 s TTL")
    finally:
        if crashed.poll() is None:
            crashed.kill()
            crashed.wait()
        r.close()
