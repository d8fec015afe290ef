"""ph2.8 verification: five structures on a real Redis, and what each call costs.

"No KEYS or full scans" is checked on the commands the learner's code really sent. INFO
commandstats counts commands server-wide, for every test running on the shared server at
the same time, and CONFIG RESETSTAT would reset it for all of them; so instead a MONITOR
connection records the commands executed in this test's own logical database (each MONITOR
line names the database), between the start of a call and a marker the test sends after it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

import pytest

from labrunner.testing import CONNECTION_SETUP, assert_decoded, redis_commands, redis_gate

KEYSPACE_WALKS = {"KEYS", "SCAN"}
ZRANGE_FAMILY = {"ZRANGE", "ZREVRANGE", "ZRANGEBYSCORE", "ZREVRANGEBYSCORE", "ZRANGESTORE"}


def recorded(redis_db: Any, label: str,
             action: Callable[[], Any]) -> tuple[Any, list[list[str]]]:
    """Run one learner call, return its result and the commands it sent; no call may walk
    the keyspace."""
    with redis_commands(redis_db) as sent:
        result = action()
    assert_no_keyspace_walk(sent, label)
    return result, sent


def names(sent: list[list[str]]) -> str:
    return ", ".join(sorted({c[0] for c in sent})) or "nothing"


def assert_no_keyspace_walk(sent: list[list[str]], label: str) -> None:
    walks = [" ".join(c) for c in sent if c[0] in KEYSPACE_WALKS]
    assert not walks, (
        f"{label} sent {walks[0]!r}: KEYS and SCAN walk the whole keyspace, O(N) in every "
        "key of the database; keep the key names you need and address them directly")


def structure(module: ModuleType, name: str, *args: Any) -> Any:
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        pytest.fail(f"structures.py: define a class {name} (see the README)", pytrace=False)
    return cls(*args)


def key_types(redis_db: Any) -> dict[str, str]:
    client = redis_db.client(decode_responses=True)
    try:
        return {k: client.type(k) for k in client.scan_iter(count=1000)}  # the test may scan
    finally:
        client.close()


# --------------------------------------------------------------------------------------


def test_leaderboard_is_a_sorted_set_read_by_rank(learner: Any, redis_db: Any) -> None:
    board = structure(learner.load("structures"), "Leaderboard", redis_db.url, "scores")
    rnd = random.Random(3)
    totals = dict(zip([f"player{i:03d}" for i in range(300)],
                      rnd.sample(range(10, 100_000), 300), strict=True))
    # points arrive in two parts for every player, in random order: the score is a sum
    parts = [(p, t // 3) for p, t in totals.items()] + [(p, t - t // 3) for p, t in totals.items()]
    rnd.shuffle(parts)
    recorded(redis_db, "add_points()", lambda: [board.add_points(p, pts) for p, pts in parts])

    ranking = sorted(totals.items(), key=lambda kv: -kv[1])
    top, sent = recorded(redis_db, "top(10)", lambda: board.top(10))
    assert_decoded("top(10)", top)
    want = [(p, float(s)) for p, s in ranking[:10]]
    assert [(p, float(s)) for p, s in top] == want, (
        f"top(10) returned {top[:3]}..., expected {want[:3]}...: points added twice for a "
        "player must add up (ZINCRBY), and top is highest first")
    wide = [" ".join(c) for c in sent if c[0] in ZRANGE_FAMILY and not bounded(c, 10)]
    assert not wide and not any(c[0] == "ZSCAN" for c in sent), (
        f"top(10) sent {(wide or ['ZSCAN'])[0]!r}: it read more of the sorted set than the "
        "10 entries it returns; ZREVRANGE key 0 9 WITHSCORES is O(log N + 10)")
    for n in (1, 0):  # the smallest boards asked for: n - 1 is 0, then -1
        few, sent = recorded(redis_db, f"top({n})", partial(board.top, n))
        assert [(p, float(s)) for p, s in few] == want[:n], (
            f"top({n}) returned {len(few)} entries ({few[:2]}...), expected {want[:n]}: "
            f"top({n}) sent {[' '.join(c) for c in sent if c[0] in ZRANGE_FAMILY][:1]} - in "
            "ZREVRANGE key 0 n-1 a negative stop counts from the end, so n = 0 gives "
            "ZREVRANGE key 0 -1: the whole board. Asked for no entries, return none")

    player, total = ranking[41]
    rank, sent = recorded(redis_db, "rank()", lambda: board.rank(player))
    assert rank == 42, f"rank({player!r}) returned {rank!r}, expected 42 (1 = best)"
    reads = [c[0] for c in sent if c[0] in ZRANGE_FAMILY | {"ZSCAN"}]
    assert not reads, (
        f"rank() sent {names(sent)}: finding a rank by reading the ranking is O(N); "
        "ZREVRANK answers in O(log N)")
    assert board.rank("nobody") is None, "rank('nobody') must be None for an unknown player"
    # The ends of the ranking: ZREVRANK answers 0 for the best player, a falsy number a
    # truth test mistakes for "no rank".
    best, worst = ranking[0][0], ranking[-1][0]
    for who, want_rank in ((best, 1), (worst, len(ranking))):
        got_rank = board.rank(who)
        assert got_rank is not None or want_rank != 1, (
            f"rank({who!r}) of the best player returned None, expected 1: ZREVRANK answers "
            f"0 for the best player, and 0 is falsy - test the reply with 'is None', not "
            f"with 'if position'")
        assert got_rank == want_rank, (
            f"rank({who!r}) returned {got_rank!r}, expected {want_rank} (1 = best, "
            f"{len(ranking)} players)")
    assert board.score(player) == float(total), f"score({player!r}) expected {total}"
    elsewhere_agrees(learner.load("structures"), redis_db, player, float(total), 42)
    assert board.score("nobody") is None, "score('nobody') must be None"
    board.add_points("newcomer", 0)  # on the board, with nothing scored yet
    zero = board.score("newcomer")
    assert zero == 0.0, (
        f"score('newcomer') after add_points('newcomer', 0) returned {zero!r}, expected 0.0: "
        f"the player is on the board with 0 points - ZSCORE answers '0', which is not "
        f"'unknown'; test the reply with 'is None', not its truth")
    fractions_add_up(board, "newcomer")
    assert key_types(redis_db).get("scores") == "zset", (
        "the leaderboard is not a sorted set under the key 'scores' (the name passed in)")


def elsewhere_agrees(module: ModuleType, redis_db: Any, player: str, total: float,
                     rank: int) -> None:
    """Another server of the same app: a Leaderboard of its own on the same key, that added
    nothing itself, answers from Redis what the first one answers."""
    other = structure(module, "Leaderboard", redis_db.url, "scores")
    seen = (other.score(player), other.rank(player))
    assert seen == (total, rank), (
        f"a second Leaderboard on the key 'scores' (another server of the same app, which "
        f"added no points itself) reports score({player!r}) {seen[0]!r} and rank {seen[1]!r}, "
        f"expected {total} and {rank}, as the one that added the points does: the board lives "
        "in Redis - a score or a count kept in the Python object (a dict filled by "
        "add_points) is seen by that object only, and is stale once another server adds "
        "points. Ask Redis (ZSCORE, ZREVRANK) every time")


def fractions_add_up(board: Any, player: str) -> None:
    """A score is a double: points of 2.5 add up to 2.5 more, in the total and the score."""
    part = board.add_points(player, 2.5)
    assert part == 2.5 and board.score(player) == 2.5, (
        f"add_points({player!r}, 2.5) on 0 points returned {part!r} and score({player!r}) "
        f"is {board.score(player)!r}, expected 2.5 both: a sorted set's score is a double "
        f"(ZINCRBY scores 2.5 {player}) - int() or round() on the points or on the score "
        f"drops the fraction")


def test_points_added_at_the_same_time_are_never_lost(learner: Any, redis_db: Any) -> None:
    """Two servers add points to one player at once. Between add_points()'s commands (before
    its 2nd, then its 3rd ... in successive calls) another server adds 5 points with
    ZINCRBY: the total must hold both. A read of the score, a sum in the client and a write
    of it back (ZSCORE then ZADD, even inside MULTI) overwrites the other server's points."""
    module = learner.load("structures")
    live = redis_db.client(decode_responses=True)  # the other server
    try:
        race_add_points(module, redis_db, live)
    finally:
        live.close()


