"""Verification for ph1.8 grpc-services.

The learner's user.proto is compiled here, at test time, with grpcio-tools into a temporary
folder (stubs are never committed). The learner's UserService runs in a real grpc server on
127.0.0.1:0 and is called through a real channel. Streams are driven in lock step with
queues and reader threads: the test sends one bidi request, waits for its answer, then
sends the next, so "answers as it reads" and "reads everything first" are told apart by
what happens, not by timing luck.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2

from labrunner.testing import (
    ProtoStubs,
    came_true,
    drain,
    generate_stubs,
    next_message,
    serve_grpc,
)

RPCS = {  # name -> (client streams, server streams)
    "GetUser": (False, False),
    "WatchUser": (False, True),
    "CreateUsers": (True, False),
    "UpdateUsers": (True, True),
}
ANSWER_WITHIN = 3.0  # seconds to wait for a message that should come at once
LINE_DELAY = 0.003  # s before each line of the learner's code in the race test
LATE_WATCHES = 6    # watches opened while updates stream, in the race test


# ---- a real grpc server whose worker threads never keep the test process alive ----------

@contextmanager
def running(stubs: ProtoStubs, service: Any, workers: int = 4,
            options: list[tuple[str, Any]] | None = None) -> Iterator[Any]:
    """The service in a grpc server on 127.0.0.1:<free port>; yield a stub on a channel."""
    with serve_grpc(service, "user_pb2_grpc", "UserService", workers) as port:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options or [])
        try:
            yield stubs.grpc.UserServiceStub(channel)
        finally:
            channel.close()


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture
def stubs(learner: Any) -> Iterator[ProtoStubs]:
    generated = generate_stubs(Path(learner.path("user.proto")), prefix="ph1-8-stubs-")
    # The learner's module imports these stubs: where it runs in a process of its own
    # (grading), that process generates its own.
    learner.run_helper(generate_stubs, Path(learner.path("user.proto")))
    yield generated
    for name in ("user_pb2", "user_pb2_grpc"):
        sys.modules.pop(name, None)


@pytest.fixture
def service_class(learner: Any, stubs: ProtoStubs) -> Any:
    service = stubs.pb2.DESCRIPTOR.services_by_name.get("UserService")
    declared = service.methods_by_name if service is not None else {}
    missing = [name for name in RPCS if name not in declared]
    if missing:
        pytest.fail(f"user.proto: UserService has no rpc {', '.join(missing)} (see README.md)",
                    pytrace=False)
    return learner.function("user_service", "UserService")


def create(stub: Any, stubs: ProtoStubs, *names: str) -> list[str]:
    requests = [stubs.pb2.CreateUserRequest(username=n, email=f"{n}@example.com") for n in names]
    summary = stub.CreateUsers(iter(requests), timeout=5)
    assert summary.created == len(names) and len(summary.user_ids) == len(names), (
        f"CreateUsers with {len(names)} requests: expected created={len(names)} and "
        f"{len(names)} user_ids, saw created={summary.created}, user_ids={list(summary.user_ids)}")
    return list(summary.user_ids)


def updates_seen(out: queue.Queue[Any], count: int) -> list[str]:
    """The usernames of up to `count` updates a watch received; fewer if the stream went
    quiet or ended (a watch that missed an update is told apart from one that failed)."""
    seen: list[str] = []
    while len(seen) < count:
        try:
            item = out.get(timeout=ANSWER_WITHIN)
        except queue.Empty:
            break
        if item is None or isinstance(item, grpc.RpcError):
            what = "ended" if item is None else f"failed with {item.code().name}"
            pytest.fail(f"WatchUser: the stream {what} after {len(seen)} of {count} updates; "
                        "a watch stays open until the client cancels", pytrace=False)
        seen.append(item.username)
    return seen


def expect_status(call: Callable[[], Any], code: grpc.StatusCode, what: str,
                  meaning: str = "a missing resource is an error status, not an empty "
                  "message") -> grpc.RpcError:
    try:
        result = call()
    except grpc.RpcError as err:
        assert err.code() == code, (
            f"{what}: expected status {code.name}, saw {err.code().name} ({err.details()})")
        return err
    pytest.fail(f"{what}: expected status {code.name}, but the rpc succeeded with "
                f"{str(result)[:150]!r}: {meaning}", pytrace=False)


# ---- the verification -------------------------------------------------------------------

def test_proto_has_the_four_kinds_of_rpc(stubs: ProtoStubs) -> None:
    file = descriptor_pb2.FileDescriptorProto()
    stubs.pb2.DESCRIPTOR.CopyToProto(file)
    services = {s.name: s for s in file.service}
    assert "UserService" in services, f"user.proto: no service UserService, saw {list(services)}"
    methods = {m.name: m for m in services["UserService"].method}
    for name, (client, server) in RPCS.items():
        assert name in methods, f"user.proto: UserService has no rpc {name} (see README.md)"
        seen = (methods[name].client_streaming, methods[name].server_streaming)
        assert seen == (client, server), (
            f"user.proto: rpc {name} must be {'stream ' if client else ''}request -> "
            f"{'stream ' if server else ''}response, saw client_streaming={seen[0]}, "
            f"server_streaming={seen[1]}")


# The wire contract the README gives: field numbers are what goes on the wire, names are
# not. A client generated from the published contract decodes by number.
_T = descriptor_pb2.FieldDescriptorProto
MESSAGES = {  # message -> field name -> (number, type, repeated)
    "GetUserRequest": {"user_id": (1, _T.TYPE_STRING, False)},
    "UserResponse": {"user_id": (1, _T.TYPE_STRING, False), "username": (2, _T.TYPE_STRING, False),
                     "email": (3, _T.TYPE_STRING, False), "created_at": (4, _T.TYPE_INT64, False)},
    "CreateUserRequest": {"username": (1, _T.TYPE_STRING, False),
                          "email": (2, _T.TYPE_STRING, False)},
    "CreateUsersSummary": {"created": (1, _T.TYPE_INT32, False),
                           "user_ids": (2, _T.TYPE_STRING, True)},
    "UpdateUserRequest": {"user_id": (1, _T.TYPE_STRING, False),
                          "username": (2, _T.TYPE_STRING, False),
                          "email": (3, _T.TYPE_STRING, False)},
}


def test_messages_keep_the_contracts_field_numbers(stubs: ProtoStubs) -> None:
    file = descriptor_pb2.FileDescriptorProto()
    stubs.pb2.DESCRIPTOR.CopyToProto(file)
    messages = {m.name: m for m in file.message_type}
    problems: list[str] = []
    for name, fields in MESSAGES.items():
        if name not in messages:
            problems.append(f"message {name} is missing")
            continue
        seen = {f.name: f for f in messages[name].field}
        by_number = {f.number: f.name for f in messages[name].field}
        for field, (number, kind, repeated) in fields.items():
            got = seen.get(field)
            if got is None:
                problems.append(f"{name} has no field {field}")
            elif got.number != number:
                other = by_number.get(number)
                problems.append(f"{name}.{field} is field {got.number}, the contract says {number}"
                                + (f" (your {number} is {other})" if other else ""))
            elif got.type != kind or (got.label == _T.LABEL_REPEATED) != repeated:
                want = _T.Type.Name(kind).removeprefix("TYPE_").lower()
                problems.append(f"{name}.{field} must be {'repeated ' if repeated else ''}{want}")
    if problems:
        pytest.fail("user.proto does not keep the README's wire contract: " + "; ".join(problems)
                    + " - a client generated from the published contract decodes fields by "
                    "NUMBER, so a renumbered field reads one value as another (keep the numbers "
                    "of the README; never reuse or swap them)", pytrace=False)


def test_unary_and_client_streaming(stubs: ProtoStubs, service_class: Any) -> None:
    with running(stubs, service_class()) as stub:
        before = int(time.time())
        ids = create(stub, stubs, "ada", "alan", "grace")
        after = int(time.time()) + 1
        assert len(set(ids)) == 3, f"CreateUsers gave duplicate user_ids: {ids}"
        for user_id, name in zip(ids, ["ada", "alan", "grace"], strict=True):
            user = stub.GetUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=5)
            assert (user.user_id, user.username, user.email) == (
                user_id, name, f"{name}@example.com"), (
                f"GetUser({user_id!r}): expected the user created as {name!r} (user_ids follow "
                f"the order of the requests), saw {user}")
            assert before <= user.created_at <= after, (
                f"GetUser({user_id!r}): created_at must be the Unix time of creation "
                f"(~{before}), saw {user.created_at}")
        a_second_batch_takes_no_ones_id(stub, stubs, dict(zip(ids, ["ada", "alan", "grace"],
                                                              strict=True)))


def a_second_batch_takes_no_ones_id(stub: Any, stubs: ProtoStubs, first: dict[str, str]) -> None:
    """Another CreateUsers (a namesake of a user of the first batch in it: usernames need not
    be unique) gets new ids, and every user of the first batch is still there, unchanged."""
    names = ["ada", "edsger", "barbara"]
    ids = create(stub, stubs, *names)
    reused = [i for i in ids if i in first]
    replaced = [f"{i} ({name})" for i, name in first.items()
                if stub.GetUser(stubs.pb2.GetUserRequest(user_id=i), timeout=5).username != name]
    assert not reused and not replaced and len(set(ids)) == len(ids), (
        f"a second CreateUsers ({names}) gave the user_ids {ids}, "
        + (f"{reused} of them already given to users of the first batch"
           if reused else "duplicates") + (
            f", and the first batch's {replaced} now read as someone else" if replaced else "")
        + ": a user_id names one user for good - unique across every batch and every "
        "user, whatever their usernames (uuid4().hex, or a counter the service keeps); ids "
        "numbered within a batch, or made from the username, hand a new user an existing "
        "user's id and replace that user")


def test_two_services_share_no_users(stubs: ProtoStubs, service_class: Any) -> None:
    """Two UserService instances in one process (two servers, two tests, two tenants): each
    holds its own users and watchers - state kept in class attributes or module globals is
    one for all of them."""
    with running(stubs, service_class()) as first, running(stubs, service_class()) as second:
        (user_id,) = create(first, stubs, "ada")
        try:
            seen = second.GetUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=5)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise
        pytest.fail(
            f"a user created on one UserService was found by GetUser on another UserService "
            f"(its own server, created after it): {seen.username!r} ({seen.user_id}), "
            "expected NOT_FOUND\n"
            "Each service's users (and watchers, and lock) belong to that instance: make "
            "them in __init__ (self._users = {}), never as class attributes (a dict in the "
            "class body is made once, when the class is defined, and shared by every "
            "instance) nor as module globals.", pytrace=False)


def test_missing_user_is_not_found(stubs: ProtoStubs, service_class: Any) -> None:
    with running(stubs, service_class()) as stub:
        request = stubs.pb2.GetUserRequest(user_id="no-such-user")
        expect_status(lambda: stub.GetUser(request, timeout=5), grpc.StatusCode.NOT_FOUND,
                      "GetUser of an unknown user_id")
        expect_status(lambda: list(stub.WatchUser(request, timeout=5)),
                      grpc.StatusCode.NOT_FOUND, "WatchUser of an unknown user_id")
        update = stubs.pb2.UpdateUserRequest(user_id="no-such-user", username="x")
        expect_status(lambda: list(stub.UpdateUsers(iter([update]), timeout=5)),
                      grpc.StatusCode.NOT_FOUND, "UpdateUsers of an unknown user_id")


def test_empty_fields_are_invalid_argument(stubs: ProtoStubs, service_class: Any) -> None:
    with running(stubs, service_class()) as stub:
        for bad in (stubs.pb2.CreateUserRequest(username="", email="nobody@example.com"),
                    stubs.pb2.CreateUserRequest(username="nobody", email="")):
            batch = [stubs.pb2.CreateUserRequest(username="ada", email="ada@example.com"), bad]
            empty = "username" if not bad.username else "email"
            # (the lambda is called within this pass: B023 does not apply)
            expect_status(lambda: stub.CreateUsers(iter(batch), timeout=5),  # noqa: B023
                          grpc.StatusCode.INVALID_ARGUMENT,
                          f"CreateUsers with an empty {empty} in its second request",
                          f"a user without {empty} was stored; a request that breaks the "
                          "contract is the client's error: context.abort(INVALID_ARGUMENT)")


# A UpdateUserRequest's strings have no presence in proto3: "" is "not set". The contract
# (README) is AIP-134's without an update_mask: the request changes the fields it sets,
# and only those; one that sets none changes nothing and answers the current state.
PARTIAL_UPDATES = [  # (what, the fields the request sets, the state after it)
    ("only the username", {"username": "ada-2"}, ("ada-2", "ada@example.com")),
    ("only the email", {"email": "ada@example.org"}, ("ada", "ada@example.org")),
    ("no field at all", {}, ("ada", "ada@example.com")),
]


@pytest.mark.parametrize("what, fields, expected", PARTIAL_UPDATES,
                         ids=[case[0].replace(" ", "-") for case in PARTIAL_UPDATES])
def test_an_update_changes_only_the_fields_it_sets(stubs: ProtoStubs, service_class: Any,
                                                   what: str, fields: dict[str, str],
                                                   expected: tuple[str, str]) -> None:
    rule = ("proto3 strings carry no presence: an empty field of UpdateUserRequest is a field "
            "the client did not set. An update changes the fields it sets and keeps the "
            "others (AIP-134: with no update_mask, the populated fields); one that sets none "
            "changes nothing and answers the current state - it is not an error.")
    with running(stubs, service_class()) as stub:
        (user_id,) = create(stub, stubs, "ada")
        request = stubs.pb2.UpdateUserRequest(user_id=user_id, **fields)
        try:
            answers = list(stub.UpdateUsers(iter([request]), timeout=5))
        except grpc.RpcError as err:
            pytest.fail(
                f"an UpdateUsers request that sets {what} ({fields or 'nothing but user_id'}) "
                f"for user ada (ada@example.com) ended with {err.code().name} "
                f"({err.details()}), expected the state {expected}\n{rule}", pytrace=False)
        stored = stub.GetUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=5)
    assert len(answers) == 1, (
        f"one UpdateUsers request that sets {what}: expected one answer, saw {len(answers)}")
    for seen_in, seen in (("UpdateUsers' answer", answers[0]), ("GetUser after it", stored)):
        got = (seen.username, seen.email)
        lost = [f"{name} became {value!r}" for name, value, want in
                zip(("username", "email"), got, expected, strict=True) if value != want]
        assert got == expected, (
            f"user ada (ada@example.com) was sent an update that sets {what} "
            f"({fields or 'nothing but user_id'}); {seen_in} gives username {got[0]!r}, email "
            f"{got[1]!r}, expected {expected[0]!r}, {expected[1]!r}: {'; '.join(lost)}\n{rule}")


def test_watch_and_bidi_stream_in_order(stubs: ProtoStubs, service_class: Any) -> None:
    with running(stubs, service_class()) as stub:
        (user_id,) = create(stub, stubs, "ada")
        watch = stub.WatchUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=20)
        watched = drain(watch)
        first = next_message(watched, "WatchUser: the current state, sent first")
        assert first.username == "ada", (
            f"WatchUser: the first message must be the current state (username 'ada'), saw "
            f"{first}")
        # A second client watches the same user: both must hear of every update.
        other_watch = stub.WatchUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=20)
        other = drain(other_watch)
        next_message(other, "WatchUser #2 of the same user: the current state, sent first")

        outgoing: queue.Queue[Any] = queue.Queue()

        def requests() -> Iterator[Any]:
            while (request := outgoing.get()) is not None:
                yield request

        answers = drain(stub.UpdateUsers(requests(), timeout=20))
        names = ["ada-1", "ada-2", "ada-3"]
        for n, name in enumerate(names, start=1):
            outgoing.put(stubs.pb2.UpdateUserRequest(user_id=user_id, username=name))
            answer = next_message(
                answers, f"UpdateUsers: the answer to update {n}, before update {n + 1} is sent "
                "(a bidi rpc answers each message as it reads it, not after the stream ends)")
            assert answer.username == name and answer.email == "ada@example.com", (
                f"UpdateUsers answer {n}: expected username {name!r} and the unchanged email, "
                f"saw {answer}")
        outgoing.put(None)
        heard = {label: updates_seen(out, len(names))
                 for label, out in (("#1", watched), ("#2", other))}
        deaf = [label for label, seen in heard.items() if not seen]
        hearing = [f"{label} received {seen}" for label, seen in heard.items() if seen]
        assert not deaf or not hearing, (
            f"two WatchUser streams of the same user: watch {deaf[0]} received none of the "
            f"{len(names)} updates while {hearing[0] if hearing else ''}: "
            "every watcher of a user must get each update - keep all of a user's watchers "
            "(a set of queues), not one slot that the latest WatchUser replaces")
        for label, seen in heard.items():
            assert seen == names, (
                f"WatchUser {label}: expected the updates in the order they happened {names}, "
                f"saw {seen}")
        watch.cancel()
        other_watch.cancel()


def test_a_watch_hears_only_its_own_users_updates(stubs: ProtoStubs,
                                                 service_class: Any) -> None:
    """Two users, a watch of each, and one UpdateUsers stream that updates them in turn:
    each request names its own user, and each watch receives its own user's updates and
    nobody else's."""
    with running(stubs, service_class()) as stub:
        ids = dict(zip(("ada", "bob"), create(stub, stubs, "ada", "bob"), strict=True))
        watches: dict[str, tuple[Any, queue.Queue[Any]]] = {}
        for name, user_id in ids.items():
            call = stub.WatchUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=20)
            out = drain(call)
            first = next_message(out, f"WatchUser of {name}: the current state, sent first")
            assert first.username == name, (
                f"WatchUser of {name}: the first message must be {name}'s current state, "
                f"saw {first}")
            watches[name] = (call, out)
        outgoing: queue.Queue[Any] = queue.Queue()
        answers = drain(stub.UpdateUsers(iter(outgoing.get, None), timeout=20))
        plan = [("ada", "ada-1"), ("bob", "bob-1"), ("ada", "ada-2"), ("bob", "bob-2")]
        try:
            for n, (owner, name) in enumerate(plan, start=1):
                outgoing.put(stubs.pb2.UpdateUserRequest(user_id=ids[owner], username=name))
                answer = next_message(answers, f"UpdateUsers: the answer to update {n}")
                got = next((who for who, uid in ids.items() if uid == answer.user_id),
                           repr(answer.user_id))
                assert (answer.user_id, answer.username) == (ids[owner], name), (
                    f"one UpdateUsers stream updated ada, then bob, in turn: request {n} "
                    f"asked {owner} (user_id {ids[owner]}) to become {name!r}, and the "
                    f"answer was user {got} with username {answer.username!r}\nEach request "
                    "of the stream names its own user: look the user up for every request, "
                    "not once for the stream.")
            for owner, final in (("ada", "ada-2"), ("bob", "bob-2")):
                stored = stub.GetUser(stubs.pb2.GetUserRequest(user_id=ids[owner]), timeout=5)
                assert stored.username == final, (
                    f"after the stream updated ada and bob in turn, GetUser of {owner} "
                    f"returned username {stored.username!r}, expected {final!r}")
            for owner, (_call, out) in watches.items():
                expected = [f"{owner}-1", f"{owner}-2"]
                seen = updates_seen(out, len(expected))
                foreign = [name for name in seen if not name.startswith(owner)]
                assert seen == expected, (
                    f"the watch of {owner} received {seen}, expected only {owner}'s updates "
                    f"{expected}"
                    + (f": {foreign} are another user's updates. Keep the watchers per "
                       "user_id and tell only the updated user's: a watch is a subscription "
                       "to one user" if foreign else ""))
        finally:
            outgoing.put(None)
            for call, _ in watches.values():
                call.cancel()


