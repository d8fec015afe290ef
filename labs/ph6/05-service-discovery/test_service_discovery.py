"""ph6.5 - a service registry on real Redis: TTL heartbeats, health, deregistration.

The learner's Registry runs against the test's own Redis database; the test reads the instance
keys itself (GET, PTTL) to see what the registry really stored. "Time passing" for a key is
simulated with PEXPIRE (as if most of its TTL had run out), and the one real expiry waits for
Redis itself. The instance process is the learner's registry.py, started, SIGTERMed and
SIGKILLed by the test; its heartbeats are timed by Redis' own clock (MONITOR), so a gap
longer than the TTL is seen as the expiry it is, however late the test looks. A relay between
the process and Redis holds one heartbeat on its way while SIGTERM arrives: the DEL must not
come before that write has landed. Started with --interval 60, SIGTERM between two
heartbeats must deregister at once (within 10 s), not when a sleep till the next one ends.
Relays also delete a key between the lookup's SCAN and its read of that record (the lookup
must skip it), and answer two heartbeats with Redis' READONLY error, as during a failover
(the process must heartbeat on)."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from labrunner.testing import (
    came_true,
    cpu_burnt_while_idle,
    process_activity,
    program_reading,
    redis_commands,
    redis_gate,
    timed_redis_commands,
    wait_until,
)

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


# How a command gives the key it writes a TTL: SET's and GETEX's options (looked for from the
# argument after the value), and the commands whose third argument is the TTL; each with its
# milliseconds per unit and whether it is a point in time (PXAT, EXPIREAT) or a duration.
TTL_OPTIONS = {"PX": (1, False), "EX": (1000, False), "PXAT": (1, True), "EXAT": (1000, True)}
OPTIONS_FROM = {"SET": 3, "GETEX": 2}
TTL_ARGUMENT = {"PSETEX": (1, False), "SETEX": (1000, False), "PEXPIRE": (1, False),
                "EXPIRE": (1000, False), "PEXPIREAT": (1, True), "EXPIREAT": (1000, True)}


def ttl_of(command: list[str], at: float | None = None) -> int | None:
    """The TTL in ms `command` (run at `at`, Unix seconds) gives the key it writes, None if
    it gives none (or a point in time, when `at` is not known)."""
    up = [a.upper() for a in command]
    found = [(i + 1, *TTL_OPTIONS[a]) for i, a in enumerate(up)
             if i >= OPTIONS_FROM.get(up[0], len(up)) and a in TTL_OPTIONS]
    if up[0] in TTL_ARGUMENT:
        found.append((2, *TTL_ARGUMENT[up[0]]))
    for where, scale, absolute in found:
        if where >= len(command):
            continue
        if not absolute:
            return int(float(command[where]) * scale)
        if at is not None:
            return int(float(command[where]) * scale - at * 1000)
    return None


def ttl_written(commands: list[list[str]], name: str) -> int | None:
    """The TTL in ms the last command writing key `name` gave it (None: none given)."""
    given = None
    for c in commands:
        if c[1:2] == [name] and (c[0] == "SET" or ttl_of(c) is not None):
            given = ttl_of(c)
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


def test_two_services_may_have_an_instance_of_the_same_id(world: Any) -> None:
    """An instance id is unique within its service only (the key holds both): api's i1 and
    web's i1 are two instances, and a heartbeat of one writes its own record."""
    reg, r = world
    reg.register("api", "i1", "127.0.0.1:7401", 30)
    reg.register("web", "i1", "127.0.0.1:7402", 30)
    reg.heartbeat("api", "i1", 30)
    reg.heartbeat("web", "i1", 30)
    got = {service: lookup(reg, service) for service in ("api", "web")}
    want = {"api": ["127.0.0.1:7401"], "web": ["127.0.0.1:7402"]}
    assert got == want, (
        f"register('api', 'i1', '127.0.0.1:7401'), register('web', 'i1', '127.0.0.1:7402'), "
        f"then a heartbeat of each: lookups give {got} ({key('api', 'i1')} holds "
        f"{r.get(key('api', 'i1'))!r}), expected {want}. An instance id is unique within "
        "its service only, as the key services:<service>:<id> says: whatever the Registry "
        "remembers of an instance (its address for the heartbeats) is keyed by (service, "
        "id) too - by the id alone, or as one attribute, the second registration overwrites "
        "the first and a heartbeat writes another instance's address into its record")


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