def race_add_points(module: ModuleType, redis_db: Any, live: Any) -> None:
    for at in range(2, 7):
        player = f"racer{at}"
        board = structure(module, "Leaderboard", redis_db.url, "race")
        board.add_points(player, 100)
        sent: list[str] = []
        injected: list[str] = []

        def before(command: list[bytes], at: int = at, player: str = player,
                   sent: list[str] = sent, injected: list[str] = injected) -> None:
            name = command[0].decode(errors="replace").upper()
            if name in CONNECTION_SETUP:
                return
            sent.append(name)
            if len(sent) == at and not injected:  # just before add_points()'s at-th command
                live.zincrby("race", 5, player)
                injected.append(f"before its {name} (command {at})")

        with redis_gate(redis_db.url, before) as gated:
            racing = structure(module, "Leaderboard", gated, "race")
            racing.add_points(player, 10)
        if not injected:
            break  # add_points() sent fewer commands than `at`: nothing left to race
        total = live.zscore("race", player)
        assert total == 115.0, (
            f"{player} had 100 points; add_points({player!r}, 10) sent {sent}, and "
            f"{injected[0]} another server added 5 points with ZINCRBY. The total is "
            f"{total}, expected 115: reading the score, adding in the client and writing the "
            "sum back (ZSCORE then ZADD, MULTI or not) overwrites the points another server "
            "added in between - a lost update. ZINCRBY adds on the server, atomically")


