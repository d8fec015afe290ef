"""ph2.10 verification: Lua rate limiter, pub/sub fan-out, AOF persistence, on real Redis.

* Atomicity is checked two ways: 100 concurrent calls behind a barrier allow exactly the
  limit, and MONITOR (on a separate connection, only this test's database) shows that the
  learner's clients sent EVALSHA while INCR and EXPIRE ran inside the script. The second
  check is what makes a racy client-side GET/INCR fail every time, not just when the race
  happens to show.
* Pub/sub channels are server-wide (not per database): the test uses a channel name of
  its own.
* The AOF test restarts the shared Redis server. It takes a lock (a key in database 0) so
  that two runs of this lab never restart it at the same time, starts from AOF switched
  off, and puts the persistence settings back as they were when it is done. A slowed-down
  RDB snapshot it starts and that is still running when the test ends (enable_aof() did not
  wait for it) is ended by a restart then, not left for the next run to wait out.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from labrunner.testing import RelayLink, TcpRelay, came_true, redis_commands, redis_gate, wait_until


def limiter_class(learner: Any) -> type:
    cls = getattr(learner.load("advanced"), "RateLimiter", None)
    if not isinstance(cls, type):
        pytest.fail("advanced.py: define a class RateLimiter (see the README)", pytrace=False)
    return cls


def concurrent_calls(limiter: Any, key: str, calls: int) -> list[bool]:
    """`calls` threads call allow(key) at once (released together by a barrier)."""
    barrier = threading.Barrier(calls)
    results: list[Any] = [None] * calls

    def one(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = limiter.allow(key)
        except Exception as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    # Daemon threads with a bounded barrier: if the machine refuses a thread, the ones
    # already waiting give up instead of keeping the test process alive for ever.
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(calls)]
    try:
        for t in threads:
            t.start()
    except RuntimeError as exc:
        barrier.abort()
        raise RuntimeError(f"could not start {calls} threads to call allow() at once: {exc}"
                           " (the machine's thread or memory limit)") from exc
    for t in threads:
        t.join(30)
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        pytest.fail(f"allow() raised {type(errors[0]).__name__}: {errors[0]}", pytrace=False)
    return [bool(r) for r in results]


# --------------------------------------------------------------------------------------


def test_rate_limiter_allows_exactly_the_limit_atomically(learner: Any, redis_db: Any) -> None:
    limiter = limiter_class(learner)(redis_db.url, limit=10, window_seconds=60)
    with redis_commands(redis_db, with_source=True) as sent:
        allowed = concurrent_calls(limiter, "user-1", 100)
    if allowed.count(True) != 10:
        expiries = [cmd for source, cmd in sent if source == "lua"
                    and cmd[0] in ("EXPIRE", "PEXPIRE") and len(cmd) > 2]
        tiny = [c for c in expiries if c[0] == "PEXPIRE" and c[2].isdigit() and int(c[2]) < 1000]
        if tiny:
            pytest.fail(
                f"100 concurrent calls with limit 10 allowed {allowed.count(True)}: the "
                f"script ran {' '.join(tiny[0])} - a 60 s window set in milliseconds lasts "
                f"60 ms, so the counter expired and restarted during the calls (EXPIRE takes "
                f"seconds)", pytrace=False)
        created = sum(1 for source, cmd in sent if source == "lua" and cmd[0] == "EXPIRE")
        if created > 1 and allowed.count(True) > 10:
            pytest.fail(
                f"100 concurrent calls with limit 10 allowed {allowed.count(True)}: the "
                f"counter was given an expiry {created} times - it expired in the middle of "
                f"the calls; the window must last window_seconds", pytrace=False)
    assert allowed.count(True) == 10, (
        f"100 concurrent calls with limit 10 allowed {allowed.count(True)}: the count and the "
        "decision must be one atomic step on the server (INCR inside a Lua script)")

    from_clients = [cmd for source, cmd in sent if source != "lua"]
    in_script = [cmd[0] for source, cmd in sent if source == "lua"]
    outside = sorted({cmd[0] for cmd in from_clients
                      if cmd[0] in ("INCR", "INCRBY", "EXPIRE", "PEXPIRE", "GET", "SET")})
    assert not outside, (
        f"the limiter's clients sent {', '.join(outside)} themselves: between two commands "
        "another client can run, and a crash can leave a counter with no expiry. Do INCR and "
        "EXPIRE inside one Lua script")
    evalsha = sum(1 for cmd in from_clients if cmd[0] == "EVALSHA")
    evals = sum(1 for cmd in from_clients if cmd[0] == "EVAL")
    assert evalsha >= 100 and evals == 0, (
        f"100 calls sent {evalsha} EVALSHA and {evals} EVAL: load the script once (SCRIPT "
        "LOAD, or redis-py's register_script) and call it by its SHA1 with EVALSHA, instead "
        "of sending its source every time")
    assert "INCR" in in_script and ("EXPIRE" in in_script or "PEXPIRE" in in_script), (
        f"the script ran {sorted(set(in_script))}: expected INCR and EXPIRE inside it")
    # EVALSHA sha numkeys key... arg...: the counter's key must be declared as a KEY, or
    # Redis (a cluster, a proxy, ACLs) cannot know which key the script touches.
    undeclared = [cmd for cmd in from_clients if cmd[0] == "EVALSHA"
                  and (len(cmd) < 3 or not cmd[2].isdigit() or int(cmd[2]) < 1)]
    incr_keys = {cmd[1] for source, cmd in sent if source == "lua" and cmd[0] == "INCR"}
    declared = {cmd[3] for cmd in from_clients if cmd[0] == "EVALSHA" and len(cmd) > 3
                and cmd[2].isdigit() and int(cmd[2]) >= 1}
    assert not undeclared and incr_keys <= declared, (
        f"the script was called as {' '.join(undeclared[0][:5]) if undeclared else '...'} "
        f"and INCRed {sorted(incr_keys)}: pass the counter's key in KEYS (EVALSHA sha 1 "
        f"<key> <window>), not in ARGV or built inside the script - a script must declare "
        f"every key it touches")

    assert concurrent_calls(limiter, "user-2", 20).count(True) == 10, (
        "another key must have its own limit: user-2 was not allowed 10 calls")


def test_rate_limit_window_is_fixed_and_restarts(learner: Any, redis_db: Any) -> None:
    limiter = limiter_class(learner)(redis_db.url, limit=3, window_seconds=30)
    client = redis_db.client()
    try:
        assert limiter.allow("ip-9") is True, "the first call in a window must be allowed"
        keys = list(client.scan_iter(count=100))  # the test may scan its own database
        assert len(keys) == 1, f"expected one counter key after one call, found {keys}"
        key = keys[0]
        first = client.pttl(key)
        assert 0 < first <= 30_000, (
            f"the counter {key!r} has PTTL {first} ms, expected 1..30000: EXPIRE it with the "
            "window length when it is created")
        assert first > 15_000, (
            f"the counter {key!r} of a 30 s window has PTTL {first} ms right after it was "
            f"created: the window is far too short - EXPIRE takes seconds, PEXPIRE "
            f"milliseconds")
        time.sleep(0.2)  # let time pass, to see whether the expiry moves with it
        limiter.allow("ip-9")
        second = client.pttl(key)
        # a fixed window has 200 ms less left now; one pushed back by each call has ~all
        assert second <= first - 100, (
            f"a later call moved the expiry from {first} ms to {second} ms: set EXPIRE only "
            "when INCR returns 1, otherwise a steady stream of calls never ends the window")
        assert limiter.allow("ip-9") is True and limiter.allow("ip-9") is False, (
            "limit 3: calls 3 and 4 of the window must be allowed and refused")
        # The window ends (the counter expires; here at once, instead of in 30 s).
        client.pexpire(key, 1)
        while client.exists(key):
            time.sleep(0.005)
        assert limiter.allow("ip-9") is True, (
            "after the window's counter expired, the next call must be allowed again")
        assert 0 < client.pttl(key) <= 30_000, (
            "the new window's counter must get an expiry too")
    finally:
        client.close()


def test_no_counter_is_ever_without_its_expiry(learner: Any, redis_db: Any) -> None:
    """Before each command the limiter's clients send (a RedisGate holds it there), every
    key in the test's database must already have its expiry: a client that dies at that
    point (a crash, a lost connection, a killed pod) leaves what the server holds then, and
    a counter without an expiry refuses its key for good once it reaches the limit. New
    counters are made twice: a key's first call, and its first call after the window."""
    checker = redis_db.client()
    naked: list[str] = []

    def before(command: list[bytes]) -> None:
        for key in checker.scan_iter(count=100):
            if checker.ttl(key) == -1 and not naked:
                sent = " ".join(part.decode(errors="replace") for part in command[:4])
                naked.append(f"the counter {key.decode(errors='replace')!r} had no expiry "
                             f"(TTL -1) just before your client sent {sent}")

    try:
        with redis_gate(redis_db.url, before) as url:
            limiter = limiter_class(learner)(url, limit=2, window_seconds=60)
            for window in (1, 2):
                for n in range(1, 4):
                    got = limiter.allow("crash-1")
                    assert not naked, (
                        f"allow() call {n} of window {window}: {naked[0]} - had the client "
                        "died there, the counter would never expire and the key would be "
                        "refused for good once it reached the limit: INCR and EXPIRE must "
                        "be one step on the server (one script), not two commands or two "
                        "scripts the client sends one after the other")
                    assert got is (n <= 2), (
                        f"limit 2: call {n} of window {window} returned {got!r}")
                for key in checker.scan_iter(count=100):  # the window ends at once
                    checker.pexpire(key, 1)
                # KEYS leaves out the keys whose time is up
                wait_until(lambda: not checker.keys(), "the counter to expire")
    finally:
        checker.close()