def test_a_watch_that_ends_leaves_the_others_subscribed(stubs: ProtoStubs, service_class: Any,
                                                       learner: Any) -> None:
    """Two watches of one user; the first is cancelled and its handler has ended (no call
    into the learner's code left but the second watch's): the second is still a
    subscription of its own, and receives the next update. Ending a watch removes that
    rpc's queue, not the user's watchers."""
    harness = learner.harness()
    module = learner.load("user_service")
    with running(stubs, service_class()) as stub:
        (user_id,) = create(stub, stubs, "ada")
        request = stubs.pb2.GetUserRequest(user_id=user_id)
        first = stub.WatchUser(request, timeout=20)
        next(first)  # the current state: this watch is registered
        second = stub.WatchUser(request, timeout=20)
        watched = drain(second)
        outgoing: queue.Queue[Any] = queue.Queue()
        try:
            next_message(watched, "WatchUser #2 of the same user: the current state, sent first")
            first.cancel()
            # Its handler has run its way out (a finally included) once only the second
            # watch is left in the learner's code; a handler that never ends is another
            # test's failure: go on after a while either way.
            came_true(lambda: harness.handlers_open(module) <= 1, 5)
            answers = drain(stub.UpdateUsers(iter(outgoing.get, None), timeout=20))
            outgoing.put(stubs.pb2.UpdateUserRequest(user_id=user_id, username="ada-1"))
            next_message(answers, "UpdateUsers: the answer to username 'ada-1'")
            try:
                item = watched.get(timeout=ANSWER_WITHIN)
            except queue.Empty:
                item = "nothing"
        finally:
            outgoing.put(None)
            second.cancel()
    if getattr(item, "username", None) == "ada-1":
        return
    seen = (f"its stream ended ({item.code().name if item is not None else 'OK'})"
            if item is None or isinstance(item, grpc.RpcError)
            else f"it received nothing within {ANSWER_WITHIN:.0f} s of the answer"
            if isinstance(item, str) else f"it received {item.username!r}")
    pytest.fail(
        f"ending one watch unsubscribed another of the same user: the first was cancelled "
        f"and its handler ended, then an update set username 'ada-1', and the second watch, "
        f"still open, did not receive it ({seen})\nA watch that ends must remove its own "
        "queue from the user's watchers "
        "(watchers[user_id].discard(changes)), and wake only itself; dropping the user's "
        "whole entry (watchers.pop(user_id)), or ending every queue of the user, "
        "unsubscribes the watches still open", pytrace=False)