def bounded(command: list[str], limit: int) -> bool:
    """A ZRANGE-family command that returns at most `limit` entries by index: from the start
    (ZREVRANGE key 0 9) or from the end (ZRANGE key -10 -1, the ten highest, reversed in the
    client: the same entries, as cheaply). Mixed signs (0 -1: everything) are not bounded."""
    args = [a.upper() for a in command[1:]]
    if command[0] in ("ZRANGE", "ZREVRANGE") and "BYSCORE" not in args and "BYLEX" not in args:
        try:
            start, stop = int(command[2]), int(command[3])
        except (IndexError, ValueError):
            return False
        if start < 0 and stop < 0:  # counted from the end: ZRANGE key -10 -1, reversed
            return start <= stop and stop - start + 1 <= limit
        return 0 <= start <= stop and stop - start + 1 <= limit
    if "LIMIT" in args:  # ... BYSCORE ... LIMIT offset count
        at = args.index("LIMIT")
        try:
            return 0 <= int(args[at + 2]) <= limit
        except (IndexError, ValueError):
            return False
    return False


def test_reliable_queue_keeps_claimed_jobs_until_acked(learner: Any, redis_db: Any) -> None:
    module = learner.load("structures")
    queue = structure(module, "ReliableQueue", redis_db.url, "jobs")
    jobs = [f"job-{n}" for n in range(1, 6)]
    for job in jobs:
        queue.push(job)
    claimed, sent = recorded(redis_db, "claim()", lambda: [queue.claim() for _ in range(3)])
    assert_decoded("claim()", claimed)
    assert claimed == jobs[:3], (
        f"three claims returned {claimed}, expected {jobs[:3]}: a queue is first in, first out")
    queue.ack("job-1")

    # The worker dies holding job-2 and job-3: a new worker starts and recovers them.
    del queue
    queue = structure(module, "ReliableQueue", redis_db.url, "jobs")
    recovered = queue.recover()
    assert recovered == 2, (
        f"recover() found {recovered} unacknowledged jobs, expected 2 (job-2 and job-3 were "
        "claimed and never acked): they must still be in Redis, in a processing list")
    moves = [c[0] for c in sent if c[0] in ("LMOVE", "BLMOVE", "RPOPLPUSH", "BRPOPLPUSH")]
    assert len(moves) == 3, (
        f"claim() sent {names(sent)}: take the job with LMOVE queue processing, which moves it "
        "atomically, so a job is never outside Redis while a worker holds it")
    rest = [queue.claim() for _ in range(5)]
    assert rest == ["job-2", "job-3", "job-4", "job-5", None], (
        f"after recover(), claims returned {rest}, expected job-2, job-3 first (they were "
        "next in line), then job-4, job-5, then None for the empty queue")
    for job in rest[:4]:
        queue.ack(job)
    assert queue.recover() == 0, "after every job is acked, recover() must find nothing"
    assert queue.size() == 0, "size() must be 0 once every job is claimed"
    _, sent = recorded(redis_db, "size()", queue.size)
    assert not any(c[0] == "LRANGE" for c in sent), (
        "size() read the list's contents: LLEN is O(1)")