def test_each_limiter_talks_to_its_own_server(learner: Any, redis_db: Any) -> None:
    """Two RateLimiters in one process, each with its own URL: the first reaches Redis
    through a relay that the test then takes away (its server gone), the second directly.
    The second must still answer from its own server: a client or script kept on the class
    or the module (registered once for every limiter) is the first limiter's, bound to its
    URL."""
    cls = limiter_class(learner)
    url = urlsplit(redis_db.url)
    relay = TcpRelay((url.hostname or "127.0.0.1", url.port or 6379))
    try:
        first = cls(relay.url_for(redis_db.url), limit=2, window_seconds=60)
        assert first.allow("first-1") is True, "the first call of a window must be allowed"
    finally:
        relay.close()   # the first limiter's server is gone: its connections and its port
    second = cls(redis_db.url, limit=2, window_seconds=60)
    try:
        got = second.allow("second-1")
    except Exception as exc:  # noqa: BLE001 - reported as the mistake
        pytest.fail(
            f"a second RateLimiter, made with its own URL after the first one's server went "
            f"away, raised {type(exc).__name__} on allow(): {exc} - it sent its command "
            "through the first limiter's connection. State kept on the class or the module "
            "(a client, or a script registered once for every limiter: redis-py's "
            "register_script() binds it to the client it was registered on) is shared by "
            "every instance; keep the client and the script per instance", pytrace=False)
    assert got is True, (
        f"a second RateLimiter's first call returned {got!r}: the first call of a window "
        "must be allowed")


# allow() calls on one key, limit 3: whether the test empties the server's script cache
# (SCRIPT FLUSH) just before the call, and the answer the call must give.
AFTER_FLUSH = [(False, True), (True, True), (True, True), (False, False)]


def test_limiter_survives_an_emptied_script_cache(learner: Any, redis_db: Any) -> None:
    """The server's script cache is not data: a restart, a failover to a replica or SCRIPT
    FLUSH empties it, and EVALSHA then answers NOSCRIPT. A limiter that loaded its script
    once must load it again (and still count the call): flushed twice, so a fallback that
    works only once shows too. The lab is exclusive: no other lab's scripts are flushed."""
    limiter = limiter_class(learner)(redis_db.url, limit=3, window_seconds=60)
    admin = redis_db.admin_client()
    try:
        for n, (flush, want) in enumerate(AFTER_FLUSH, start=1):
            if flush:
                admin.script_flush()
            when = "just after SCRIPT FLUSH" if flush else "with the script cache as it was"
            try:
                got = limiter.allow("flushed")
            except Exception as exc:  # noqa: BLE001 - reported as the mistake
                pytest.fail(
                    f"call {n} of allow() {when} raised {type(exc).__name__}: {exc} - "
                    "expected an answer: the server's script cache is not data (a restart, "
                    "a failover to a replica or SCRIPT FLUSH empties it), so EVALSHA can "
                    "answer NOSCRIPT at any time; load the script again and retry then "
                    "(redis-py's register_script() does it for you)", pytrace=False)
            assert got is want, (
                f"limit 3: call {n} of allow() {when} returned {got!r}, expected {want}: "
                "on NOSCRIPT load the script again and run it, so the call is still counted "
                "and decided by the script (answering without running it neither counts "
                "nor limits)")
    finally:
        admin.close()