# SCAN guarantees every key present throughout the iteration is returned, not that it is
# returned once: "a given element may be returned multiple times. It is up to the
# application to handle the case of duplicated elements" (Redis' SCAN docs; it happens when
# the table is resized between two calls). A relay answers each SCAN with its real page
# and, once more, the first instance key on it.
SCAN_TWICE = (b"local page = redis.call('SCAN', unpack(ARGV)) "
              b"for _, k in ipairs(page[2]) do "
              b"if string.sub(k, 1, 9) == 'services:' then table.insert(page[2], k) break end "
              b"end return page")


def test_lookup_lists_an_instance_once_when_scan_repeats_its_key(learner: Any, redis_db: Any
                                                                 ) -> None:
    def scan_twice(command: list[bytes]) -> list[bytes] | None:
        if command[0].upper() != b"SCAN":
            return None
        return [b"EVAL", SCAN_TWICE, b"0", *command[1:]]

    with redis_gate(redis_db.url, scan_twice) as url:
        reg = learner.load("registry").Registry(url)
        try:
            for iid, addr in API.items():
                reg.register("api", iid, addr, 30)
            got = lookup(reg, "api")
        finally:
            reg.close()
    twice = sorted({a for a in got if got.count(a) > 1})
    assert got == sorted(API.values()), (
        f"lookup('api') gave {got}" + (f", listing {twice} more than once" if twice else "")
        + f"; expected each live instance once, {sorted(API.values())}. SCAN answered with "
        "one instance key twice, as Redis may: 'a given element may be returned multiple "
        "times' (its SCAN docs - when the keyspace is resized during the iteration); a "
        "client that balances over the list then sends that instance twice its share. "
        "Collect the keys SCAN lists in a set before reading them")


# Service names holding Redis' glob characters (*, ?, [...]), each beside names they match
# as a pattern: a lookup must take its name literally.
# A backslash is one too: unescaped, services:w\eb:* reads as "w, then a literal e, b" and
# matches web's keys (glob.escape, which brackets *, ? and [, leaves it as it is).
GLOB_NAMED = {"web": "127.0.0.1:7201", "web-v2": "127.0.0.1:7202", "web*": "127.0.0.1:7203",
              "we?": "127.0.0.1:7204", "w[ae]b": "127.0.0.1:7205", "wab": "127.0.0.1:7206",
              "w\\eb": "127.0.0.1:7207"}


def lookups_mixed_up(world: Any, named: dict[str, tuple[str, str]]) -> list[str]:
    """Register one instance per service, {service: (instance id, address)}, in the README's
    format as another client would; then look each service up: what each lookup that did not
    give its own instance alone gave, and whose instances those were."""
    reg, r = world
    for service, (instance, address) in named.items():
        r.set(key(service, instance), json.dumps({"address": address, "healthy": True}),
              px=30_000)
    owner = {address: service for service, (_, address) in named.items()}
    wrong = []
    for service, (_, address) in named.items():
        got = lookup(reg, service)
        if got != [address]:
            others = sorted(owner.get(a, a) for a in got if a != address)
            wrong.append(f"lookup({service!r}) gave {got}"
                         + (f" (instances of {others})" if others else "")
                         + ("" if address in got else f", without its own {address}"))
    return wrong