def test_recover_loses_no_job_a_live_worker_claims_meanwhile(learner: Any,
                                                             redis_db: Any) -> None:
    """recover() may run while other workers are alive and claiming. Right after its first
    command, a live worker claims a job (LMOVE into the processing list): whatever
    recover() does next, every job not acked must still be in the queue or the processing
    list - a read of the list, then a DEL of it, deletes the claim that came in between."""
    module = learner.load("structures")
    jobs = [f"job-{n}" for n in range(1, 6)]
    setup = structure(module, "ReliableQueue", redis_db.url, "work")
    for job in jobs:
        setup.push(job)
    dead = [setup.claim(), setup.claim()]          # a worker dies holding job-1 and job-2
    live = redis_db.client(decode_responses=True)  # a worker that is alive
    sent: list[str] = []
    claimed: list[str | None] = []

    def before(command: list[bytes]) -> None:
        name = command[0].decode(errors="replace").upper()
        if name in CONNECTION_SETUP:
            return
        sent.append(name)
        if len(sent) == 2 and not claimed:   # between recover()'s first and second command
            claimed.append(live.lmove("work", "work:processing", "RIGHT", "LEFT"))

    with redis_gate(redis_db.url, before) as gated:
        recovering = structure(module, "ReliableQueue", gated, "work")
        recovering.recover()
    held = live.lrange("work", 0, -1) + live.lrange("work:processing", 0, -1)
    lost = [job for job in jobs if job not in held]
    assert not lost, (
        f"recover() lost {lost}: the worker that died held {dead}; after recover()'s first "
        f"command ({sent[0] if sent else '-'}) a live worker claimed "
        f"{claimed[0] if claimed else '-'} "
        f"(LMOVE into the processing list), and recover() then sent {sent[1:]}. Afterwards "
        f"the queue and the processing list hold {sorted(held)}: reading the processing list "
        "and deleting it in a later step deletes every claim made in between. Move the jobs "
        "back one at a time with LMOVE processing queue, an atomic step that takes only what "
        "is there")