def test_window_starts_at_the_first_call(learner: Any, redis_db: Any) -> None:
    """A fixed window starts at the key's first call: a clock boundary (time // window)
    passing inside it must not open a new one. The first call is made in the middle of a
    clock-aligned period and the second just after that period ends, both well inside the
    window (half a window on either side of the edges). A machine too slow to make the
    second call inside the window judges nothing, so the test tries again with a window
    twice as long (2, 4, then 8 s): a slow machine costs time, never the verdict."""
    for attempt, window in enumerate((2, 4, 8)):
        limiter = limiter_class(learner)(redis_db.url, limit=1, window_seconds=window)
        key = f"edge-{attempt}"

        def phase(window: int = window) -> float:
            return time.time() % window

        while not window / 2 - 0.1 <= phase() < window / 2 + 0.1:
            time.sleep(0.01)
        first_at = time.time()
        assert limiter.allow(key) is True, "the first call of a window must be allowed"
        period = int(first_at) // window
        while int(time.time()) // window == period:
            time.sleep(0.01)
        second_at = time.time()
        allowed = limiter.allow(key)
        if time.time() - first_at >= window - 0.3:
            continue  # the second call may have come after the real window: judge nothing
        assert allowed is False, (
            f"limit 1 per {window} s: a second call {second_at - first_at:.1f} s after the "
            f"first was allowed, just after the clock passed a multiple of {window} s: the "
            "window restarted at a clock boundary (a key or count per time // window) - "
            "the README's window starts at the key's first call: one counter key per key, "
            "whose EXPIRE, set when INCR returns 1, ends the window")
        return
    pytest.skip("the machine was too slow to make a second call inside an 8 s window")


# A receive(RECEIVE_WAITS_S) call is given PUBLISH_AFTER_S to be seen waiting (one that
# only looks at what has arrived returns None at once), then a message is published.
RECEIVE_WAITS_S, PUBLISH_AFTER_S = 10.0, 0.3


def test_pubsub_fans_out_to_every_subscriber(learner: Any, redis_db: Any) -> None:
    module = learner.load("advanced")
    publish = learner.function("advanced", "publish")
    cls = getattr(module, "Subscriber", None)
    if not isinstance(cls, type):
        pytest.fail("advanced.py: define a class Subscriber (see the README)", pytrace=False)
    channel = f"lab:{uuid.uuid4().hex}"  # channels are server-wide: a name of our own
    subscribers = [cls(redis_db.url, channel) for _ in range(5)]
    admin = redis_db.client()
    try:
        # Each constructor has returned: a SUBSCRIBE it sent is on the server within
        # milliseconds (even one it did not wait to see confirmed, which another test names).
        deadline = time.monotonic() + 2
        while (count := admin.pubsub_numsub(channel)[0][1]) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert count == 5, (
            f"the server counts {count} subscribers on the channel after 5 Subscriber() "
            "constructors returned: each Subscriber must SUBSCRIBE in its constructor, on a "
            "connection of its own - the server counts connections, so Subscribers sharing "
            "one count once, and a message one of them reads is gone for the others")
        messages = [f"price-change-{n}" for n in range(20)]
        receivers = [publish(redis_db.url, channel, m) for m in messages]
        assert receivers == [5] * 20, (
            f"publish() returned {receivers[:3]}...: PUBLISH returns how many subscribers "
            "received the message, 5 here")
        for n, sub in enumerate(subscribers):
            got = [sub.receive(2.0) for _ in messages]
            assert got == messages, (
                f"subscriber {n} received {got[:3]}... ({sum(g is not None for g in got)} "
                "items), expected the 20 published messages in order: in pub/sub every "
                "subscriber receives every message (a list popped by several consumers gives "
                "each to one of them), and only messages count - not the SUBSCRIBE reply")
            assert sub.receive(0.1) is None, f"subscriber {n} received more than was published"
        late = cls(redis_db.url, channel)
        subscribers.append(late)
        assert late.receive(0.2) is None, (
            "a subscriber that joined after the messages were published received one: "
            "pub/sub is fire-and-forget, nothing is stored for later (that is a stream)")
        # receive(timeout) waits: a message published while it waits is its answer.
        waiting: dict[str, Any] = {}
        done = threading.Event()

        def wait_for_one() -> None:
            started = time.monotonic()
            try:
                waiting["got"] = late.receive(RECEIVE_WAITS_S)
            except Exception as exc:  # noqa: BLE001 - reported below
                waiting["got"] = exc
            waiting["after"] = time.monotonic() - started
            done.set()

        threading.Thread(target=wait_for_one, daemon=True).start()
        if done.wait(PUBLISH_AFTER_S):
            pytest.fail(
                f"receive({RECEIVE_WAITS_S:g}) returned {waiting['got']!r} after "
                f"{waiting['after']:.2f} s, before anything was published: it must wait up to "
                f"its timeout for the next message (get_message(timeout=...)), not only look "
                f"at what has already arrived - a caller waiting for the next price change is "
                f"told there is none", pytrace=False)
        admin.publish(channel, "while-waiting")   # the test's own client: the call waits
        assert done.wait(RECEIVE_WAITS_S + 5) and waiting["got"] == "while-waiting", (
            f"receive({RECEIVE_WAITS_S:g}) was waiting when 'while-waiting' was published, and "
            f"returned {waiting.get('got', '(nothing yet)')!r}: the message published during "
            f"the wait is its answer")
    finally:
        for sub in subscribers:
            sub.close()
        admin.close()