def test_lookup_takes_the_service_name_literally(world: Any) -> None:
    """Instances of web, web-v2, web*, we?, w[ae]b, wab and w\\eb (written in the README's
    format by another client): a lookup of each lists that service's instance only - *, ?,
    [ and \\ in a name are characters of the name, not glob syntax of the SCAN MATCH
    pattern."""
    wrong = lookups_mixed_up(world, {service: (f"i{n}", address) for n, (service, address)
                                     in enumerate(GLOB_NAMED.items())})
    assert not wrong, (
        f"a service name's glob characters were taken for wildcards: {'; '.join(wrong)} - "
        "expected each service's own instance only: the name went into the SCAN MATCH "
        "pattern as it is, and *, ? and [...] are glob characters there (services:web*:* "
        "matches web's and web-v2's keys, services:w[ae]b:* matches wab's and web's but not "
        "w[ae]b's own; the backslash escapes the next character, so services:w\\eb:* "
        "matches web's keys). Escape each of *, ?, [, ] and \\ with a backslash before "
        "building the pattern (Redis' KEYS/SCAN docs: use \\ to match them verbatim; "
        "Python's glob.escape leaves the backslash as it is)")


# A service name may hold a colon (a version, a namespace); an instance id holds none (the
# README), so the last colon of a key ends the service's name.
COLON_NAMED = {"api": ("i1", "127.0.0.1:7301"), "api:v2": ("i2", "127.0.0.1:7302"),
               "api:v2:canary": ("i3", "127.0.0.1:7303")}


def test_a_service_name_may_hold_a_colon(world: Any) -> None:
    """Instances of api, api:v2 and api:v2:canary (the README's format): services:api:*
    also matches services:api:v2:i2, whose service is api:v2 - its instance id holds no
    colon. A lookup lists its own service's instances only."""
    wrong = lookups_mixed_up(world, COLON_NAMED)
    assert not wrong, (
        f"service names holding a colon were mixed up: {'; '.join(wrong)} - expected each "
        "service's own instance only. services:api:* matches services:api:v2:i2 too, and "
        "that key is service api:v2's instance i2 (an instance id holds no colon, a service "
        "name may): keep the keys whose part after 'services:<service>:' holds no colon, "
        "and do not split a key at its first colons to find its service")


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


# Commands that list or test an instance's key without reading its record.
NOT_READING = {b"SCAN", b"EXISTS", b"TYPE", b"PTTL", b"TTL"}


def test_lookup_skips_a_key_gone_between_listing_and_reading(learner: Any, redis_db: Any
                                                            ) -> None:
    """a2's key expires (deleted here, at that exact step) after SCAN listed it and just
    before the lookup reads its record: the lookup must skip it, not crash."""
    r = redis_db.client(decode_responses=True)
    gone = key("api", "a2")
    armed, deleted = threading.Event(), threading.Event()

    def expire_a2_before_its_read(command: list[bytes]) -> None:
        if (armed.is_set() and not deleted.is_set() and gone.encode() in command[1:]
                and command[0].upper() not in NOT_READING):
            r.delete(gone)
            deleted.set()

    addresses = {**API, "a3": "127.0.0.1:7003"}
    with redis_gate(redis_db.url, expire_a2_before_its_read) as url:
        reg = learner.load("registry").Registry(url)
        try:
            for iid, addr in addresses.items():
                reg.register("api", iid, addr, 30)
            armed.set()
            try:
                got: list[str] | str = lookup(reg, "api")
            except Exception as exc:  # noqa: BLE001 - the learner's error, named below
                got = f"raised {type(exc).__name__}: {exc}"
        finally:
            reg.close()
            r.close()
    # A lookup that never reads a2's record by its key (a script that scans) meets no gap.
    want = sorted(addresses.values()) if not deleted.is_set() else [API["a1"], "127.0.0.1:7003"]
    assert got == want, (
        f"lookup('api') {got if isinstance(got, str) else f'gave {got}'}; expected {want}: "
        "a2's key expired after SCAN listed it and before the lookup read it - MGET (or "
        "GET) gives None for a key gone in between. A key SCAN lists can expire before you "
        "read it (instances die all the time): skip a None record instead of parsing it "
        "(an EXISTS before the GET does not help: the key can go between the two), and "
        "never return an instance whose record you did not read")


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


def registration_of(r: Any, name: str) -> str:
    """What the key holds now, and its TTL, for a message."""
    raw, pttl = r.get(name), r.pttl(name)
    return "nothing (the key is gone)" if raw is None else f"{raw!r} with a PTTL of {pttl} ms"


