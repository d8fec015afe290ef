"""ph4.10 verification: two instances of the learner's app, each its own process
(learner.python), behind a round-robin balancer the test runs, with state in a real Redis
(a database of the test's own).

* a session started on one instance continues on the other, and once its keys are deleted
  in Redis (a logout, a revocation, its TTL) no instance serves it any more: an instance
  keeps no copy of its own;
* 8 clients x 25 increments of a shared counter through the balancer: the values handed
  out are exactly 1..200;
* mid-run one instance is killed with SIGKILL; the balancer retries the refused request on
  the survivor; the cart still holds every item, in order (items repeat: a set or a hash
  loses them);
* two adds to one cart at once, interleaved step by step: instance A's Redis connection goes
  through a gate (labrunner.testing.redis_gate) that holds the command carrying A's item
  until B's add has answered - a read-modify-write of the whole cart (GET, append, SET)
  then writes back a cart without B's item, on every run, not once in a while.
* an instance SIGKILLed right after the command of a login (or a first cart add) that
  writes a key, its Redis connection cut there: no key is left without an expiry (a key
  and its TTL in one step: SET ... EX, MULTI/EXEC, a Lua script).

* Redis gone mid-run (a relay in front of it cuts its connections and closes new ones):
  every request is a 5xx until it is back - not 200 from the process's memory (a count, a
  session or cart copy kept "for a moment"), not 401 - and afterwards nothing done
  meanwhile counts.

What the app does in Redis is read with MONITOR (labrunner.testing.redis_commands), so a
claim is checked at its source: the keys a login and a cart write create must be in Redis
with an expiry (a session nobody deletes must not live forever), the cart's items must reach
Redis (a file on the shared disk passes the kill but is state of one machine), and the
counter must not be read then written back (GET + SET loses increments that interleave,
whatever the timing of one run). A session id must be random (not the user's name) and an
unknown or missing session must get 401 on every route that needs one. A value the app
answers is checked for its type before its value: Redis answers strings, and a counter
handed back as "200" is named as such.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any, cast

import pytest

from labrunner.testing import Outage, redis_commands, redis_gate, wait_until

READY = 20.0
USER = "annabelle-k"
REVOKED_WITHIN = 5.0   # seconds: a session deleted in Redis must be gone on every instance
MIN_TTL = 300          # seconds: shorter, a session ends while its user is still there
ALONE = 3.0            # seconds B's add gets to send its item while A's write is held;
                       # one that has not by then waits for A (a lock): A then goes on
                       # (3 s, not 1: under load an HTTP add may take a second to get there)
KINDS = {str: "string", int: "int", float: "float", list: "list", dict: "object",
         bool: "boolean", type(None): "null", bytes: "bytes"}
# commands that write a value read before (a read-modify-write, unless under WATCH)
OVERWRITES = {"SET", "SETEX", "PSETEX", "GETSET", "MSET", "HSET", "HMSET"}
CREATES = {"SET", "HSET", "HMSET", "RPUSH", "LPUSH", "SADD", "ZADD", "INCR", "APPEND"}
NOT_KEYS = {"MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH", "ECHO", "EVAL", "EVALSHA",
            "FCALL", "SCRIPT", "FUNCTION", "INFO", "DBSIZE", "TIME"}


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
            reply = self.send(inst, method, path, doc, cookie)
            if reply is not None:
                return reply
            with self.lock:
                self.dead.add(inst.name)
        pytest.fail(f"{method} {path}: every instance refused the connection", pytrace=False)

    @staticmethod
    def send(inst: Instance, method: str, path: str, doc: Any = None,
             cookie: str | None = None) -> Reply | None:
        """The request to that instance (None: it refused the connection)."""
        conn = http.client.HTTPConnection("127.0.0.1", inst.port, timeout=30)
        body = json.dumps(doc).encode() if doc is not None else None
        headers = {"Content-Type": "application/json"} if body else {}
        if cookie:
            headers["Cookie"] = cookie
        try:
            conn.request(method, path, body=body, headers=headers)
        except ConnectionRefusedError:
            return None
        resp = conn.getresponse()
        reply = Reply(resp.status, resp.read(), dict(resp.getheaders()), inst.name)
        conn.close()
        return reply


@contextlib.contextmanager
def running(learner: Any, urls: dict[str, str]) -> Iterator[tuple[RoundRobin, list[Instance]]]:
    """An instance per name, each with its REDIS_URL, behind the balancer."""
    learner.path("app.py")
    instances: list[Instance] = []
    try:
        for name, url in urls.items():
            instances.append(Instance(learner, name, url))
        yield RoundRobin(instances), instances
    finally:
        for inst in instances:
            inst.stop()


@pytest.fixture
def cluster(learner: Any, redis_db: Any) -> Iterator[tuple[RoundRobin, list[Instance]]]:
    with running(learner, {"A": redis_db.url, "B": redis_db.url}) as both:
        yield both


def check_type(what: str, got: Any, kind: type, want: Any = None) -> None:
    """Fail naming both types when a value the app answered is not of the kind expected
    (``want``: the value it should have been, when the test knows it)."""
    if isinstance(got, kind) and not (isinstance(got, bool) and kind is not bool):
        return
    name = KINDS[kind]
    expected = (f"the {name} {want!r}" if want is not None
                else f"{'an' if name[0] in 'aeiou' else 'a'} {name}")
    why = ""
    if isinstance(got, str) and kind in (int, float):
        why = (" - Redis returns strings (GET of a counter INCR made answers '3', not 3): "
               "convert with int() before answering")
    elif isinstance(got, str) and kind is list:
        why = (" - that is the text Redis holds, not the list: read the list (LRANGE) or "
               "decode the text (json.loads) before answering")
    pytest.fail(f"{what}: got the {KINDS.get(type(got), type(got).__name__)} {got!r}, "
                f"expected {expected}{why}", pytrace=False)


def numeric(text: Any) -> int | None:
    """The int a numeric string stands for (what the app should have answered), else None."""
    return int(text) if isinstance(text, str) and re.fullmatch(r"\s*-?\d+\s*", text) else None


def cart_items(reply: Reply, what: str) -> list[Any]:
    """The items GET /cart answered: a list, or the test fails saying what came instead."""
    assert reply.status == 200, (
        f"{what}: GET /cart on {reply.served_by} answered {reply.status} "
        f"{reply.body[:120]!r}, expected 200")
    items = reply.json().get("items") if isinstance(reply.json(), dict) else None
    check_type(f"{what}: GET /cart answered {{'items': ...}}", items, list)
    return cast(list[Any], items)  # check_type failed the test unless it is a list


def login(lb: RoundRobin, user: str) -> str:
    reply = lb.request("POST", "/login", {"user": user})
    assert reply.status == 200, f"POST /login answered {reply.status}: {reply.body[:200]!r}"
    cookie = reply.headers.get("Set-Cookie", "")
    m = re.match(r"\s*(session=[^;]+)", cookie)
    assert m, f"POST /login set no session cookie (Set-Cookie: {cookie!r})"
    return m.group(1)


SAMPLE_LOGINS = 8  # session ids compared for structure
MIN_ID_BITS = 64    # OWASP: at least 64 bits of entropy in a session id


def guessable(ids: list[str]) -> str | None:
    """What makes these session ids (issued moments apart) guessable, or None. Random ids
    of one length differ at almost every position; ids built from the time, a counter or
    the host (uuid1: login time and MAC address) keep whole runs of characters in common.
    One or two fixed positions are allowed (a uuid4's version and variant)."""
    if len({len(i) for i in ids}) > 1:
        return (f"they have different lengths ({sorted({len(i) for i in ids})}): a counter "
                "or a time, not a fixed number of random bytes")
    fixed = [n for n in range(len(ids[0])) if len({i[n] for i in ids}) == 1]
    alphabet = set("".join(ids))
    bits_per_char = 4 if alphabet <= set("0123456789abcdefABCDEF") else 6
    varying_bits = (len(ids[0]) - len(fixed)) * bits_per_char
    if len(fixed) > 2:
        shown = "".join(ids[0][n] if n in fixed else "." for n in range(len(ids[0])))
        return (f"they share the characters at {len(fixed)} of {len(ids[0])} positions "
                f"({shown}, '.' where they differ)")
    if varying_bits < MIN_ID_BITS:
        return (f"they carry at most {varying_bits} bits that change, fewer than "
                f"{MIN_ID_BITS}: short enough to enumerate")
    return None


def keys_written(commands: list[list[str]]) -> list[str]:
    """The keys the commands name (their first argument), in order, once each."""
    keys: list[str] = []
    for c in commands:
        if c[0] not in NOT_KEYS and len(c) > 1 and c[1] not in keys:
            keys.append(c[1])
    return keys


def check_expiry(redis_db: Any, what: str, commands: list[list[str]], why: str,
                 short_only: bool = False) -> None:
    """Every key the request created or wrote is in Redis with an expiry (short_only: none
    of them expires within minutes - checked at once, before they are gone)."""
    client = redis_db.client(decode_responses=True)
    try:
        kept = [k for k in keys_written(commands) if client.exists(k)]
        if not kept and not short_only:
            pytest.fail(
                f"{what} left nothing in Redis (commands seen: "
                f"{[c[0] for c in commands][:8] or 'none'}), expected its state there\nState "
                "kept in the process, in a file or anywhere else on one machine is not shared "
                "by instances on other machines: write it to Redis (REDIS_URL).",
                pytrace=False)
        forever = [k for k in kept if client.ttl(k) == -1]
        short = [(k, client.pttl(k)) for k in kept if 0 <= client.pttl(k) < MIN_TTL * 1000]
        if short:
            key, ms = short[0]
            pytest.fail(
                f"{what} wrote the Redis key {key!r} with {ms / 1000:.1f} s to live, expected "
                f"at least {MIN_TTL // 60} minutes\nA session or cart that vanishes within "
                "seconds logs the user out mid-visit: EXPIRE takes seconds, PEXPIRE and "
                "SET ... PX milliseconds.", pytrace=False)
        if forever and not short_only:
            pytest.fail(
                f"{what} wrote the Redis key {forever[0]!r} with no expiry (TTL -1), expected "
                f"one\n{why} Give it a TTL (EXPIRE key seconds, or SET ... EX) when you write "
                "it.", pytrace=False)
    finally:
        client.close()


def test_a_session_continues_on_the_other_instance(cluster: Any, redis_db: Any) -> None:
    lb, instances = cluster
    with redis_commands(redis_db) as sent:
        cookie = login(lb, USER)                    # served by A
    check_expiry(redis_db, "POST /login", sent, "", short_only=True)
    for _ in range(4):                              # B, A, B, A
        reply = lb.request("GET", "/me", cookie=cookie)
        assert reply.status == 200 and reply.json().get("user") == USER, (
            f"logged in on instance A; GET /me on instance {reply.served_by} answered "
            f"{reply.status} {reply.body[:120]!r}, expected 200 with user {USER!r}\nThe "
            "session lives where the login happened: keep sessions in Redis (a key per "
            "session id, with a TTL) and keep nothing per instance - no dict in the "
            "process, no key or secret that differs between instances.")
    check_expiry(redis_db, "POST /login", sent,
                 "A session nobody logs out of stays in Redis forever: sessions pile up "
                 "until Redis runs out of memory.")
    session_found_among_other_cookies(lb, cookie)
    other = login(lb, USER)
    sid, other_sid = cookie.split("=", 1)[1], other.split("=", 1)[1]
    if sid == other_sid or USER in sid:
        pytest.fail(
            f"two logins of {USER!r} got the session ids {sid!r} and {other_sid!r}, expected "
            "two random ids\nAn id made of the user's name (or the same id every time) is "
            "one anyone can write into a cookie to become that user: the id must be "
            "unguessable (secrets.token_urlsafe), the user kept under it in Redis.",
            pytrace=False)
    ids = [sid, other_sid] + [login(lb, USER).split("=", 1)[1]
                              for _ in range(SAMPLE_LOGINS - 2)]
    why = guessable(ids)
    if why is not None:
        pytest.fail(
            f"{len(ids)} logins a moment apart got the session ids {ids[:3]}...: {why}\nOnce "
            "the session lives in Redis, its id is the whole credential every instance "
            "trusts: an id built from the time, a counter or the host (uuid1 is the login "
            "time and the MAC address) is unique but guessable - whoever sees their own id "
            "can enumerate their neighbours'. Use secrets.token_urlsafe(32).", pytrace=False)
    a_revoked_session_ends_everywhere(instances, redis_db, cookie, keys_written(sent))


def session_found_among_other_cookies(lb: RoundRobin, cookie: str) -> None:
    """A browser sends every cookie of the site in one Cookie header, '; ' between them
    (RFC 6265 section 5.4), and a balancer adds its own (an affinity cookie): the session
    is one of several, first, last or in the middle."""
    for header in (f"lb-affinity=A; {cookie}", f"{cookie}; theme=dark",
                   f"lb-affinity=B; {cookie}; theme=dark"):
        for _ in range(2):   # once on each instance
            reply = lb.request("GET", "/me", cookie=header)
            assert reply.status == 200 and reply.json().get("user") == USER, (
                f"GET /me on instance {reply.served_by} with the header 'Cookie: {header}' "
                f"answered {reply.status} {reply.body[:120]!r}, expected 200 with user "
                f"{USER!r}: the session cookie was not found among the others\nA Cookie "
                "header carries every cookie of the site, separated by '; ' (RFC 6265 "
                "section 5.4), and a load balancer adds its own affinity cookie: parse it "
                "(http.cookies.SimpleCookie) and take the one named session, wherever it is.")


def a_revoked_session_ends_everywhere(instances: list[Instance], redis_db: Any, cookie: str,
                                      keys: list[str]) -> None:
    """Both instances have just served the session; its keys are then deleted in Redis (a
    logout on any instance, an admin's revocation, or its TTL running out look the same):
    every instance must answer 401 from now on - one that still knows the user holds a
    copy of the session of its own."""
    client = redis_db.client(decode_responses=True)
    try:
        if keys:
            client.delete(*keys)
    finally:
        client.close()
    deadline = time.monotonic() + REVOKED_WITHIN
    stale: list[str] = []
    while True:
        stale = []
        for inst in instances:
            for path in ("/me", "/cart"):
                reply = RoundRobin.send(inst, "GET", path, cookie=cookie)
                if reply is not None and reply.status != 401:
                    stale.append(f"GET {path} on {inst.name}: {reply.status} "
                                 f"{reply.body[:80]!r}")
        if not stale or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if stale:
        where = sorted({line.split(" on ")[1].split(":")[0] for line in stale})
        pytest.fail(
            f"{'instances' if len(where) > 1 else 'instance'} {' and '.join(where)} kept a "
            "copy of a session in the process: "
            f"{REVOKED_WITHIN:.0f} s after the session's keys were deleted in Redis "
            f"({', '.join(keys)}: a logout, a revocation or its TTL running out) it still "
            f"served it ({'; '.join(stale)}), expected 401 on every instance\nA copy in the "
            "process (a dict, an lru_cache of the lookup) is state that never learns what "
            "changed in Redis: look the session up in Redis on every request.", pytrace=False)


def test_a_session_revoked_mid_request_is_never_half_served(learner: Any, redis_db: Any
                                                             ) -> None:
    """A logout on the other instance may land between two commands of one request. The
    instance's Redis connection goes through a gate; during GET /me, once the request has
    sent one command naming the session's keys, the test deletes them before the next such
    command goes on. A lookup in one command (HGET, HGETALL, GET) sees the session or does
    not: 200 with the user, or 401. One that checks (EXISTS) and then reads finds nothing on
    the second read and serves a session that is gone: 200 with user null."""
    keys: list[bytes] = []
    seen: list[list[bytes]] = []
    armed = threading.Event()
    admin = redis_db.client()

    def before(command: list[bytes]) -> None:
        if armed.is_set() and any(k in arg for k in keys for arg in command[1:]):
            seen.append(command)
            if len(seen) == 2:
                admin.delete(*keys)

    try:
        with redis_gate(redis_db.url, before) as gated, \
                running(learner, {"A": gated}) as (lb, _):
            with redis_commands(redis_db) as sent:
                cookie = login(lb, "dora")
            keys.extend(k.encode() for k in keys_written(sent))
            armed.set()
            reply = lb.request("GET", "/me", cookie=cookie)
            armed.clear()
    finally:
        admin.close()
    if reply.status == 401 or (reply.status == 200 and reply.json().get("user") == "dora"):
        return
    steps = ", ".join(" ".join(a.decode(errors="replace")[:40] for a in c[:2]) for c in seen)
    pytest.fail(
        f"GET /me answered {reply.status} {reply.body[:120]!r} for a session deleted in "
        f"the middle of the request (between {steps}), expected 401 or 200 with user "
        "'dora': the request checked the session, then read it again and served what was "
        "no longer there\nAnother instance may delete the session (a logout) between two "
        "of your commands: look it up in ONE command (HGET or HGETALL) and decide from "
        "what that returned - never check it exists and then read it, nor read it twice.",
        pytrace=False)


def test_without_a_known_session_401(cluster: Any, redis_db: Any) -> None:
    lb, _ = cluster
    for cookie in (None, "session=made-up-0123456789abcdef"):
        unknown_session_401(lb, redis_db, cookie)


def unknown_session_401(lb: RoundRobin, redis_db: Any, cookie: str | None) -> None:
    what = "no cookie" if cookie is None else f"the cookie {cookie!r} (never issued)"
    for method, path, doc in (("GET", "/me", None), ("POST", "/cart", {"item": "x"}),
                              ("GET", "/cart", None)):
        with redis_commands(redis_db) as sent:
            reply = lb.request(method, path, doc, cookie=cookie)
        writes = [c for c in sent if c[0] in CREATES]
        if reply.status != 401:
            pytest.fail(
                f"{method} {path} with {what} answered {reply.status} "
                f"{reply.body[:120]!r}, expected 401\nA session id Redis does not know is "
                "no session: when the lookup finds nothing, answer 401 before doing "
                "anything with it.", pytrace=False)
        if writes:
            pytest.fail(f"{method} {path} with {what} answered 401 but wrote to Redis first "
                        f"({writes[0]}): check the session before you change anything",
                        pytrace=False)


# What each request does while Redis is down, and what a 200 or a 401 for it would mean.
DURING_OUTAGE = (
    ("POST", "/counter", None, "counted in its own memory"),
    ("GET", "/counter", None, "answered a count kept in its own memory"),
    ("GET", "/me", None, "answered from a copy of the session kept in its own memory"),
    ("POST", "/cart", {"item": "pen"}, "stored the item in its own memory"),
    ("GET", "/cart", None, "answered from a copy of the cart kept in its own memory"),
    ("POST", "/login", {"user": "bob"}, "started a session in its own memory"),
)


def test_redis_down_is_an_error_never_state_of_the_instance(learner: Any,
                                                            redis_db: Any) -> None:
    """Redis goes away mid-run (its connections cut, new ones closed at once): every
    request is an error (503) until it is back. An instance that answers from its own
    memory meanwhile is stateful again - another instance answers otherwise, and what it
    kept is lost; a 401 logs out a user whose session is fine. Once Redis is back, the
    session, the cart and the counter are as they were."""
    where = urllib.parse.urlsplit(redis_db.url)
    with Outage((where.hostname or "127.0.0.1", where.port or 6379)) as outage, \
            running(learner, {"A": outage.url_for(redis_db.url)}) as (lb, _):
        cookie = login(lb, USER)
        added = lb.request("POST", "/cart", {"item": "book"}, cookie=cookie)
        assert added.status == 200, f"POST /cart answered {added.status}: {added.body[:200]!r}"
        counted = lb.request("POST", "/counter")
        assert counted.status == 200, f"POST /counter answered {counted.status}"
        before = counted.json().get("value")
        outage.go_down()
        for method, path, doc, kept in DURING_OUTAGE:
            reply = lb.request(method, path, doc, cookie=cookie)
            if reply.status == 401:
                pytest.fail(
                    f"{method} {path} answered 401 while Redis was unreachable: an error "
                    "reaching Redis is not a missing session - the user's session is fine "
                    "and comes back with Redis. Let the error answer 503 (Service "
                    "Unavailable), never 'not logged in'", pytrace=False)
            assert reply.status >= 500, (
                f"{method} {path} answered {reply.status} {reply.body[:120]!r} while Redis "
                f"was unreachable (its connections cut, new ones closed): the instance "
                f"{kept}. That is state of one instance again - another instance answers "
                "otherwise, and it is lost when this one dies or Redis comes back. Answer "
                "503 until Redis is back; never fall back to the process's memory")
        outage.come_back()
        wait_until(lambda: lb.request("GET", "/me", cookie=cookie).status == 200,
                   "GET /me to answer 200 again once Redis was back")
        cart = cart_items(lb.request("GET", "/cart", cookie=cookie), "GET /cart")
        value = lb.request("GET", "/counter").json().get("value")
    assert (cart, value) == (["book"], before), (
        f"once Redis was back, the cart held {cart} and the counter said {value!r}; "
        f"expected ['book'] and {before!r}, as they were before the outage: nothing done "
        "while Redis was down may count")


# commands that increment a number in Redis and answer the new value
INCREMENTS = {"INCR", "INCRBY", "INCRBYFLOAT", "HINCRBY", "HINCRBYFLOAT", "ZINCRBY"}


def test_each_increment_answers_its_own_value(learner: Any, redis_db: Any) -> None:
    """Two POST /counter at once, interleaved at the worst step: instance A talks to Redis
    through a gate that holds whatever A sends after its increment until B's whole POST
    /counter has answered. The value INCR itself answers is A's, whatever B does next; a
    value read again afterwards (INCR, then GET: two commands, two round trips or one
    pipeline) is the counter after B's increment too, and both hand out the same number.
    An increment in MULTI/EXEC or a Lua script is one step: held or not, the two differ."""
    held: list[list[bytes]] = []
    incremented = threading.Event()
    release = threading.Event()

    def before(command: list[bytes]) -> None:
        if incremented.is_set() and not held:
            held.append(command)
            release.wait(30)
        elif command[0].decode(errors="replace").upper() in INCREMENTS:
            incremented.set()

    values: dict[str, Any] = {}

    def post(inst: Instance) -> None:
        reply = RoundRobin.send(inst, "POST", "/counter")
        assert reply is not None and reply.status == 200, (
            f"POST /counter on {inst.name} answered {reply and reply.status}, expected 200")
        doc = reply.json()
        values[inst.name] = doc.get("value") if isinstance(doc, dict) else doc

    with redis_gate(redis_db.url, before) as gated, \
            running(learner, {"A": gated, "B": redis_db.url}) as (_, (a, b)):
        first = threading.Thread(target=post, args=(a,), daemon=True)
        try:
            first.start()
            wait_until(lambda: bool(held) or not first.is_alive(),
                       "instance A's POST /counter to increment the counter", timeout=30)
            post(b)                      # B's whole increment, while A waits after its own
        finally:
            release.set()
        first.join(30)
    for name in ("A", "B"):
        assert name in values, f"POST /counter on instance {name} did not answer"
        check_type(f"POST /counter on {name} answered {{'value': ...}}", values[name], int,
                   numeric(values[name]))
    if held and values["A"] == values["B"]:
        pytest.fail(
            f"two POST /counter at once both answered {values['A']}: instance A read the "
            f"counter again after its increment ({held[0][0].decode(errors='replace')} "
            f"after INCR), expected the value its own INCR answered\nThe test held A's "
            "command after its increment until B's POST /counter had answered: B's increment "
            "ran in between, so a read after the increment sees both. INCR answers the "
            "counter after this increment, atomically: hand out that value.", pytrace=False)
    assert sorted(values.values()) == [1, 2], (
        f"two POST /counter on a fresh counter answered {values}, expected 1 and 2"
        + ("" if incremented.is_set() else ": instance A sent Redis no increment (INCR) - "
           "a count kept in the process is one per instance"))


def test_a_shared_counter_is_exact(cluster: Any, redis_db: Any) -> None:
    lb, _ = cluster
    values: list[Any] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(25):
            reply = lb.request("POST", "/counter")
            if reply.status != 200:
                errors.append(f"{reply.status} {reply.body[:100]!r}")
                return
            answer = reply.json()
            with lock:
                values.append(answer.get("value") if isinstance(answer, dict) else answer)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    with redis_commands(redis_db) as sent:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, f"POST /counter failed: {errors[0]}"
    for value in values:
        check_type("POST /counter answered {'value': ...}", value, int, numeric(value))
    names = [c[0] for c in sent]
    rewritten = [c for c in sent if c[0] in OVERWRITES]
    if rewritten and "WATCH" not in names:
        pytest.fail(
            f"POST /counter reads the counter and writes it back ({rewritten[0][0]} "
            f"{' '.join(rewritten[0][1:3])} after a read, no WATCH), expected one atomic "
            "increment\nTwo instances that both read 7 both write 8: one increment is lost "
            "whenever two requests interleave, however rarely a test run shows it. Use INCR "
            "(atomic in Redis), not GET then SET.", pytrace=False)
    finals = {}
    for _ in range(2):                              # GET /counter on both instances
        got = lb.request("GET", "/counter")
        finals[got.served_by] = got.json().get("value")
        check_type(f"after 200 increments GET /counter on instance {got.served_by} answered "
                   "{'value': ...}", finals[got.served_by], int, 200)
    if len(set(finals.values())) > 1:
        pytest.fail(
            f"after 200 increments GET /counter answered {finals} on the two instances, "
            "expected 200 on both\nAn instance that answers reads from what it remembers "
            "(the last value it handed out) does not see the other's increments: read the "
            "counter from Redis.", pytrace=False)
    final = next(iter(finals.values()))
    dupes = len(values) - len(set(values))
    assert sorted(values) == list(range(1, 201)) and final == 200, (
        f"200 increments through two instances handed out {len(set(values))} distinct "
        f"values ({dupes} repeated), highest {max(values, default=0)}, and GET /counter "
        f"says {final}; expected exactly 1..200\nEach instance counting in its own memory "
        "hands out the same numbers twice; read-then-write in Redis (GET, then SET) loses "
        "increments that interleave. Use one atomic command: INCR.")


def test_killing_an_instance_loses_nothing(cluster: Any, redis_db: Any) -> None:
    lb, instances = cluster
    cookie = login(lb, "bob")
    served = set()
    by: list[str] = []
    want = [f"item-{i % 7}" for i in range(20)]    # items repeat: a cart is a list
    for i in range(20):
        if i == 10:
            victim = instances[1]
            victim.proc.send_signal(signal.SIGKILL)   # no goodbye, no flush
            victim.proc.wait()
        watch = redis_commands(redis_db) if i == 0 else contextlib.nullcontext([])
        with watch as sent:
            reply = lb.request("POST", "/cart", {"item": want[i]}, cookie=cookie)
        if i == 0 and reply.status == 200:
            if not any(want[0] in arg for c in sent for arg in c[1:]):
                pytest.fail(
                    f"POST /cart {{'item': {want[0]!r}}} answered 200 but no command sent to "
                    f"Redis carried the item (commands: {[c[0] for c in sent][:8]}), expected "
                    "the cart in Redis\nA cart kept in the process or in a file on this "
                    "machine is state an instance on another machine never sees: RPUSH it "
                    "onto a list in Redis.", pytrace=False)
            check_expiry(redis_db, "POST /cart", sent,
                         "A cart outlives the session it belongs to and is never read again: "
                         "it stays in Redis forever.")
        served.add(reply.served_by)
        by.append(reply.served_by)
        assert reply.status == 200, (
            f"adding item {i} on instance {reply.served_by}"
            f"{' after B was killed' if i >= 10 else ''} answered {reply.status} "
            f"{reply.body[:120]!r}\nThe session must be readable by every instance.")
    assert served == {"A", "B"}, f"test setup: only {served} served requests"
    reply = lb.request("GET", "/cart", cookie=cookie)
    items = cart_items(reply, "after 20 adds and the kill of B")
    if items != want:
        why = ""
        if sorted(items) == sorted(want):
            why = ("the same items in another order: a set or a sorted structure does not "
                   "keep the order they were added in (LPUSH reverses it)")
        elif set(items) == set(want) and len(items) == len(set(items)):
            why = (f"{len(items)} items, each once: repeated items were collapsed - a set or "
                   "a hash keeps one of each")
        elif items and items == want[:len(items)] and (len(items) > 10 or "B" not in by[
                len(items):10]):
            why = (f"the first {len(items)} only: read the whole list (LRANGE key 0 -1), "
                   "not a page of it")
        if why:
            pytest.fail(f"the cart holds {items!r}, expected {want!r} ({why})\nA cart is a "
                        "list: RPUSH each item, LRANGE 0 -1 to read them in order.",
                        pytrace=False)
    assert items == want, (
        f"after instance B was killed with SIGKILL halfway, the cart read on "
        f"{reply.served_by} holds {items!r}, expected all 20 items in order ({want!r})\n"
        "Items that instance B kept in its memory died with it. Keep the cart in Redis "
        "(RPUSH onto a list per session): a killed instance then takes nothing with it.")


def test_concurrent_adds_to_one_cart_keep_both(learner: Any, redis_db: Any) -> None:
    """Two adds to one cart at once, interleaved step by step. Both instances talk to Redis
    through a gate that holds the command carrying A's item (after whatever A read before
    it) until B's add has answered; then lets it go. An atomic append (RPUSH) keeps both; a
    cart read, extended in Python and written back whole (GET, SET) writes A's stale copy
    over B's add - every run, not once in a while. An add that serializes behind a lock
    never sends its item while A holds the lock: A is let go on then, and B follows."""
    mine, theirs = "race-item-from-A", "race-item-from-B"
    held: list[list[bytes]] = []
    sent_theirs = threading.Event()
    release = threading.Event()

    def before(command: list[bytes]) -> None:
        if any(theirs.encode() in arg for arg in command[1:]):
            sent_theirs.set()
        elif not held and any(mine.encode() in arg for arg in command[1:]):
            held.append(command)
            release.wait(60)

    added: dict[str, Reply | None] = {}

    def add(inst: Instance, item: str) -> None:
        added[item] = RoundRobin.send(inst, "POST", "/cart", {"item": item}, cookie)

    with redis_gate(redis_db.url, before) as gated, \
            running(learner, {"A": gated, "B": gated}) as (lb, (a, b)):
        try:
            cookie = login(lb, "carol")
            add(b, "item-first")
            first = added["item-first"]
            assert first is not None and first.status == 200, (
                f"POST /cart on B answered {first and first.status}, expected 200")
            adds = [threading.Thread(target=add, args=(a, mine), daemon=True),
                    threading.Thread(target=add, args=(b, theirs), daemon=True)]
            adds[0].start()
            wait_until(lambda: bool(held) or not adds[0].is_alive(),
                       "instance A's POST /cart to send its item to Redis", timeout=30)
            adds[1].start()              # B's whole add, while A's write waits
            began = time.monotonic()
            wait_until(lambda: not adds[1].is_alive() or (
                not sent_theirs.is_set() and time.monotonic() - began > ALONE),
                "instance B's POST /cart to answer (it sent its item to Redis)", timeout=30)
        finally:
            release.set()
        for t in adds:
            t.join(30)
        for item in (mine, theirs):
            got = added.get(item)
            assert got is not None and got.status == 200, (
                f"POST /cart {{'item': {item!r}}} answered "
                f"{got and f'{got.status} {got.body[:120]!r}'}, expected 200")
        cart = RoundRobin.send(b, "GET", "/cart", cookie=cookie)
        assert cart is not None, "instance B refused GET /cart"
        items = cart_items(cart, "after two adds at once")
    lost = [item for item in ("item-first", theirs, mine) if item not in items]
    if lost and held:
        name, key = (held[0][0].decode(errors="replace").upper(),
                     held[0][1][:60].decode(errors="replace"))
        pytest.fail(
            f"two adds to one cart at once kept {items!r}, lost {', '.join(map(repr, lost))}: "
            "a read-modify-write of the whole cart loses concurrent updates - use an atomic "
            f"Redis operation\nThe test held instance A's {name} {key} (the command carrying "
            f"A's item) until instance B had added {theirs!r}; then A wrote back the cart as "
            "it had read it before, plus its own item. Two instances (or two threads) adding "
            "to one cart interleave like this whenever a user double-clicks. RPUSH appends to "
            "a list in one step in Redis; a cart that must stay one value needs WATCH/MULTI "
            "(retried when EXEC fails) or a Lua script.", pytrace=False)
    assert not lost, (
        f"two adds to one cart at once kept {items!r}, lost {', '.join(map(repr, lost))}, "
        "expected every item: each add must reach the one cart in Redis")


# Items are any text: each must come back exactly as sent, one item each. A cart joined
# into one string with a separator (APPEND "item,", then split), trimmed, or re-encoded is
# a lossy copy of the list.
AWKWARD_ITEMS = ["socks, red", "a,b,c", "two\nlines", "pipe | bar; semi", "  padded  ",
                 "tab\tend", 'quote " and \\ backslash', "naïve €", "[\"json\", 1]",
                 "socks, red"]


def test_cart_items_come_back_as_sent(cluster: Any) -> None:
    lb, _ = cluster
    cookie = login(lb, "carol")
    for item in AWKWARD_ITEMS:
        reply = lb.request("POST", "/cart", {"item": item}, cookie=cookie)
        assert reply.status == 200, (
            f"POST /cart {{'item': {item!r}}} on {reply.served_by} answered {reply.status} "
            f"{reply.body[:120]!r}, expected 200: an item is any text")
    for _ in range(2):   # once on each instance
        reply = lb.request("GET", "/cart", cookie=cookie)
        items = cart_items(reply, f"after {len(AWKWARD_ITEMS)} adds of items with commas, "
                           "newlines, spaces")
        lost = [item for item in AWKWARD_ITEMS if item not in items]
        assert items == AWKWARD_ITEMS, (
            f"GET /cart on {reply.served_by} answered {items!r}, expected the "
            f"{len(AWKWARD_ITEMS)} items exactly as sent {AWKWARD_ITEMS!r}"
            f"{f' ({lost[0]!r} did not come back whole)' if lost else ''}: the cart "
            "in Redis is a lossy copy of the list\nA cart joined into one string with a "
            "separator (APPEND 'item,' then split(',')) splits an item that holds the "
            "separator; trimming or re-encoding changes it. Keep one Redis list element per "
            "item: RPUSH, then LRANGE 0 -1.")


# An instance can die between any two of its commands (a deploy's SIGKILL, the OOM killer).
# A key written by one command and given its expiry by the next is, in that window, a key
# that lives for ever: a session nobody can end by waiting, a cart that is never cleaned.
SETUP = {"CLIENT", "SELECT", "AUTH", "HELLO", "PING", "READONLY", "COMMAND", "INFO"}
WRITES = CREATES | {"HMSET", "HSETNX", "SETNX", "RPUSHX", "LPUSHX", "MSET", "SETEX",
                    "PSETEX", "SETRANGE", "LSET", "LINSERT"}
MAX_CUTS = 3   # a request writing more keys than this is cut after its first three writes


def cut_after_write(learner: Any, redis_db: Any, nth: int, path: str, doc: Any,
                    first_login: bool, own: int) -> tuple[list[list[bytes]], bool]:
    """One instance, its Redis connection through a gate; ``path`` requested, and the
    instance SIGKILLed, with its connection cut, at the command that follows the ``nth``
    command of the request that writes a key (whatever it sent is all Redis got). Returns
    the request's commands up to the cut and whether the cut came (False: the request
    wrote fewer keys and completed). Waits until Redis has read all it was sent: until no
    connection on the test's database is left but the test's own (client id ``own``, and
    the one asking)."""
    seen: list[list[bytes]] = []
    armed, cut = threading.Event(), threading.Event()
    instance: list[Instance] = []

    def before(command: list[bytes]) -> None:
        if not armed.is_set() or command[0].upper().decode() in SETUP:
            return
        writes = sum(c[0].upper().decode() in WRITES for c in seen)
        if writes >= nth and seen and seen[-1][0].upper().decode() in WRITES:
            cut.set()
            instance[0].proc.kill()     # reaped by the test's thread: one waitpid at a time
            raise ConnectionAbortedError("the instance died before this command")
        seen.append(command)

    with redis_gate(redis_db.url, before) as gated, \
            running(learner, {"A": gated}) as (lb, (a,)):
        instance.append(a)
        cookie = login(lb, "dora") if first_login else None
        armed.set()
        with contextlib.suppress(OSError, http.client.HTTPException):
            RoundRobin.send(a, "POST", path, doc, cookie)
        if cut.is_set():
            a.proc.wait()
    admin = (getattr(redis_db, "admin_client", None) or redis_db.client)()
    try:
        ours = {own, admin.client_id()}
        wait_until(lambda: not any(int(c.get("db", -1)) == redis_db.db
                                   and int(c["id"]) not in ours for c in admin.client_list()),
                   "Redis to close the killed instance's connections", timeout=15)
    finally:
        admin.close()
    return seen, cut.is_set()


def no_key_lives_for_ever(learner: Any, redis_db: Any, what: str, path: str, doc: Any,
                          first_login: bool) -> None:
    client = redis_db.client(decode_responses=True)
    try:
        for nth in range(1, MAX_CUTS + 1):
            client.flushdb()
            seen, died = cut_after_write(learner, redis_db, nth, path, doc, first_login,
                                         client.client_id())
            if not died:
                return
            forever = [k for k in client.scan_iter() if client.ttl(k) == -1]
            if forever:
                sent = " ".join(c[0].decode(errors="replace").upper() for c in seen)
                pytest.fail(
                    f"instance A was killed (SIGKILL) during {what}, after it had sent "
                    f"{sent} and before its next command: Redis now holds {forever[0]!r} "
                    "with no expiry (TTL -1), a key that lives for ever\nAn instance dies "
                    "between any two of its commands (a deploy, the OOM killer); a key "
                    "written by one command and given its TTL by the next is, in between, "
                    "a key that nothing but a DEL will ever end. Write a key and its expiry in one "
                    "step: SET key value EX seconds, or the write and its EXPIRE inside "
                    "MULTI/EXEC (redis-py: pipeline(transaction=True)), or a Lua script. A "
                    "pipeline without MULTI is not one step: its commands reach Redis one "
                    "by one.", pytrace=False)
    finally:
        client.flushdb()
        client.close()


def test_a_login_killed_midway_leaves_no_session_for_ever(learner: Any, redis_db: Any
                                                          ) -> None:
    no_key_lives_for_ever(learner, redis_db, "POST /login", "/login", {"user": USER},
                          first_login=False)


def test_a_cart_add_killed_midway_leaves_no_cart_for_ever(learner: Any, redis_db: Any
                                                          ) -> None:
    no_key_lives_for_ever(learner, redis_db, "its first POST /cart", "/cart",
                          {"item": "first-item"}, first_login=True)