class SubscribeHold(TcpRelay):
    """A TCP proxy in front of Redis that holds every client->server chunk carrying a
    SUBSCRIBE until release(): the subscription cannot be confirmed before the test says so.
    Everything else (the connection's HELLO/AUTH/SELECT) passes at once. With
    ``forever=True`` such a chunk is dropped instead (never confirmed, and the relay goes on
    reading the client, so it sees the client close its connection and passes that on).
    With ``refused=True`` the server gets, in its place, a SUBSCRIBE without a channel: the
    server itself answers it with an error, on a connection that stays open (as a NOPERM
    refusal does for a user whose ACL does not allow the channel)."""

    def __init__(self, host: str, port: int, forever: bool = False,
                 refused: bool = False) -> None:
        super().__init__((host, port))
        self.held = threading.Event()
        self._released = threading.Event()
        self._forever = forever
        self._refused = refused

    def upward(self, link: RelayLink, chunk: bytes) -> bool | None:
        if b"SUBSCRIBE" in chunk.upper():
            self.held.set()
            if self._forever:
                return None
            if self._refused:
                return super().upward(link, b"*1\r\n$9\r\nSUBSCRIBE\r\n")
            self._released.wait(30)
        return super().upward(link, chunk)

    def server_ends(self) -> set[str]:
        """The address (``host:port``) of each connection the relay opened to the server:
        how CLIENT LIST names them (``addr``)."""
        with self.lock:
            ends = set()
            for link in self.links:
                try:
                    host, port = link.upstream.getsockname()[:2]
                except OSError:
                    continue   # shut by the relay: gone from the server too
                ends.add(f"{host}:{port}")
            return ends

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        super().close()


def subscriber_class(learner: Any) -> type:
    cls = getattr(learner.load("advanced"), "Subscriber", None)
    if not isinstance(cls, type):
        pytest.fail("advanced.py: define a class Subscriber (see the README)", pytrace=False)
    return cls


def subscribe_hold(redis_db: Any, forever: bool = False,
                   refused: bool = False) -> tuple[SubscribeHold, str]:
    """A SubscribeHold in front of the lab's Redis, and the URL that goes through it."""
    url = urlsplit(redis_db.url)
    proxy = SubscribeHold(url.hostname or "127.0.0.1", url.port or 6379, forever, refused)
    return proxy, proxy.url_for(redis_db.url)


def construct_in_thread(cls: type, via: str, channel: str | None = None,
                        ) -> tuple[dict[str, Any], threading.Event]:
    """Subscriber(via, channel or a fresh one) on a thread of its own: what it ended with
    (``sub`` or ``error``) lands in the box, and the event is set when the constructor has
    ended."""
    box: dict[str, Any] = {}
    returned = threading.Event()

    def construct() -> None:
        try:
            box["sub"] = cls(via, channel or f"lab:{uuid.uuid4().hex}")
        except Exception as exc:  # noqa: BLE001 - the caller judges it
            box["error"] = exc
        returned.set()

    threading.Thread(target=construct, daemon=True).start()
    return box, returned


def test_subscriber_is_subscribed_when_constructed(learner: Any, redis_db: Any) -> None:
    """The server's confirmation of SUBSCRIBE is what makes "subscribed when the constructor
    returns" true: the test holds the SUBSCRIBE on its way and watches the constructor."""
    cls = subscriber_class(learner)
    proxy, via = subscribe_hold(redis_db)
    box, returned = construct_in_thread(cls, via)
    try:
        # A constructor that waits for the confirmation cannot return before its SUBSCRIBE
        # is held here: one that returned first is judged once a chunk it sent on its way
        # out has had a moment to arrive, not after the 10 s a slow start may take.
        deadline = time.monotonic() + 10
        while not proxy.held.is_set() and not returned.is_set() and (
                time.monotonic() < deadline):
            proxy.held.wait(0.01)
        if not proxy.held.wait(1.0 if returned.is_set() else 0):
            if "error" in box:
                how = (f"raised {type(box['error']).__name__}: {box['error']}, and sent no "
                       "SUBSCRIBE on its connection")
            elif returned.is_set():
                how = ("returned without its SUBSCRIBE reaching the server (none came within "
                       "a second of its return)")
            else:
                how = "had sent no SUBSCRIBE on its connection 10 s after it was called"
            pytest.fail(f"Subscriber() {how}: subscribe in the constructor, and read the "
                        "server's confirmation before returning", pytrace=False)
        returns_only_once_confirmed(
            proxy, box, returned,
            "Subscriber() returned while its SUBSCRIBE had not reached the server yet (the "
            "test held it): the constructor sent the command and did not wait for the "
            "server's confirmation, so a message published right after it returns can reach "
            "no one - read the 'subscribe' confirmation (pubsub.get_message(timeout=...)) "
            "before returning")
    finally:
        proxy.release()
        if "sub" in box:
            box["sub"].close()
        proxy.close()


def returns_only_once_confirmed(proxy: Any, box: dict[str, Any], returned: threading.Event,
                                early_message: str) -> None:
    """With the learner's SUBSCRIBE held at the proxy: the constructor must not return for a
    second (``early_message`` if it does), then return once the SUBSCRIBE goes on."""
    early = returned.wait(1.0)  # SUBSCRIBE is held: nothing can have confirmed it
    assert not early or "error" in box, early_message
    proxy.release()
    assert returned.wait(10), "Subscriber() did not return after SUBSCRIBE was confirmed"
    if "error" in box:
        pytest.fail(f"Subscriber() raised {type(box['error']).__name__}: {box['error']}",
                    pytrace=False)


def test_subscriber_waits_for_its_own_confirmation(learner: Any, redis_db: Any) -> None:
    """Another client is already subscribed to the channel when the learner's SUBSCRIBE is
    held: a count of the channel's subscribers says "subscribed" at once, but only the reply
    on the Subscriber's own connection says that this one is."""
    cls = subscriber_class(learner)
    channel = f"lab:{uuid.uuid4().hex}"
    other = redis_db.client().pubsub()
    other.subscribe(channel)
    assert came_true(lambda: (other.get_message(timeout=1) or {}).get("type") == "subscribe",
                     10), "the test's own subscriber got no confirmation"
    proxy, via = subscribe_hold(redis_db)
    box, returned = construct_in_thread(cls, via, channel)
    try:
        if not proxy.held.wait(10):
            pytest.fail("Subscriber() sent no SUBSCRIBE on its connection within 10 s: "
                        "subscribe in the constructor", pytrace=False)
        returns_only_once_confirmed(
            proxy, box, returned,
            "Subscriber() returned while its SUBSCRIBE was held on its way (the test held "
            "it) and another client was already subscribed to the channel: PUBSUB NUMSUB "
            "or PUBSUB CHANNELS counts the channel's subscribers, not this connection's "
            "subscription - wait for the 'subscribe' reply on the Subscriber's own "
            "connection (pubsub.get_message(timeout=...))")
    finally:
        proxy.release()
        if "sub" in box:
            box["sub"].close()
        proxy.close()
        other.close()