HELD_STEPS = 80  # at most this many lines of one CreateUsers to hold it at, in turn


def test_two_batches_at_once_get_distinct_ids(stubs: ProtoStubs, service_class: Any,
                                              learner: Any) -> None:
    """Two CreateUsers streams in flight at once. The harness holds the first before each
    line of the learner's code in turn, while the second runs to its end (or until it
    waits for a lock the first holds): a counter read in one step and stored back in
    another, or ids made from how many users are stored (neither batch has stored yet),
    gives two new users one id, and the later store replaces the other batch's user."""
    harness = learner.harness()
    service = harness.CreatesHeld(service_class(), learner.load("user_service"))
    with running(stubs, service) as stub:
        given: dict[str, str] = {}   # user_id -> username, every id given so far
        for k in range(1, HELD_STEPS + 1):
            names = {side: [f"{side}{k}-{n}" for n in (1, 2)] for side in ("a", "b")}
            requests = {side: [stubs.pb2.CreateUserRequest(username=n, email=f"{n}@example.com")
                               for n in batch] for side, batch in names.items()}
            service.arm(k)
            held = stub.CreateUsers.future(iter(requests["a"]), timeout=20)
            at = service.wait_held()
            other = None
            try:
                if at is not None:
                    other = stub.CreateUsers.future(iter(requests["b"]), timeout=20)
                    came_true(lambda: other.done() or service.other_asleep(), 10)  # noqa: B023
            finally:
                service.release()
            results = [("a", held)] + ([("b", other)] if other is not None else [])
            for side, call in results:
                ids = list(call.result(timeout=20).user_ids)
                taken = [f"{i} (already {given[i]}'s)" for i in ids if i in given]
                twice = len(set(ids)) != len(ids)
                where = (f"the first held before line {at[1]} of {at[0]} ({at[2]!r}) while the "
                         "second ran" if at is not None else "one after the other")
                assert not taken and not twice, (
                    f"two CreateUsers streams at once were handed the same user_id: batch "
                    f"{side} {names[side]} got {ids}, "
                    + ("; ".join(taken) if taken else "one id twice") + f" ({where})\nA user_id "
                    "names one user for good, also when batches run at once: a counter read "
                    "and stored back in two steps outside the lock, or an id made from how "
                    "many users are stored (a batch stores only at its end), hands two new "
                    "users one id, and the later store replaces the other's user. Use "
                    "uuid4().hex, or take the next number under the lock")
                given.update(zip(ids, names[side], strict=True))
            if at is None:
                break
        replaced = []
        for user_id, name in given.items():
            now = stub.GetUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=5).username
            if now != name:
                replaced.append(f"{user_id} ({name}, now {now})")
        assert not replaced, (
            f"after pairs of CreateUsers streams ran at once, GetUser finds {replaced[:3]} "
            "as someone else: the later batch's store replaced them")