def test_ack_removes_one_claim_of_a_job_queued_twice(learner: Any, redis_db: Any) -> None:
    """The same job can be queued twice (a retry, a resend): acking one claim must leave the
    other claim in the processing list, where recover() finds it."""
    queue = structure(learner.load("structures"), "ReliableQueue", redis_db.url, "mail")
    queue.push("email:42")
    queue.push("email:42")
    claims = [queue.claim(), queue.claim()]
    assert_decoded("claim()", claims)
    assert claims == ["email:42", "email:42"], f"two claims returned {claims}"
    queue.ack("email:42")  # one worker finished; the other died holding its copy
    recovered = queue.recover()
    assert recovered == 1, (
        f"email:42 was queued and claimed twice and acked once; recover() then found "
        f"{recovered} unacknowledged claim(s), expected 1: ack must remove ONE copy from the "
        f"processing list (LREM processing 1 job) - LREM with count 0 removes every copy, "
        f"and a crashed worker's claim is lost")
    assert queue.claim() == "email:42", "the recovered copy of email:42 must be next in line"


def claims_until_empty(queue: Any, limit: int = 6) -> list[str | None]:
    taken: list[str | None] = []
    while len(taken) < limit:
        taken.append(queue.claim())
        if taken[-1] is None:
            break
    return taken


def test_two_queues_each_recover_only_their_own_jobs(learner: Any, redis_db: Any) -> None:
    """Two queues side by side, a worker of each dies holding a job: recover() on one queue
    brings back that queue's job only. A processing list shared by every queue (one fixed
    name instead of <name>:processing) hands the other queue's job to this one."""
    module = learner.load("structures")
    emails = structure(module, "ReliableQueue", redis_db.url, "emails")
    thumbs = structure(module, "ReliableQueue", redis_db.url, "thumbnails")
    for n in (1, 2):
        emails.push(f"email-{n}")
        thumbs.push(f"thumb-{n}")
    held = [emails.claim(), thumbs.claim()]  # both workers die holding these
    assert held == ["email-1", "thumb-1"], f"first claims of each queue returned {held}"
    for name, own in (("emails", "email"), ("thumbnails", "thumb")):
        recovering = structure(module, "ReliableQueue", redis_db.url, name)
        recovered = recovering.recover()
        taken = claims_until_empty(recovering)
        foreign = [job for job in taken if job is not None and not job.startswith(own)]
        assert not foreign, (
            f"recover() on queue {name!r} brought back {foreign}, claimed from the other "
            f"queue: its claims then gave {taken}, expected [{own}-1, {own}-2, None] - "
            "queues 'emails' and 'thumbnails' each had one job claimed and never acked, and "
            "a job must come back into the queue it was claimed from. Give each queue a "
            "processing list of its own (<name>:processing, as the README says); one list "
            "shared by every queue mixes their jobs at recovery")
        assert recovered == 1, (
            f"recover() on queue {name!r} returned {recovered}, expected 1: of this queue "
            f"one job ({own}-1) was claimed and never acked")
        assert taken == [f"{own}-1", f"{own}-2", None], (
            f"after recover() on queue {name!r}, claims returned {taken}, expected "
            f"[{own}-1, {own}-2, None]: the recovered job is next in line")