# The subscriber gives up on a SUBSCRIBE the server never confirms within this bound: the
# README asks for an exception within NEVER_CONFIRMED_S; the test waits a little longer
# (and less than the 30 s SubscribeHold holds a chunk before it lets it through).
NEVER_CONFIRMED_S, NEVER_CONFIRMED_WAIT_S = 15, 25


def constructor_ended(proxy: Any, box: dict[str, Any], returned: threading.Event,
                      after: str, fix: str) -> float:
    """Wait (at most NEVER_CONFIRMED_WAIT_S) for Subscriber() to return or raise, after the
    test did something to its SUBSCRIBE (``after``); return the seconds waited. A
    constructor that sent no SUBSCRIBE, or is still running then, fails the test (``fix``:
    what to do instead)."""
    started = time.monotonic()
    ended = returned.wait(NEVER_CONFIRMED_WAIT_S)
    waited = time.monotonic() - started
    if not proxy.held.is_set():
        pytest.fail("Subscriber() sent no SUBSCRIBE on its connection (" + (
            f"it raised {type(box['error']).__name__}: {box['error']}" if "error" in box
            else "it returned" if ended else f"still running after {waited:.0f} s")
            + "): subscribe in the constructor", pytrace=False)
    assert ended, f"Subscriber() was still running {waited:.0f} s after {after}: {fix}"
    return waited


def test_subscriber_raises_when_never_confirmed(learner: Any, redis_db: Any) -> None:
    """The error path of the confirmation: a SUBSCRIBE the server never answers (held here
    for good) must end the constructor with an exception, not with a Subscriber that is
    not subscribed. Judged when the constructor ends, not after a fixed wait. Giving up
    must also give back the connection opened for the SUBSCRIBE (judged on the server,
    CLIENT LIST), or each failed attempt leaks one."""
    cls = subscriber_class(learner)
    proxy, via = subscribe_hold(redis_db, forever=True)
    box, returned = construct_in_thread(cls, via)
    try:
        waited = constructor_ended(
            proxy, box, returned, "its SUBSCRIBE, which the server never confirmed (the test "
            "held it)", "a constructor that waits for ever hangs its caller with no error to "
            f"act on - wait a bounded time (at most {NEVER_CONFIRMED_S} s) and raise")
        assert "error" in box, (
            f"Subscriber() returned normally after {waited:.1f} s although the server never "
            "confirmed its SUBSCRIBE (the test held it): the wait for the confirmation gave "
            "up and fell through, so the caller holds a subscriber that receives nothing and "
            "believes it is subscribed - when no 'subscribe' confirmation comes in time, "
            "raise (TimeoutError) instead of returning")
        left = still_open_on_server(redis_db, proxy.server_ends())
        assert not left, (
            f"{CLOSED_WITHIN_S:.0f} s after Subscriber() gave up on its SUBSCRIBE (it raised "
            f"{type(box['error']).__name__}), the connection it opened is still open on the "
            f"server (CLIENT LIST: {'; '.join(left)}): the constructor raised without closing "
            "it, and nobody else holds it to close it later - every failed attempt leaks a "
            "connection until maxclients refuses new ones. On every path that gives up "
            "(no confirmation in time, an error while subscribing), close the pub/sub "
            "connection and the client before raising (try/except: close(); raise)")
    finally:
        proxy.release()
        if "sub" in box:
            box["sub"].close()
        proxy.close()


def test_subscriber_closes_its_connection_when_subscribe_is_refused(
        learner: Any, redis_db: Any) -> None:
    """The other way a constructor gives up: the server answers the SUBSCRIBE with an error
    (a NOPERM for a channel the user's ACL does not allow, a channel name it refuses) and
    keeps the connection open. The constructor must raise, and close that connection first
    (judged on the server, CLIENT LIST): a close() only on the no-confirmation path leaks
    it here."""
    cls = subscriber_class(learner)
    proxy, via = subscribe_hold(redis_db, refused=True)
    box, returned = construct_in_thread(cls, via)
    try:
        constructor_ended(proxy, box, returned, "the server answered its SUBSCRIBE with an "
                          "error", "read the reply, and raise when it is not the 'subscribe' "
                          "confirmation")
        assert "error" in box, (
            "Subscriber() returned normally although the server answered its SUBSCRIBE with "
            "an error (ERR wrong number of arguments: the test sent the server a SUBSCRIBE "
            "without its channel), so the caller holds a subscriber that receives nothing - "
            "raise when the reply is not the 'subscribe' confirmation")
        left = still_open_on_server(redis_db, proxy.server_ends())
        assert not left, (
            f"{CLOSED_WITHIN_S:.0f} s after Subscriber() raised "
            f"{type(box['error']).__name__} ({box['error']}) - the server refused its "
            "SUBSCRIBE and kept the connection open, as it does with NOPERM for a channel "
            f"the user may not use - that connection is still open (CLIENT LIST: "
            f"{'; '.join(left)}): the constructor closes what it opened when the "
            "confirmation does not come, but not when the reply is an error, and nobody "
            "else holds the half-made subscriber to close it. Close on every way out of "
            "the constructor that raises (try: subscribe and wait; except BaseException: "
            "close(); raise)")
    finally:
        if "sub" in box:
            box["sub"].close()
        proxy.close()


class SubscribeCut(SubscribeHold):
    """A TCP proxy in front of Redis that breaks the connection carrying a SUBSCRIBE (both of
    its sockets shut, as a network or a server failing does): ``where="before"`` the server
    gets the command (the chunk is not passed on), ``where="after"`` it took it, before its
    confirmation reaches the client (the server's chunk carrying it is not passed on). The
    first ``times`` connections are broken so (None: every one); later ones pass untouched."""

    def __init__(self, host: str, port: int, where: str, times: int | None) -> None:
        super().__init__(host, port)
        self.where, self.times, self.cuts = where, times, 0
        self._counting = threading.Lock()

    def _cut(self) -> bool:
        with self._counting:
            if self.times is not None and self.cuts >= self.times:
                return False
            self.cuts += 1
            return True

    def upward(self, link: RelayLink, chunk: bytes) -> bool | None:
        if b"SUBSCRIBE" in chunk.upper():
            self.held.set()
            if self.where == "before" and self._cut():
                return False
        return TcpRelay.upward(self, link, chunk)

    def downward(self, link: RelayLink, chunk: bytes) -> bool | None:
        if self.where == "after" and b"subscribe" in chunk and self._cut():
            return False
        return TcpRelay.downward(self, link, chunk)