class FakeClock:
    """The service's injected clock: Unix time that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_500_000_000.25

    def __call__(self) -> float:
        return self.now


def test_created_at_comes_from_the_injected_clock(stubs: ProtoStubs,
                                                  service_class: Any) -> None:
    """created_at is the clock's time when the user was created, read through the clock
    the service was given, and it stays that when the user is updated later."""
    clock = FakeClock()
    created = int(clock.now)
    why = ("Read the time only through the clock the service was given (UserService(clock)): "
           "that is what lets a test, or a replay, decide what time it is. created_at is "
           "the moment of creation: an update changes username and email, never it.")
    with running(stubs, service_class(clock=clock)) as stub:
        (ada,) = create(stub, stubs, "ada")
        user = stub.GetUser(stubs.pb2.GetUserRequest(user_id=ada), timeout=5)
        assert user.created_at == created, (
            f"a user created while the service's clock read {clock.now} has created_at "
            f"{user.created_at}, expected {created}"
            + (" (that is the machine's time: the clock given to UserService was not "
               "used)" if abs(user.created_at - time.time()) < 3600 else "") + f"\n{why}")
        clock.now += 3600
        outgoing: queue.Queue[Any] = queue.Queue()
        answers = drain(stub.UpdateUsers(iter(outgoing.get, None), timeout=20))
        try:
            outgoing.put(stubs.pb2.UpdateUserRequest(user_id=ada, username="ada-1"))
            answer = next_message(answers, "UpdateUsers: the answer to the update")
        finally:
            outgoing.put(None)
        stored = stub.GetUser(stubs.pb2.GetUserRequest(user_id=ada), timeout=5)
        for what, seen in (("UpdateUsers' answer", answer), ("GetUser after it", stored)):
            assert seen.created_at == created, (
                f"ada was created at {created}; updated 3600 s later (by the service's "
                f"clock), {what} says created_at {seen.created_at}, expected {created}: "
                f"the update changed when the user was created\n{why}")
        (bob,) = create(stub, stubs, "bob")
        later = stub.GetUser(stubs.pb2.GetUserRequest(user_id=bob), timeout=5)
        assert later.created_at == int(clock.now), (
            f"bob, created when the service's clock read {clock.now}, has created_at "
            f"{later.created_at}, expected {int(clock.now)}\n{why}")


def test_an_update_is_applied_before_it_is_answered(stubs: ProtoStubs, service_class: Any,
                                                   learner: Any) -> None:
    """UpdateUsers' answer says the update is done: the new state is stored and every
    watcher told before it is sent. The harness holds the service just after the answer,
    before grpc asks the learner's code for the next one, so whatever UpdateUsers does after
    answering has not happened when the test looks (GetUser, a watch), on any machine."""
    service = learner.harness().AnswersHeld(service_class())
    with running(stubs, service) as stub:
        (user_id,) = create(stub, stubs, "bob")
        watch = stub.WatchUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=20)
        watched = drain(watch)
        next_message(watched, "WatchUser: the current state, sent first")
        outgoing: queue.Queue[Any] = queue.Queue()
        answers = drain(stub.UpdateUsers(iter(outgoing.get, None), timeout=20))
        try:
            outgoing.put(stubs.pb2.UpdateUserRequest(user_id=user_id, username="bob2"))
            answer = next_message(answers, "UpdateUsers: the answer to the update")
            stored = stub.GetUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=5)
            try:
                item = watched.get(timeout=ANSWER_WITHIN)
            except queue.Empty:
                item = None
        finally:
            service.resume()
            outgoing.put(None)
            watch.cancel()
    assert answer.username == "bob2", (
        f"UpdateUsers answered {answer} to username 'bob2': expected the new state")
    promise = ("The answer to an update is a promise that it was applied: store the new "
               "state and put it in every watcher's queue under the lock, then yield the "
               "answer - never yield first and write when grpc resumes the generator for "
               "the next answer (ack before write).")
    assert stored.username == "bob2", (
        f"UpdateUsers answered username 'bob2', and a GetUser sent after that answer arrived "
        f"returned {stored.username!r}: the update was answered before it was stored (the "
        f"service was held right after the answer, before UpdateUsers' next step)\n{promise}")
    heard = getattr(item, "username", None)
    got = "nothing" if item is None else repr(heard or item)
    assert heard == "bob2", (
        f"UpdateUsers answered username 'bob2', and GetUser returns it, but a watch of the "
        f"user received {got} within {ANSWER_WITHIN:.0f} s of that answer "
        f"(the service was held right after the answer): the watchers are told after the "
        f"answer is sent\n{promise}")


def test_a_watch_opened_during_updates_misses_none(stubs: ProtoStubs, service_class: Any,
                                                   learner: Any) -> None:
    """WatchUser sends the current state, then every change after it: reading the state
    and registering the watcher must be one step, or an update that lands in between is in
    neither. Watches are opened while an UpdateUsers stream keeps the service busy, and the
    harness makes each line of the learner's code take LINE_DELAY s, so the two interleave
    line by line as on a busy many-core server. Each watch must then receive, after its
    first message, every later update in order, with no gap."""
    harness = learner.harness()
    stop = threading.Event()
    with ExitStack() as cleanup:
        cleanup.callback(stop.set)
        harness.stretch_lines(learner.load("user_service"), LINE_DELAY)
        try:
            stub = cleanup.enter_context(running(stubs, service_class(),
                                                 workers=LATE_WATCHES + 4))
        finally:
            harness.unstretch()  # the worker threads are started: they keep the tracer
        (user_id,) = create(stub, stubs, "v0")
        in_flight = threading.Semaphore(2)  # the next update always waits at the server

        def requests() -> Iterator[Any]:
            n = 0
            while not stop.is_set():
                if in_flight.acquire(timeout=0.1):
                    n += 1
                    yield stubs.pb2.UpdateUserRequest(user_id=user_id, username=f"v{n}")

        answers = drain(stub.UpdateUsers(requests(), timeout=60))
        answered: list[str] = []

        def answer() -> str:
            item = next_message(answers, f"UpdateUsers: the answer to update "
                                f"{len(answered) + 1}")
            in_flight.release()
            answered.append(item.username)
            return str(item.username)

        watches: list[tuple[Any, queue.Queue[Any], str]] = []
        for n in range(LATE_WATCHES):
            answer()
            call = stub.WatchUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=60)
            out = drain(call)
            first = next_message(out, f"WatchUser #{n + 1}: the current state, sent first")
            watches.append((call, out, first.username))
        for _ in range(3):  # a few more after the last watch began
            answer()
        stop.set()
        while True:  # the answers to the requests still in flight
            try:
                item = answers.get(timeout=ANSWER_WITHIN)
            except queue.Empty:
                break
            if item is None or isinstance(item, grpc.RpcError):
                break
            answered.append(item.username)
        last = int(answered[-1][1:])
        for n, (call, out, first_name) in enumerate(watches, start=1):
            start = int(first_name[1:]) if first_name[1:].isdigit() else -1
            assert 0 <= start <= last, (
                f"WatchUser #{n}: the first message was username {first_name!r}, not a state "
                f"the user had (v0 to v{last})")
            expected = [f"v{k}" for k in range(start + 1, last + 1)]
            seen = updates_seen(out, len(expected)) if expected else []
            while seen and seen[0] == first_name:  # the snapshot sent twice: harmless
                seen = seen[1:] + updates_seen(out, 1)
            missed = [name for name in expected if name not in seen]
            assert seen == expected, (
                f"WatchUser #{n}, opened while updates streamed: its first message was "
                f"{first_name} (the state then), and after it the watch received "
                f"{seen[:8]}{'...' if len(seen) > 8 else ''}, expected every later update "
                f"in order {expected[:8]}{'...' if len(expected) > 8 else ''}"
                + (f": it missed {missed[:3]}. An update landed between reading the current "
                   "state and registering the watcher, so it was in neither - do both in "
                   "one step, under the same lock the updates take" if missed else ""))
            call.cancel()


def test_watch_ends_at_the_deadline(stubs: ProtoStubs, service_class: Any) -> None:
    with running(stubs, service_class()) as stub:
        (user_id,) = create(stub, stubs, "ada")
        watched = drain(stub.WatchUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=0.5))
        next_message(watched, "WatchUser: the current state, sent first")
        try:
            end = watched.get(timeout=ANSWER_WITHIN + 0.5)
        except queue.Empty:
            pytest.fail("WatchUser with a 0.5 s deadline had not ended after 3.5 s",
                        pytrace=False)
        assert isinstance(end, grpc.RpcError), (
            f"WatchUser with a 0.5 s deadline and no updates: expected DEADLINE_EXCEEDED, but "
            f"the server ended the stream itself ({end!r}): a watch stays open until the "
            "client cancels or its deadline passes")
        assert end.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (
            f"WatchUser with a 0.5 s deadline: expected DEADLINE_EXCEEDED, saw "
            f"{end.code().name} ({end.details()})")


def test_expired_watches_free_their_threads(stubs: ProtoStubs, service_class: Any) -> None:
    workers = 2
    with running(stubs, service_class(), workers=workers) as stub:
        (user_id,) = create(stub, stubs, "ada")
        for n in range(workers):  # each watch holds a server thread while it runs
            watched = drain(stub.WatchUser(stubs.pb2.GetUserRequest(user_id=user_id),
                                           timeout=0.3))
            next_message(watched, f"WatchUser #{n + 1}: the current state")
            end = watched.get(timeout=ANSWER_WITHIN)
            assert isinstance(end, grpc.RpcError), (
                f"WatchUser #{n + 1} with a 0.3 s deadline ended by itself ({end!r}); expected "
                "DEADLINE_EXCEEDED: a watch stays open until the client leaves")
        try:
            stub.GetUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=ANSWER_WITHIN)
        except grpc.RpcError as err:
            pytest.fail(
                f"GetUser after {workers} watches passed their deadline, on a server with "
                f"{workers} threads: {err.code().name}: the WatchUser handlers still hold "
                "their threads after their clients left; wake the waiting handler when the "
                "rpc ends (context.add_callback) and return", pytrace=False)


FAILED_BATCH = 200       # valid requests ahead of the bad one, in the all-or-nothing test
KEPT_PER_REFUSED = 16    # bytes per request of the failed batch the service may still hold


def test_a_failed_batch_stores_none_of_its_users(stubs: ProtoStubs, service_class: Any,
                                                 learner: Any) -> None:
    """CreateUsers is all or nothing (README; a batch create is atomic, AIP-233): a stream
    whose last request is invalid ends with INVALID_ARGUMENT and stores none of the users
    before it - the client never learns their ids, so it could neither use nor remove them.
    Stored users cannot be listed through the API, so the harness records what the
    learner's code allocates during the failed batch (tracemalloc, its frames on the
    stack): once the handler has ended, what it still holds must not grow with the number
    of requests the batch had."""
    harness = learner.harness()
    module = learner.load("user_service")
    batch = [stubs.pb2.CreateUserRequest(username=f"user{n}", email=f"user{n}@example.com")
             for n in range(FAILED_BATCH)]
    batch.append(stubs.pb2.CreateUserRequest(username="", email="nobody@example.com"))
    with running(stubs, service_class()) as stub:
        create(stub, stubs, "ada")  # the service's own containers exist before the measure
        harness.trace_allocations()
        try:
            expect_status(lambda: stub.CreateUsers(iter(batch), timeout=20),
                          grpc.StatusCode.INVALID_ARGUMENT,
                          f"CreateUsers with {FAILED_BATCH} valid requests, then one with an "
                          "empty username",
                          "a user without a username was stored; a request that breaks the "
                          "contract is the client's error: context.abort(INVALID_ARGUMENT)")
            limit = FAILED_BATCH * KEPT_PER_REFUSED
            kept = bytes_held_for_good(harness, module, limit)
        finally:
            harness.stop_tracing()
    assert kept <= limit, (
        f"CreateUsers with {FAILED_BATCH} valid requests, then one with an empty username, "
        f"ended with INVALID_ARGUMENT as it must; afterwards the service still holds {kept} "
        f"bytes allocated by your code during that batch ({kept // FAILED_BATCH} per request, "
        f"allowed {KEPT_PER_REFUSED}): the users before the bad request were stored. The "
        "client was told the batch failed and got none of their ids, so it can neither "
        "read nor remove them, and its retry creates them twice. A batch is all or nothing "
        "(AIP-233): check each request as it arrives, keep the new users aside, and store "
        "them together once the stream has ended without error (context.abort raises: "
        "code after it never runs).")


def bytes_held_for_good(harness: Any, module: Any, limit: int) -> int:
    """The bytes the learner's code still holds (harness.retained_bytes), read until they
    are within ``limit``, for at most 15 s - or until every call into the learner's code
    has ended (no thread in it, no generator of it left unfinished) at two readings in a
    row, each after a full garbage collection: what it holds then it holds for good, and
    there is no need to wait out the deadline for it to go."""
    deadline = time.monotonic() + 15.0
    ended = 0
    while (kept := int(harness.retained_bytes(module))) > limit and (
            time.monotonic() < deadline):
        ended = ended + 1 if harness.handlers_open(module) == 0 else 0
        if ended >= 2:
            break
        time.sleep(0.2)
    return kept


ENDED_WATCHES = 150  # watches opened and cancelled one after another, in the leak test
KEPT_PER_WATCH = 48  # bytes per ended watch the service may still hold, all told


def test_ended_watches_release_their_subscription(stubs: ProtoStubs, service_class: Any,
                                                  learner: Any) -> None:
    """A watch is a subscription tied to its rpc: when the client cancels, what WatchUser
    registered (its queue in the user's set of watchers) must go too, or every ended watch
    stays in memory and every later update of the user is put into queues nobody reads. The
    harness records what the learner's code allocates (tracemalloc, its frames on the
    stack) while ENDED_WATCHES watches are opened and cancelled one by one; afterwards what
    is still alive must not grow with the number of ended watches."""
    harness = learner.harness()
    module = learner.load("user_service")
    with running(stubs, service_class()) as stub:
        (user_id,) = create(stub, stubs, "ada")
        harness.trace_allocations()
        try:
            for _ in range(ENDED_WATCHES):
                call = stub.WatchUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=20)
                next(call)  # the current state: the handler has registered its watcher
                call.cancel()
            limit = ENDED_WATCHES * KEPT_PER_WATCH
            kept = bytes_held_for_good(harness, module, limit)
        finally:
            harness.stop_tracing()
    assert kept <= limit, (
        f"{ENDED_WATCHES} WatchUser streams of one user were opened and cancelled one after "
        f"another; afterwards the service still holds {kept} bytes allocated by your code "
        f"during them ({kept // ENDED_WATCHES} per ended watch, allowed {KEPT_PER_WATCH}): "
        "each ended watch left its subscription behind (its queue still in the user's "
        "watchers), so memory grows with every watch ever opened and every update is put "
        "into queues nobody reads - remove the watcher when the rpc ends, in a finally "
        "around the loop (the generator is closed on cancel and deadline too)")


SLOW_WATCH_UPDATES = 8  # updates answered while a watch's client reads nothing
BULK = 40_000           # characters padding each of those usernames: a few fill the window


def test_a_watch_that_falls_behind_receives_each_state_as_answered(
        stubs: ProtoStubs, service_class: Any) -> None:
    """A watch whose client reads slowly falls behind: its handler waits in grpc's send once
    the stream's HTTP/2 flow-control window is full (here after a few updates of BULK
    characters, the client reading nothing and its window never grown), and the later
    updates wait in the watcher's queue. Each must still arrive as UpdateUsers answered it:
    what is queued is a state of the user at one moment, not the user's stored message
    that every later update changes in place."""
    with running(stubs, service_class(), options=[("grpc.http2.bdp_probe", 0)]) as stub:
        (user_id,) = create(stub, stubs, "ada")
        watch = stub.WatchUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=20)
        try:
            next(watch)  # the current state; then nothing is read until the updates are done
            outgoing: queue.Queue[Any] = queue.Queue()
            answers = drain(stub.UpdateUsers(iter(outgoing.get, None), timeout=20))
            sent = [stubs.pb2.UpdateUserRequest(user_id=user_id, username=f"v{k}-" + "x" * BULK)
                    for k in range(1, SLOW_WATCH_UPDATES + 1)]
            sent.append(stubs.pb2.UpdateUserRequest(user_id=user_id, email="last@example.com"))
            answered = []
            for n, request in enumerate(sent, start=1):
                outgoing.put(request)
                answered.append(state(next_message(answers, f"UpdateUsers: answer {n}")))
            outgoing.put(None)
            watched = drain(watch)
            received = [state(next_message(watched, f"WatchUser: update {n} of {len(sent)}"))
                        for n in range(1, len(sent) + 1)]
        finally:
            watch.cancel()
    changed = [n for n, (got, want) in enumerate(zip(received, answered, strict=True), start=1)
               if got != want and got in answered[n:]]
    assert not changed, (
        f"a watch that fell behind (its client reading nothing while {len(sent)} updates "
        f"were answered) received update {changed[0]} as {received[changed[0] - 1]!r}, a "
        f"later state, where UpdateUsers had answered {answered[changed[0] - 1]!r}: its "
        "queued message was changed after it was queued - the watcher was handed the "
        "stored message (or dict) that the next update changed in place. Build a new "
        "UserResponse per update and never change one that is stored or queued "
        f"(received {received}, answered {answered})")
    assert received == answered, (
        f"a watch whose client read nothing while {len(sent)} updates were answered then "
        f"received {received}, expected each state as UpdateUsers answered it {answered}")


def state(user: Any) -> str:
    """A user's state, short: the username up to its padding, and the email."""
    return f"{user.username.split('-')[0]}/{user.email}"