def test_unique_visitors_exact_set_and_hyperloglog(learner: Any, redis_db: Any) -> None:
    visitors = structure(learner.load("structures"), "UniqueVisitors", redis_db.url, "visitors")
    rnd = random.Random(8)
    days = {"2024-05-01": 700, "2024-05-02": 400, "2024-05-03": 250}
    seen: dict[str, set[str]] = {}
    visits = []
    for day, distinct in days.items():
        people = [f"v{rnd.randint(0, 1500)}" for _ in range(distinct * 2)]
        seen[day] = set(people)
        visits += [(day, who) for who in people]
    recorded(redis_db, "visit()", lambda: [visitors.visit(d, v) for d, v in visits])

    day = "2024-05-01"
    exact, sent = recorded(redis_db, "exact()", lambda: visitors.exact(day))
    assert exact == len(seen[day]), f"exact({day!r}) returned {exact}, expected {len(seen[day])}"
    full = [c[0] for c in sent if c[0] in ("SMEMBERS", "SSCAN", "SUNION", "SINTER")]
    assert not full, (
        f"exact() sent {names(sent)}: counting a set by reading its members is O(N); "
        "SCARD is O(1)")

    estimate = visitors.estimate(day)
    assert abs(estimate - len(seen[day])) <= 0.02 * len(seen[day]), (
        f"estimate({day!r}) returned {estimate}, expected about {len(seen[day])} (within 2%; "
        "a HyperLogLog's standard error is 0.81%)")
    union = set().union(*seen.values())
    across, sent = recorded(redis_db, "estimate_across()",
                           lambda: visitors.estimate_across(list(days)))
    assert abs(across - len(union)) <= 0.02 * len(union), (
        f"estimate_across(3 days) returned {across}, expected about {len(union)} distinct "
        "visitors (someone seen on two days counts once)")
    full = [c[0] for c in sent if c[0] in ("SMEMBERS", "SSCAN", "SUNION", "SUNIONSTORE", "SCARD")]
    assert not full and any(c[0] in ("PFCOUNT", "PFMERGE") for c in sent), (
        f"estimate_across() sent {names(sent)}: merge the days' HyperLogLogs (PFCOUNT k1 k2 "
        "k3), which never holds the visitors themselves")
    # Merging must leave every day as it was, and remember nothing for the next question:
    # each day alone, then other sets of days, asked after the 3-day merge.
    for asked in ([day] for day in days):
        alone = asked[0]
        got_exact, got_estimate = visitors.exact(alone), visitors.estimate(alone)
        want = len(seen[alone])
        assert got_exact == want and abs(got_estimate - want) <= 0.02 * want, (
            f"after estimate_across(3 days), exact({alone!r}) is {got_exact} and "
            f"estimate({alone!r}) {got_estimate}, expected {want} (and about {want}): merging "
            "the days changed one of them - PFMERGE writes into its first key, so never "
            "merge into a day's own HyperLogLog (PFCOUNT k1 k2 k3 merges without writing)")
    for asked in (list(days)[1:], list(days)[:1], list(days)[::2]):
        want = len(set().union(*(seen[d] for d in asked)))
        got = visitors.estimate_across(asked)
        assert abs(got - want) <= 0.02 * want, (
            f"estimate_across({asked}) after estimate_across({list(days)}) returned {got}, "
            f"expected about {want}: the answer holds visitors of days not asked for - a "
            "merge into a key kept from an earlier call (PFMERGE adds to what the destination "
            "holds). PFCOUNT k1 k2 merges on the fly and keeps nothing")

    try:
        nobody = visitors.estimate_across([])
    except Exception as exc:  # noqa: BLE001 - the learner's error, named in the message
        pytest.fail(f"estimate_across([]) raised {type(exc).__name__}: {exc} - a report over "
                    "a date range with no days in it asks for no days: PFCOUNT needs at "
                    "least one key, so for no days send nothing and return 0", pytrace=False)
    assert nobody == 0, f"estimate_across([]) returned {nobody!r}, expected 0: no days, no visitors"
    counters_apart(learner.load("structures"), redis_db, visitors, day, len(seen[day]))

    client = redis_db.client()
    try:
        hlls = [k for k, t in key_types(redis_db).items()
                if t == "string" and (client.getrange(k, 0, 3) == b"HYLL")]
        sizes = {k: int(client.memory_usage(k) or 0) for k in hlls}
    finally:
        client.close()
    assert len(hlls) >= len(days), (
        f"found {len(hlls)} HyperLogLog keys, expected one per day (PFADD visitors:<day>:hll)")
    assert max(sizes.values()) <= 16 * 1024, (
        f"a HyperLogLog uses {max(sizes.values())} bytes: it should stay under 12 KB "
        "whatever the number of visitors")