# How the test breaks the Subscriber's connection while it subscribes: before the server
# takes the SUBSCRIBE or after (its confirmation lost with the connection), and how many
# connections in a row (None: every one, so no SUBSCRIBE is ever confirmed). Every time
# first: a constructor that returns on a lost connection shows there whatever redis-py's
# own reconnection did.
LOST_WHILE_SUBSCRIBING: list[tuple[str, int | None]] = [
    ("before", None), ("before", 1), ("after", 1)]


def test_subscriber_loses_its_connection_while_subscribing(learner: Any,
                                                           redis_db: Any) -> None:
    """The connection breaks while the constructor subscribes (before the server takes the
    SUBSCRIBE, or before its confirmation comes back). That is an error while subscribing: the
    constructor raises, having closed what it opened - or reconnects and subscribes again,
    returning only once the server confirmed it. Judged on the server: a Subscriber returned
    must be counted (PUBSUB NUMSUB) at once; after a raise, no connection the constructor
    opened is left (CLIENT LIST) - redis-py's pub/sub reconnects, and subscribes again, on
    the read that meets the lost connection, before that read raises."""
    cls = subscriber_class(learner)
    admin = redis_db.admin_client()
    try:
        for where, times in LOST_WHILE_SUBSCRIBING:
            url = urlsplit(redis_db.url)
            proxy = SubscribeCut(url.hostname or "127.0.0.1", url.port or 6379, where, times)
            channel = f"lab:{uuid.uuid4().hex}"
            box, returned = construct_in_thread(cls, proxy.url_for(redis_db.url), channel)
            lost = (("the test broke its connection " if times == 1 else
                     "the test broke every connection it made ") + (
                        "as it sent SUBSCRIBE, before the server got it" if where == "before"
                        else "once the server took its SUBSCRIBE, before the confirmation "
                             "reached it"))
            try:
                constructor_ended(proxy, box, returned, lost, "a lost connection is an error "
                                  "while subscribing - raise (or reconnect and subscribe "
                                  f"again), within {NEVER_CONFIRMED_S} s")
                if "sub" in box:
                    counted = admin.pubsub_numsub(channel)[0][1]
                    assert counted == 1, (
                        f"Subscriber() returned normally after {lost}, and the server counts "
                        f"{counted} subscribers on its channel (PUBSUB NUMSUB): the caller "
                        "holds a subscriber that receives nothing and believes it is "
                        "subscribed. A lost connection is an error while subscribing: raise "
                        "(closing what the constructor opened), or reconnect and SUBSCRIBE "
                        "again, returning only once the server has confirmed it - never "
                        "return on the error, trusting a later read to subscribe again")
                    continue
                left = still_open_on_server(redis_db, proxy.server_ends())
                assert not left, (
                    f"{CLOSED_WITHIN_S:.0f} s after Subscriber() raised "
                    f"{type(box['error']).__name__} ({box['error']}) - {lost} - a connection "
                    f"it opened is still open on the server (CLIENT LIST: {'; '.join(left)}): "
                    "redis-py's pub/sub reconnected (and subscribed again) before the lost "
                    "connection's error reached the constructor, which raised without "
                    "closing, and nobody else holds the half-made subscriber to close it. "
                    "Close on every way out of the constructor that raises, a lost "
                    "connection too (try: subscribe and wait; except BaseException: close(); "
                    "raise)")
            finally:
                if "sub" in box:
                    box["sub"].close()
                proxy.close()
    finally:
        admin.close()


def still_open_on_server(redis_db: Any, ends: set[str]) -> list[str]:
    """The server's connections (CLIENT LIST) whose address is one of ``ends``, once they
    are gone or CLOSED_WITHIN_S has passed: how CLIENT LIST describes those still open."""
    admin = redis_db.admin_client(decode_responses=True)
    try:
        def open_ones() -> list[str]:
            return [f"id={c['id']} addr={c['addr']} cmd={c.get('cmd')}"
                    for c in admin.client_list() if c.get("addr") in ends]

        came_true(lambda: not open_ones(), CLOSED_WITHIN_S)
        return open_ones()
    finally:
        admin.close()


# Payloads a subscriber must return exactly as published: text beyond ASCII, quotes and
# backslashes (which a bytes repr escapes), a line break, an empty message.
ODD_PAYLOADS = ["prix: 12,50 \u20ac", "na\u00efve caf\u00e9 \u2615 \u6771\u4eac",
                "it's \"quoted\"", "C:\\temp\\new", "two\nlines", ""]


def test_messages_arrive_exactly_as_published(learner: Any, redis_db: Any) -> None:
    module = learner.load("advanced")
    publish = learner.function("advanced", "publish")
    cls = getattr(module, "Subscriber", None)
    if not isinstance(cls, type):
        pytest.fail("advanced.py: define a class Subscriber (see the README)", pytrace=False)
    channel = f"lab:{uuid.uuid4().hex}"
    sub = cls(redis_db.url, channel)
    try:
        for message in ODD_PAYLOADS:
            reached = publish(redis_db.url, channel, message)
            assert reached == 1, f"publish({message!r}) returned {reached}, expected 1"
        got = [sub.receive(5.0) for _ in ODD_PAYLOADS]
    finally:
        sub.close()
    wrong = [f"published {sent!r}, receive() returned {seen!r}"
             for sent, seen in zip(ODD_PAYLOADS, got, strict=True) if seen != sent]
    assert not wrong, "\n".join(wrong) + (
        f"\n({len(wrong)} of {len(ODD_PAYLOADS)} messages changed): a message is the text "
        "that was published - PUBLISH sends a str as UTF-8 bytes; decode them as UTF-8 "
        "(decode_responses=True, or data.decode('utf-8')), not through their repr (which "
        "escapes quotes, backslashes and every non-ASCII byte) nor as latin-1 (which turns "
        "each non-ASCII character into several)")