def test_a_heartbeat_after_the_key_expired_registers_again(world: Any) -> None:
    """A live instance that missed its TTL (a GC pause, a network blip, a Redis failover)
    must come back with its next heartbeat, not stay gone for the rest of its life."""
    reg, r = world
    name = key("api", "a1")
    reg.register("api", "a1", API["a1"], 0.3)
    wait_until(lambda: not r.exists(name),
               f"{name}, registered with ttl=0.3 s and no heartbeat, to expire in Redis")
    try:
        reg.heartbeat("api", "a1", 30)
        outcome = ""
    except Exception as exc:  # noqa: BLE001 - what the heartbeat did is the message
        outcome = f" (it raised {type(exc).__name__}: {exc})"
    pttl = r.pttl(name)
    assert pttl > 20_000 and lookup(reg, "api") == [API["a1"]], (
        f"{name} expired while its instance lived (a pause longer than the TTL); the "
        f"instance's next heartbeat(ttl=30){outcome} left {registration_of(r, name)} and "
        f"lookup('api') gives {lookup(reg, 'api')}: expected the registration written again "
        "with a fresh 30 s TTL and a1 found - a heartbeat is the live instance asserting "
        "itself, so it writes the whole record (SET ... PX, no XX); renewing only a key that "
        "still exists (SET XX, PEXPIRE alone) leaves the instance gone for good")


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


def start(learner: Any, url: str, iid: str, ttl: str,
          interval: float | None = None) -> subprocess.Popen[bytes]:
    return cast(subprocess.Popen[bytes],
                learner.python("registry", "--redis", url, "--service", "pay", "--id", iid,
                               "--address", f"127.0.0.1:80{iid[-1]}", "--ttl", ttl,
                               "--interval", str(interval or INTERVAL),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))


INTERVAL = 0.2   # the --interval every process is started with
# Deadlines for a registry.py to get going (an interpreter, redis-py, its first write) and
# to end after SIGTERM. Waits end as soon as the process is there (or has exited, which
# fails at once, saying how), so a right one costs nothing more; on a loaded machine (CI,
# load 48) a start has taken longer than 15 s, and a deadline is not the evidence here.
START = 60.0
EXIT = 30.0