def counters_apart(module: ModuleType, redis_db: Any, visitors: Any, day: str,
                   want: int) -> None:
    """A second counter of the same name (another server of the site) reads the counts the
    first one recorded; then a counter of another name (another site) counts the same day:
    each keeps its own visitors."""
    again = structure(module, "UniqueVisitors", redis_db.url, "visitors")
    counted = (again.exact(day), again.estimate(day))
    assert counted[0] == want and abs(counted[1] - want) <= 0.02 * want, (
        f"a second UniqueVisitors named 'visitors' (another server of the same site, which "
        f"recorded no visit itself) reports exact({day!r}) {counted[0]} and estimate "
        f"{counted[1]}, expected {want} (and about {want}), as the one that recorded the "
        "visits does: the counts live in Redis - a count kept in the Python object (a dict "
        "bumped when SADD says the visitor is new) is seen by that object only. Ask the set "
        "(SCARD) and the HyperLogLog (PFCOUNT) every time")
    shop = structure(module, "UniqueVisitors", redis_db.url, "shop")
    for n in range(30):
        shop.visit(day, f"shopper{n}")
    mine = (visitors.exact(day), visitors.estimate(day))
    theirs = (shop.exact(day), shop.estimate(day))
    assert (mine[0] == want and abs(mine[1] - want) <= 0.02 * want
            and theirs[0] == 30 and abs(theirs[1] - 30) <= 1), (
        f"two UniqueVisitors named 'visitors' and 'shop' count the same day {day!r}: after "
        f"30 visits to 'shop', 'visitors' reports exact {mine[0]}, estimate {mine[1]} (expected "
        f"{want}) and 'shop' exact {theirs[0]}, estimate {theirs[1]} (expected 30) - the two "
        "share a key: build every key from the name passed in (<name>:<day>:set, "
        "<name>:<day>:hll), so counters of different names never mix")


def test_object_is_a_hash_updated_field_by_field(learner: Any, redis_db: Any) -> None:
    profiles = structure(learner.load("structures"), "Profiles", redis_db.url)
    profiles.save("7", {"name": "Ada", "city": "London", "logins": "0"})
    _, sent = recorded(redis_db, "set_field()",
                       lambda: profiles.set_field("7", "city", "Lisbon"))
    writes = [c for c in sent if c[0] in ("HSET", "HMSET", "HSETNX")]
    assert len(writes) == 1 and len(writes[0]) == 4 and len(sent) == 1, (
        f"set_field() sent {names(sent)} ({len(sent)} commands): one HSET key field value "
        "updates a field in O(1), without reading or rewriting the rest of the object")
    increments, sent = recorded(redis_db, "increment()",
                               lambda: [profiles.increment("7", "logins") for _ in range(5)])
    assert increments == [1, 2, 3, 4, 5], f"increment() returned {increments}, expected 1..5"
    assert all(c[0] == "HINCRBY" for c in sent), (
        f"increment() sent {names(sent)}: read-then-write loses updates from concurrent "
        "clients; HINCRBY increments atomically on the server")
    got, _ = recorded(redis_db, "get()", lambda: profiles.get("7"))
    assert got == {"name": "Ada", "city": "Lisbon", "logins": "5"}, f"get('7') returned {got}"
    assert profiles.get("404") == {}, "get() of an unknown user must return {}"
    try:
        profiles.save("8", {})  # a sign-up form left empty
    except Exception as exc:  # noqa: BLE001 - the learner's error, named in the message
        pytest.fail(f"save('8', {{}}) raised {type(exc).__name__}: {exc} - a profile saved "
                    "with no fields (a form left empty) changes nothing: HSET needs at least "
                    "one field, so for none send nothing", pytrace=False)
    assert profiles.get("8") == {}, "save('8', {}) stored something: get('8') must be {}"
    types = key_types(redis_db)
    assert "hash" in types.values() and "string" not in types.values(), (
        f"the profile is stored as {sorted(set(types.values()))}: an object with fields "
        "belongs in a hash (HSET user:7 name Ada city London), not a serialized string")