RACE_ROUNDS = 8  # rounds of two updates of one user in flight at once


def test_two_streams_updating_one_user_lose_neither(stubs: ProtoStubs, service_class: Any,
                                                    learner: Any) -> None:
    """Two UpdateUsers streams update the same user at once, one its username, the other
    its email: both changes must stay. An update is a read-modify-write (read the user,
    merge the set fields, store); split across steps, the other stream's store falls in
    between and is overwritten with the stale copy. The harness makes each line of the
    learner's code take LINE_DELAY s in the server's threads, so the two handlers,
    released together each round, interleave line by line as on a busy many-core server;
    under one lock they only take turns."""
    harness = learner.harness()
    with ExitStack() as cleanup:
        harness.stretch_lines(learner.load("user_service"), LINE_DELAY)
        try:
            stub = cleanup.enter_context(running(stubs, service_class()))
        finally:
            harness.unstretch()  # the worker threads are started: they keep the tracer
        (user_id,) = create(stub, stubs, "n0")
        names: queue.Queue[Any] = queue.Queue()
        emails: queue.Queue[Any] = queue.Queue()
        cleanup.callback(names.put, None)
        cleanup.callback(emails.put, None)
        name_answers = drain(stub.UpdateUsers(iter(names.get, None), timeout=30))
        email_answers = drain(stub.UpdateUsers(iter(emails.get, None), timeout=30))
        for k in range(1, RACE_ROUNDS + 1):
            names.put(stubs.pb2.UpdateUserRequest(user_id=user_id, username=f"n{k}"))
            emails.put(stubs.pb2.UpdateUserRequest(user_id=user_id, email=f"e{k}@example.com"))
            next_message(name_answers, f"UpdateUsers stream 1: the answer to username n{k}")
            next_message(email_answers, f"UpdateUsers stream 2: the answer to email e{k}")
            now = stub.GetUser(stubs.pb2.GetUserRequest(user_id=user_id), timeout=5)
            want = (f"n{k}", f"e{k}@example.com")
            assert (now.username, now.email) == want, (
                f"two UpdateUsers streams updated one user at the same time, one setting "
                f"username {want[0]!r}, the other email {want[1]!r}; both were answered, and "
                f"then GetUser returned username {now.username!r}, email {now.email!r}: one "
                "update overwrote the other with the stale copy it had read (a lost "
                "update). Read the user, merge the set fields and store the result in one "
                "step under the lock; reading in one lock section and storing in another "
                "lets the other stream in between")