def stopped(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def exited_early(proc: subprocess.Popen[bytes], ttl: str, when: str) -> bool:
    """Fail the test if registry.py has exited, saying how (its last line of stderr); False
    while it runs (a wait condition's first part)."""
    if proc.poll() is None:
        return False
    err = proc.stderr.read().decode()[-800:] if proc.stderr else ""
    last = (err.strip().splitlines() or [""])[-1]
    hint = (": the TTL is a number of seconds that may have a fraction (type=float)"
            if "." in ttl and "--ttl" in last else "")
    pytest.fail(f"registry.py --ttl {ttl} exited with {proc.returncode} {when} ({last}){hint}"
                f"\n{err}")


def wait_registered(proc: subprocess.Popen[bytes], r: Any, iid: str, ttl: str) -> None:
    wait_until(lambda: exited_early(proc, ttl, "before registering") or bool(
        r.exists(key("pay", iid))), f"registry.py to register pay/{iid}", timeout=START)


def renewals(seen: list[tuple[float, list[str]]], name: str) -> list[tuple[float, int]]:
    """(server time, TTL in ms) of each write that gave key `name` a TTL, in order."""
    return [(at, ttl) for at, c in list(seen)
            if c[1:2] == [name] and (ttl := ttl_of(c, at)) is not None]


def lapse(writes: list[tuple[float, int]], until: float | None = None) -> int | None:
    """The first write whose TTL ran out before the next write came (or, for the last one,
    before `until`), if any."""
    ends = [then for then, _ in writes[1:]] + ([until] if until is not None else [])
    return next((i for i, ((at, ttl), end) in enumerate(zip(writes, ends, strict=False))
                 if (end - at) * 1000 >= ttl), None)


def watch_renewals(proc: subprocess.Popen[bytes], r: Any, name: str, ttl: str,
                   seen: list[tuple[float, list[str]]], wanted: int = 2) -> None:
    """Return once `name` has been renewed `wanted` times, or has lapsed: a write came after
    the previous one's TTL ran out, or the key is gone (then wait up to two TTLs more for
    the write that brings it back, to say how far apart they were)."""
    deadline = time.monotonic() + 3 * float(ttl) + 1
    gone_since = None
    while time.monotonic() < deadline:
        exited_early(proc, ttl, "while its registration was watched")
        writes = renewals(seen, name)
        if len(writes) > wanted or lapse(writes) is not None:
            return
        if gone_since is None and not r.exists(name):
            gone_since = time.monotonic()
        if gone_since is not None and time.monotonic() - gone_since > 2 * float(ttl):
            return
        time.sleep(0.01)


def lapse_message(writes: list[tuple[float, int]], until: float, name: str, ttl: str
                  ) -> str | None:
    """What the writes of `name` say about a registration that expired while its process was
    alive, watched until `until` (None: it never did)."""
    want = int(float(ttl) * 1000)
    i = lapse(writes, until)
    if i is None:
        return None
    at, given = writes[i]
    expired = (at - writes[0][0]) * 1000 + given
    gap = (writes[i + 1][0] - at) * 1000 if i + 1 < len(writes) else None
    when = (f"between two writes of the key {gap:.0f} ms apart, the first giving it a TTL of "
            f"{given} ms" if gap is not None else
            f"{given} ms after its last write, and no renewal came in "
            f"{(until - at) * 1000 - given:.0f} ms more")
    why = (f"the heartbeat renews it with a TTL of {given} ms, not --ttl's {want} ms (was "
           "--interval passed as the TTL?): renew with the instance's TTL, every --interval "
           "seconds" if given < want * 0.9 else
           f"the process sent no heartbeat at all in {(until - at):.1f} s: renew every "
           "--interval seconds (in seconds, like --ttl)" if len(writes) == 1 else
           f"renew well within the TTL - every --interval ({INTERVAL * 1000:.0f} ms here; "
           "a third of the TTL or less in general), not every TTL: a heartbeat a little late "
           "and clients lose a live instance")
    return (f"{name} (registry.py --ttl {ttl} --interval {INTERVAL}) expired while its "
            f"process was alive, {expired:.0f} ms after registering, {when}: {why}")


def test_the_instance_process_renews_well_within_its_ttl(learner: Any, redis_db: Any
                                                          ) -> None:
    """Every write of the key, with its time by Redis' own clock (MONITOR), so the gaps are
    measured where the TTL runs out; then a SIGKILLed process's registration expires."""
    r = redis_db.client(decode_responses=True)
    name, ttl = key("pay", "p2"), "1.5"
    with timed_redis_commands(redis_db) as seen:
        crashed = start(learner, redis_db.url, "p2", ttl)
        try:
            wait_registered(crashed, r, "p2", ttl)
            watch_renewals(crashed, r, name, ttl, seen)
            seconds, micros = r.time()   # Redis' clock, as the writes' times: still alive
            until = seconds + micros / 1e6
        finally:
            stopped(crashed)
    writes = renewals(seen, name)
    message = lapse_message(writes, until, name, ttl)
    assert message is None, f"{message} (writes at ms after registering, TTL: " + ", ".join(
        f"{(at - writes[0][0]) * 1000:.0f}: {given}" for at, given in writes[:6]) + ")"
    wait_until(lambda: not r.exists(name),
               "pay/p2, SIGKILLed (no chance to deregister), to expire with its 1.5 s TTL")
    r.close()


def test_the_instance_process_heartbeats_and_deregisters_on_sigterm(
        learner: Any, redis_db: Any) -> None:
    r = redis_db.client(decode_responses=True)
    proc = start(learner, redis_db.url, "p1", "30")
    try:
        wait_registered(proc, r, "p1", "30")
        r.pexpire(key("pay", "p1"), 3000)
        wait_until(lambda: r.pttl(key("pay", "p1")) > 20_000,
                   "registry.py's heartbeats (--interval 0.2) to renew the TTL of pay/p1")
        r.delete(key("pay", "p1"))             # as if it had expired during a long pause
        back = came_true(lambda: bool(r.exists(key("pay", "p1"))), 15)
        exited_early(proc, "30", "after its registration disappeared")
        assert back, (
            f"pay/p1's key disappeared while registry.py lived (as when a pause outlasts the "
            f"TTL) and 15 s of heartbeats every {INTERVAL} s later it is still "
            f"{registration_of(r, key('pay', 'p1'))}: expected the next heartbeat to write "
            "the registration again - a live instance must not stay out of the registry "
            "for the rest of its life")
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(EXIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"registry.py did not exit within {EXIT:.0f} s of SIGTERM")
        assert code == 0 and not r.exists(key("pay", "p1")), (
            f"after SIGTERM registry.py exited with {code} and pay/p1 is "
            f"{'still registered' if r.exists(key('pay', 'p1')) else 'gone'}: expected exit 0 "
            "and the instance deregistered before exiting - Kubernetes and systemd stop a "
            "process with SIGTERM; without a handler clients keep being sent to it until "
            "the TTL runs out")
    finally:
        stopped(proc)
        r.close()


LONG_INTERVAL = 60.0  # between heartbeats, as a real instance might wait
PROMPT = 10.0         # how long after SIGTERM the DEL may take (it comes in milliseconds)


def wait_asleep(learner: Any, proc: subprocess.Popen[bytes], within: float = 10.0) -> None:
    """Return once registry.py is seen waiting between heartbeats: every thread asleep and
    its CPU time unmoved across two readings. A signal sent as soon as the key appears can
    land before the process has reached that wait (a heartbeat thread not yet started sees
    the stop flag at once), and would let a wait that ignores it pass. After ``within`` s
    unsettled (a loaded machine) the caller goes on: a right process is never failed.
    (No CPU limit: only the wait for a reading asleep throughout is wanted here.)"""
    cpu_burnt_while_idle(lambda: program_reading(learner, proc, process_activity),
                         math.inf, within)


def test_sigterm_between_heartbeats_deregisters_at_once(learner: Any, redis_db: Any) -> None:
    """registry.py --interval 60 gets SIGTERM between two heartbeats: the DEL must come at
    once, not when the wait for the next heartbeat ends."""
    r = redis_db.client(decode_responses=True)
    proc = start(learner, redis_db.url, "p3", "120", interval=LONG_INTERVAL)
    try:
        wait_registered(proc, r, "p3", "120")
        wait_asleep(learner, proc)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        gone = came_true(lambda: not r.exists(key("pay", "p3")), PROMPT)
        assert gone, (
            f"registry.py --interval {LONG_INTERVAL:g} got SIGTERM between two heartbeats and "
            f"{time.monotonic() - sent:.0f} s later pay/p3 is still registered; expected the "
            f"DEL at once: a clean shutdown deregisters immediately. The wait between "
            f"heartbeats must end on the stop signal (stop.wait(interval), not "
            f"time.sleep(interval), which goes on sleeping after the handler ran, and not a "
            f"join of a thread that does) - until then lookups hand out a stopping instance, "
            f"and a grace period shorter than the interval SIGKILLs it before the DEL, leaving "
            f"it listed for its whole TTL")
        try:
            code = proc.wait(EXIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"registry.py deregistered but did not exit within {EXIT:.0f} s of "
                        "SIGTERM",
                        pytrace=False)
        assert code == 0, f"after SIGTERM and its DEL registry.py exited with {code}; expected 0"
    finally:
        stopped(proc)
        r.close()


# Commands naming an instance's key that do not write it: everything else that names it
# (SET, PSETEX, PEXPIRE, a script, ...) is a registration or a heartbeat.
READS = {b"GET", b"MGET", b"EXISTS", b"PTTL", b"TTL", b"TYPE", b"SCAN"}
DELETES = {b"DEL", b"UNLINK"}


class HeartbeatGate:
    """``before`` of a :func:`redis_gate` between registry.py and Redis: lets the
    registration through, then holds the first heartbeat (the key's second write) on its
    way to Redis until :attr:`let_go` is set, and notes a deletion of the key that passes
    meanwhile, on another connection."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.writes = 0
        self.last_command = 0.0                   # when any command last came (monotonic)
        self.lock = threading.Lock()
        self.holding = threading.Event()          # a heartbeat is in flight, held here
        self.let_go = threading.Event()
        self.deleted_while_held = threading.Event()

    def __call__(self, command: list[bytes]) -> None:
        self.last_command = time.monotonic()
        if self.name not in command[1:]:
            return
        verb = command[0].upper()
        if verb in DELETES:
            if self.holding.is_set() and not self.let_go.is_set():
                self.deleted_while_held.set()
            return
        if verb in READS:
            return
        with self.lock:
            self.writes += 1
            heartbeat = self.writes == 2
        if heartbeat:
            self.holding.set()
            self.let_go.wait(30)


# SIGTERM sent while a heartbeat is held, the test lets the heartbeat go once a DEL has come
# past it, or once the process has done all it does without that heartbeat's reply: all its
# threads asleep, its CPU time unmoved and no command of its at the relay for QUIET seconds.
# A right process sleeps from the moment its signal handler has run; one on its way to a DEL
# is busy, or waits for the relay (a new connection's handshake), which the commands show.
QUIET = 2.0


def wait_for_del_or_quiet(learner: Any, proc: subprocess.Popen[bytes],
                          gate: HeartbeatGate) -> None:
    """Return once a DEL of the key passed the gate, the process ended, it stayed quiet
    QUIET seconds, or 20 s went by."""
    deadline, quiet_since, last_cpu = time.monotonic() + 20, None, None
    while not gate.deleted_while_held.is_set() and proc.poll() is None \
            and time.monotonic() < deadline:
        awake, cpu, _ = program_reading(learner, proc, process_activity)
        if awake == 0 and cpu == last_cpu:
            quiet_since = max(quiet_since or time.monotonic(), gate.last_command)
            if time.monotonic() - quiet_since >= QUIET:
                return
        else:
            quiet_since = None
        last_cpu = cpu
        gate.deleted_while_held.wait(0.05)


def test_sigterm_during_a_heartbeat_deregisters_for_good(learner: Any, redis_db: Any) -> None:
    """SIGTERM arrives while a heartbeat's write is on its way to Redis (held at a relay):
    the process may delete its key only once no write of it can follow - or the heartbeat
    lands after the DEL and registers the stopped instance again, with a full TTL."""
    r = redis_db.client(decode_responses=True)
    name, gate = key("pay", "p3"), HeartbeatGate(key("pay", "p3"))
    with redis_gate(redis_db.url, gate) as url, timed_redis_commands(redis_db) as seen:
        proc = start(learner, url, "p3", "30")
        try:
            wait_until(lambda: exited_early(proc, "30", "before its first heartbeat")
                       or gate.holding.is_set(),
                       "registry.py's first heartbeat after registering pay/p3",
                       timeout=START)
            proc.send_signal(signal.SIGTERM)
            wait_for_del_or_quiet(learner, proc, gate)
            gate.let_go.set()
            try:
                code = proc.wait(EXIT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"registry.py did not exit within {EXIT:.0f} s of SIGTERM (sent "
                            "while a heartbeat was on its way to Redis)", pytrace=False)
            # The held heartbeat reaches Redis whatever became of its process.
            wait_until(lambda: sum(1 for _, c in list(seen) if c[1:2] == [name]
                                   and c[0].encode() not in READS | DELETES) >= 2,
                       "the heartbeat held at the relay to reach Redis")
        finally:
            gate.let_go.set()
            stopped(proc)
    order = ", ".join([c[0] for _, c in seen if c[1:2] == [name]
                       and c[0].encode() not in READS][1:])
    left = r.pttl(name)
    r.close()
    when = "meanwhile" if gate.deleted_while_held.is_set() else "before that write came back"
    assert left < 0, (
        f"after SIGTERM registry.py exited {code}, yet {name} is registered again, with "
        f"{left} ms to live: the signal came while a heartbeat was on its way to Redis (held "
        f"at a relay), the process deleted its key {when} and the heartbeat landed after "
        f"the DEL (after registering, Redis ran {order}). Clients are sent to the stopped "
        "instance until that TTL runs out. Stop the heartbeats before deregistering: the "
        "signal handler only sets the stop flag; once the heartbeat loop has ended (join "
        "its thread), DEL - nothing may write the key after it")


# Redis' answer to a write on a replica: what a registry's Redis says while it fails over
# (the old primary demoted, the new one not yet known to the client).
READONLY_REPLY = [b"EVAL", b"return redis.error_reply(\"READONLY You can't write against a "
                  b"read only replica.\")", b"0"]
FAILED_BEATS = 2   # heartbeats refused in a row
RECOVERY = 10.0    # seconds for the next heartbeat to come (50 intervals)


class FailoverGate:
    """``before`` of a :func:`redis_gate` between registry.py and Redis: lets the
    registration through, has Redis answer the next FAILED_BEATS writes of the key with its
    READONLY error instead of running them, then lets the writes through again, counting."""

    def __init__(self, name: str) -> None:
        self.name = name.encode()
        self.writes = 0
        self.lock = threading.Lock()

    def __call__(self, command: list[bytes]) -> list[bytes] | None:
        if self.name not in command[1:] or command[0].upper() in READS | DELETES:
            return None
        with self.lock:
            self.writes += 1
            refused = 2 <= self.writes <= 1 + FAILED_BEATS
        return READONLY_REPLY if refused else None


def test_a_failed_heartbeat_is_not_the_last(learner: Any, redis_db: Any) -> None:
    """Redis refuses two heartbeats (READONLY, as during a failover); the process must go on
    heartbeating, and the next heartbeat lands."""
    r = redis_db.client(decode_responses=True)
    name, gate = key("pay", "p4"), FailoverGate(key("pay", "p4"))
    with redis_gate(redis_db.url, gate) as url:
        proc = start(learner, url, "p4", "30")
        try:
            wait_registered(proc, r, "p4", "30")
            came_true(lambda: proc.poll() is not None or gate.writes > 1 + FAILED_BEATS,
                      RECOVERY)
            refused = min(gate.writes - 1, FAILED_BEATS)
            what = (f"{refused} heartbeat{'s' if refused > 1 else ''} of pay/p4 met Redis' "
                    "READONLY error (its Redis failing over to a replica)")
            if proc.poll() is not None:
                err = proc.stderr.read().decode()[-800:] if proc.stderr else ""
                last = (err.strip().splitlines() or [""])[-1]
                pytest.fail(
                    f"registry.py exited with {proc.returncode} after {what} ({last}): "
                    f"expected it to log the failure and send the next heartbeat "
                    f"{INTERVAL} s later - a failover, a network blip or a restart fails a "
                    "heartbeat or two, and an agent that dies on one leaves its live instance "
                    "to expire for good. Catch redis.RedisError (READONLY is a ResponseError, "
                    f"not a ConnectionError) around each heartbeat\n{err}", pytrace=False)
            assert gate.writes > 1 + FAILED_BEATS, (
                f"after {what}, registry.py still runs but sent no heartbeat in {RECOVERY:.0f} "
                f"s (--interval {INTERVAL}): the heartbeat loop died on the error (an "
                "exception ends a thread silently), so the live instance expires with its "
                "TTL and never comes back. Catch redis.RedisError around each heartbeat and "
                "go on with the next one")
            pttl = r.pttl(name)
            assert pttl > 20_000, (
                f"after {what}, the next heartbeat came but left {name} "
                f"{registration_of(r, name)}: expected it written again with --ttl 30")
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(EXIT)
            assert code == 0 and not r.exists(name), (
                f"after {what} and a heartbeat that landed, SIGTERM made registry.py exit "
                f"with {code} and left pay/p4 {registration_of(r, name)}: expected exit 0 "
                "and the instance deregistered")
        finally:
            stopped(proc)
            r.close()