def connections_on(admin: Any, db: int) -> dict[int, str]:
    """The server's connections on database `db` (CLIENT LIST): id -> how CLIENT LIST
    describes it (address, last command, subscription count)."""
    return {int(c["id"]): f"id={c['id']} addr={c.get('addr')} cmd={c.get('cmd')} "
            f"sub={c.get('sub')}" for c in admin.client_list() if int(c.get("db", -1)) == db}


# After close() returns (or the constructor raised), its socket is closed on the client's
# side; the server sees the end of the connection (and drops the subscription with it) a
# few milliseconds later - or once a listener thread that closes it on its way out has
# noticed its stop (a run_in_thread() polling every second). This long is far past that on
# a loaded machine; only a connection left open waits it out.
CLOSED_WITHIN_S = 3.0
# A thread told to stop by close() gets this long to end (judged as soon as it has, by
# join()): a listener polling with get_message(timeout=...) notices its stop at its next
# wake-up.
THREAD_ENDS_WITHIN_S = 5.0


def test_close_ends_the_connection_the_subscription_and_the_listener(
        learner: Any, redis_db: Any) -> None:
    """close() gives back what the constructor took, judged where it lives: the server
    (CLIENT LIST: the subscriber's connections; PUBSUB NUMSUB: its subscription) and the
    learner's process (the threads the constructor started must end). A Subscriber per
    request, closed but still open, leaks a connection (maxclients), a subscription the
    server keeps filling with messages for no one, and a thread polling for ever."""
    cls = subscriber_class(learner)
    harness = learner.harness()
    channel = f"lab:{uuid.uuid4().hex}"
    admin = redis_db.admin_client(decode_responses=True)
    try:
        before = set(connections_on(admin, redis_db.db)) | {int(admin.client_id())}
        threads_before = set(harness.thread_idents())
        sub = cls(redis_db.url, channel)
        try:
            opened = {cid: what for cid, what in connections_on(admin, redis_db.db).items()
                      if cid not in before}
            started = [t for t in harness.thread_idents() if t not in threads_before]
            assert admin.pubsub_numsub(channel)[0][1] == 1, (
                "the server counts no subscriber on the channel after Subscriber() returned: "
                "subscribe in the constructor")
        finally:
            sub.close()

        def released() -> bool:
            return (admin.pubsub_numsub(channel)[0][1] == 0
                    and not set(opened) & set(connections_on(admin, redis_db.db)))

        came_true(released, CLOSED_WITHIN_S)
        subscribed = admin.pubsub_numsub(channel)[0][1]
        left = {cid: what for cid, what in connections_on(admin, redis_db.db).items()
                if cid in opened}
    finally:
        admin.close()
    assert not subscribed, (
        f"{CLOSED_WITHIN_S:.0f} s after close() returned, the server still counts {subscribed} "
        f"subscriber on the channel (PUBSUB NUMSUB), on the connection "
        f"{'; '.join(left.values()) or '?'}: close() left the subscription active - every "
        "message published to the channel is still sent to a connection nobody reads, and "
        "publish() counts it as a receiver. Close the pub/sub connection in close() "
        "(pubsub.close(): it unsubscribes by ending the connection)")
    assert not left, (
        f"{CLOSED_WITHIN_S:.0f} s after close() returned, the connection Subscriber() opened "
        f"is still open on the server (CLIENT LIST: {'; '.join(left.values())}): close() "
        "unsubscribed but kept the connection - every Subscriber closed this way leaks a "
        "connection until the server's maxclients refuses new ones. Close the connection "
        "itself (pubsub.close() / the client's close()), not only the subscription")
    running = harness.still_running(started, THREAD_ENDS_WITHIN_S)
    assert not running, (
        f"{THREAD_ENDS_WITHIN_S:.0f} s after close() returned, the {', '.join(running)} that "
        "Subscriber() started is still running: close() did not stop the listener thread "
        "(a daemon thread is not stopped by anything but the end of the process - each "
        "closed Subscriber leaves one behind, polling for ever). In close(), stop it "
        "(worker.stop() for pubsub.run_in_thread(), or a flag/Event your loop checks) "
        "and join it")


# --------------------------------------------------------------------------------------
# AOF: the one test that restarts the shared server

RESTART_LOCK = "labrunner:lock:redis-restart"
PERSISTENCE_SETTINGS = ("appendonly", "appendfsync", "save")


def server_admin(redis_db: Any) -> redis.Redis[str]:
    endpoint = redis_db.endpoint
    return redis.Redis(host=endpoint.host, port=endpoint.port, db=0,
                       username=endpoint.username or None, password=endpoint.password or None,
                       decode_responses=True, socket_timeout=10)


@contextmanager
def exclusive_restarts(redis_db: Any) -> Iterator[redis.Redis[str]]:
    """Hold the restart lock; start from AOF off; put the persistence settings back."""
    admin = server_admin(redis_db)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + 90
    while not admin.set(RESTART_LOCK, token, nx=True, px=120_000):
        if time.monotonic() > deadline:
            pytest.fail("another test kept the Redis restart lock for 90 s", pytrace=False)
        time.sleep(0.1)
    saved = {name: str(admin.config_get(name)[name]) for name in PERSISTENCE_SETTINGS}
    try:
        admin.config_set("appendonly", "no")  # whatever an earlier run left: start from off
        yield admin
    finally:
        admin.close()
        admin = server_admin(redis_db)  # the server may have restarted: a new connection
        for name, value in saved.items():
            admin.config_set(name, value)
        admin.config_rewrite()  # the restart wrote the learner's settings into the file
        if admin.get(RESTART_LOCK) == token:
            admin.delete(RESTART_LOCK)
        admin.close()


# An RDB snapshot (BGSAVE) slowed down to this long while AOF is switched on: Redis runs
# one child at a time, so it can only *schedule* the AOF's first rewrite
# (aof_rewrite_scheduled:1, aof_rewrite_in_progress:0) until the snapshot ends. Long
# enough that a wait which gives up after a few seconds (and returns as if the AOF were
# on) is seen giving up; each other key on the server adds only 20 ms.
SNAPSHOT_KEYS, KEY_SAVE_DELAY_US = 600, 20_000  # 600 keys x 20 ms: a 12 s snapshot
SNAPSHOT_S = SNAPSHOT_KEYS * KEY_SAVE_DELAY_US // 1_000_000


@contextmanager
def slow_snapshot(admin: redis.Redis[str], redis_db: Any) -> Iterator[None]:
    """A BGSAVE in progress for about SNAPSHOT_S seconds from the block's start."""
    client = redis_db.client()
    client.mset({f"snapshot:{n}": "x" for n in range(SNAPSHOT_KEYS)})
    client.close()
    # A snapshot still running (an earlier run's, stopped at its first failure) would end
    # early, and with it the rewrite's wait: start from none.
    wait_until(lambda: not admin.info("persistence").get("rdb_bgsave_in_progress"),
               "an RDB snapshot already running to end", timeout=60)
    admin.config_set("rdb-key-save-delay", KEY_SAVE_DELAY_US)
    try:
        try:
            admin.bgsave()  # the child keeps the delay it was forked with
        except redis.ResponseError as exc:  # a snapshot of the server's own already runs
            if "in progress" not in str(exc):
                raise
    finally:
        admin.config_set("rdb-key-save-delay", 0)  # later children (the rewrite) run at speed
    try:
        yield
    finally:
        # enable_aof() returned (or raised) before the snapshot ended: a wrong one, or a test
        # that failed early. Left running, the snapshot would hold up the next run of this
        # test (above) for the rest of its SNAPSHOT_S. A clean shutdown ends it (Redis kills
        # the saving child; no other command does but FLUSHALL): unschedule the AOF's first
        # rewrite (a restart waits for that), and have the shutdown save every key in an RDB
        # file at full speed (a save point), which the start then loads - with neither AOF
        # nor a save point, the shared server would come back empty, or with an older
        # snapshot's keys. exclusive_restarts() puts both settings back.
        admin = server_admin(redis_db)  # the test may have restarted the server
        try:
            running = admin.info("persistence").get("rdb_bgsave_in_progress")
            if running:
                admin.config_set("appendonly", "no")
                admin.config_set("save", "3600 1")
        finally:
            admin.close()
        if running:
            redis_db.restart()


def test_keys_survive_a_restart_with_aof_on(learner: Any, redis_db: Any) -> None:
    enable_aof = learner.function("advanced", "enable_aof")
    with exclusive_restarts(redis_db) as admin, slow_snapshot(admin, redis_db):
        started = time.monotonic()
        raised: Exception | None = None
        try:
            enable_aof(redis_db.config_url)  # a user that may CONFIG SET
        except Exception as exc:  # noqa: BLE001 - the learner's error, named in the message
            raised = exc
        waited = time.monotonic() - started
        info = admin.info("persistence")
        assert info.get("aof_enabled") == 1, (
            f"after enable_aof() the server reports aof_enabled:{info.get('aof_enabled')}: "
            "turn the append-only file on (CONFIG SET appendonly yes)")
        if raised is not None:
            pytest.fail(
                f"enable_aof() raised {type(raised).__name__}: {raised} after {waited:.1f} s, "
                f"while the AOF's first rewrite was only waiting for a {SNAPSHOT_S} s RDB "
                "snapshot to end: a rewrite can take that long on real data; wait for it "
                "(give up only after 30 s or more)", pytrace=False)
        running = {k: info.get(k) for k in ("aof_rewrite_in_progress", "aof_rewrite_scheduled")}
        still = ", ".join(f"{k}:{v}" for k, v in running.items())
        assert not any(running.values()) or waited < 2, (
            f"enable_aof() waited {waited:.1f} s, then returned normally while the server "
            f"still reports {still}: the wait gave up and fell through as if the AOF were "
            f"active, so the caller believes every write is logged when a restart would "
            f"find no complete AOF. The first rewrite waits for the running RDB snapshot "
            f"(here about {SNAPSHOT_S} s): keep waiting, and if it never finishes raise "
            "(TimeoutError) instead of returning")
        assert not any(running.values()), (
            f"enable_aof() returned while the server still reports "
            f"{', '.join(f'{k}:{v}' for k, v in running.items())}: switching the AOF on starts "
            "a background rewrite that writes the existing data into the new AOF, and until it "
            "finishes the AOF does not hold that data (a restart now would load an incomplete "
            "file); while another child runs (here an RDB snapshot) the rewrite is only "
            "scheduled, and starts when that child ends - after CONFIG SET appendonly yes, "
            "wait until INFO persistence shows aof_rewrite_in_progress:0 and "
            "aof_rewrite_scheduled:0")
        client = redis_db.client(decode_responses=True)
        written = {f"session:{n}": f"user-{n}" for n in range(50)}
        client.mset(written)
        client.hset("cart:7", mapping={"sku-1": "2", "sku-9": "1"})
        client.close()

        redis_db.restart()  # a clean shutdown and start, with the same data directory

        client = redis_db.client(decode_responses=True)
        try:
            survived = sum(1 for v in client.mget(list(written)) if v is not None)
            cart = client.hgetall("cart:7")
        finally:
            client.close()
        assert survived == 50 and cart == {"sku-1": "2", "sku-9": "1"}, (
            f"after a restart {survived} of 50 keys written after enable_aof() were still "
            "there: without the AOF (or with only an RDB snapshot taken before the writes) "
            "everything since the last snapshot is lost")


def test_enable_aof_raises_when_the_server_refuses(learner: Any, redis_db: Any) -> None:
    """The lab's ordinary user may not CONFIG SET (a managed Redis, an ACL user): the server
    refuses, the AOF stays off, and enable_aof() must say so by raising - a caller told
    nothing goes on as if every write were logged. The AOF is switched off first (the
    restart lock held), so an enable_aof() that returns because the AOF is already on is
    not what is judged here."""
    enable_aof = learner.function("advanced", "enable_aof")
    with exclusive_restarts(redis_db) as admin:
        try:
            enable_aof(redis_db.url)  # the lab user: no CONFIG SET
        except NotImplementedError:
            pytest.fail("enable_aof() is not implemented yet", pytrace=False)
        except Exception:  # noqa: BLE001 - any error is the answer asked for
            return
        pytest.fail(
            f"enable_aof() returned normally though the server refused its CONFIG SET "
            f"appendonly yes (this user has no CONFIG permission) and reports aof_enabled:"
            f"{admin.info('persistence').get('aof_enabled')}: the caller now believes every "
            "write is logged when a restart would lose them - let the server's error through "
            "(or raise one of your own), never return as if the AOF were on", pytrace=False)
