"""Kafka: a proxy that reads the protocol between a learner's client and the broker.

A verification hands the learner ``proxy.bootstrap`` instead of the broker's address. Every
request the learner's client sends is recorded (api key, version, when, connection, a
Produce's ``acks``) and may be held, dropped, refused, or hooked - so a test can kill the
learner's process at an exact protocol point instead of after a guessed pause. A Fetch answer
carrying records may be failed: its partitions answered with an error code, as a broker
refusing them would, so a consumer error other than the end of a partition reaches the
learner's poll()."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Self

import pytest

PRODUCE, FETCH, LIST_OFFSETS, METADATA, OFFSET_COMMIT, FIND_COORDINATOR = 0, 1, 2, 3, 8, 10
ADD_OFFSETS_TO_TXN, END_TXN, TXN_OFFSET_COMMIT, DESCRIBE_CLUSTER = 25, 26, 28, 60
JOIN_GROUP, HEARTBEAT, LEAVE_GROUP, SYNC_GROUP, CONSUMER_GROUP_HEARTBEAT = 11, 12, 13, 14, 68
API_NAMES = {
    0: "Produce", 1: "Fetch", 2: "ListOffsets", 3: "Metadata", 8: "OffsetCommit",
    9: "OffsetFetch", 10: "FindCoordinator", 11: "JoinGroup", 12: "Heartbeat",
    13: "LeaveGroup", 14: "SyncGroup", 15: "DescribeGroups", 16: "ListGroups",
    18: "ApiVersions", 19: "CreateTopics", 21: "DeleteRecords", 22: "InitProducerId",
    23: "OffsetForLeaderEpoch", 24: "AddPartitionsToTxn", 25: "AddOffsetsToTxn",
    26: "EndTxn", 28: "TxnOffsetCommit", 32: "DescribeConfigs", 36: "SaslAuthenticate",
    60: "DescribeCluster", 68: "ConsumerGroupHeartbeat",
}
# The responses that name brokers (host, port): rewritten to point back at the proxy.
_ADDRESS_RESPONSES = (METADATA, FIND_COORDINATOR, DESCRIBE_CLUSTER)
# First flexible version (compact strings, tagged fields) of the requests whose body is read.
_FLEXIBLE_FROM = {PRODUCE: 9, OFFSET_COMMIT: 8}
# First flexible version of the Fetch response (KIP-482), and the first naming topics by id.
_FETCH_FLEXIBLE_FROM, _FETCH_TOPIC_IDS_FROM = 12, 13
# A refused OffsetCommit is answered in the broker's place with OFFSET_METADATA_TOO_LARGE for
# every partition: final to clients (no retry, no rejoin as after ILLEGAL_GENERATION).
REFUSAL_ERROR = 12
# A partition error librdkafka hands to the application (poll() returns it as a message whose
# error() it is) and then recovers from, fetching again after a backoff (5 s for this code).
TOPIC_AUTHORIZATION_FAILED = 29

Rule = Literal["forward", "hold", "drop", "refuse"]
EventKind = Literal["request", "answer", "forwarded", "dropped", "refused", "gone", "failed"]


@dataclass(frozen=True)
class KafkaRequest:
    """One request a client sent through the proxy, as it arrived."""

    api_key: int
    api_version: int
    correlation_id: int
    connection: int        # the proxy's number for the client's TCP connection
    client_id: str | None
    at: float              # time.monotonic() at arrival
    acks: int | None = None               # Produce: 0, 1 or -1 (all)
    transactional_id: str | None = None   # Produce v3+: the transaction's producer

    @property
    def name(self) -> str:
        return API_NAMES.get(self.api_key, f"api {self.api_key}")


@dataclass(frozen=True)
class KafkaEvent:
    """What the proxy saw or did, in order: a request arrived ("request"), its answer left
    for the client ("answer"), or the proxy did not forward it as sent: "dropped",
    "refused" (answered with an error, never forwarded), "gone" (held while its client closed
    the connection: never forwarded); or its answer left changed: "failed" (a Fetch answer
    whose records the proxy replaced with an error, recorded before its "answer")."""

    kind: EventKind
    request: KafkaRequest


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _skip_tags(data: bytes, pos: int) -> int:
    count, pos = _uvarint(data, pos)
    for _ in range(count):
        _tag, pos = _uvarint(data, pos)
        size, pos = _uvarint(data, pos)
        pos += size
    return pos


def _string(data: bytes, pos: int, compact: bool) -> tuple[str | None, int]:
    if compact:
        size, pos = _uvarint(data, pos)
        size -= 1
    else:
        (size,) = struct.unpack_from(">h", data, pos)
        pos += 2
    if size < 0:
        return None, pos
    return data[pos:pos + size].decode(errors="replace"), pos + size


def parse_request(frame: bytes, connection: int) -> tuple[KafkaRequest, int]:
    """A request frame (size included) -> the request and where its body starts."""
    api_key, version, correlation = struct.unpack_from(">hhi", frame, 4)
    client_id, pos = _string(frame, 12, compact=False)  # a header's client_id never is
    flexible = version >= _FLEXIBLE_FROM.get(api_key, 1 << 15)
    if flexible:
        pos = _skip_tags(frame, pos)
    acks = txn = None
    if api_key == PRODUCE:
        body = pos
        if version >= 3:
            txn, body = _string(frame, body, compact=flexible)
        (acks,) = struct.unpack_from(">h", frame, body)
    return KafkaRequest(api_key, version, correlation, connection, client_id,
                        time.monotonic(), acks, txn), pos


def _count(data: bytes, pos: int, compact: bool) -> tuple[int, int]:
    if compact:
        count, pos = _uvarint(data, pos)
        return count - 1, pos
    (count,) = struct.unpack_from(">i", data, pos)
    return count, pos + 4


def _put_count(count: int, compact: bool) -> bytes:
    if not compact:
        return struct.pack(">i", count)
    value, out = count + 1, bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def offset_commit_refusal(frame: bytes, body: int, version: int,
                          error: int = REFUSAL_ERROR) -> bytes:
    """The answer to an OffsetCommit request (v2-v9) refusing every partition it names
    with ``error``: the frame the broker would send, built from the request."""
    flexible = version >= _FLEXIBLE_FROM[OFFSET_COMMIT]
    tags = b"\0" if flexible else b""
    _group, pos = _string(frame, body, flexible)
    _member, pos = _string(frame, pos + 4, flexible)  # after the generation
    if version >= 7:
        _instance, pos = _string(frame, pos, flexible)
    if version <= 4:
        pos += 8  # retention_time_ms
    out = bytearray(frame[8:12]) + tags  # the correlation id (+ the header's tags)
    if version >= 3:
        out += bytes(4)  # throttle_time_ms
    topics, pos = _count(frame, pos, flexible)
    out += _put_count(topics, flexible)
    for _ in range(topics):
        start = pos
        _name, pos = _string(frame, pos, flexible)
        out += frame[start:pos]
        partitions, pos = _count(frame, pos, flexible)
        out += _put_count(partitions, flexible)
        for _ in range(partitions):
            out += frame[pos:pos + 4] + struct.pack(">h", error) + tags
            pos += 12 + (4 if version >= 6 else 0)  # index, offset, leader epoch
            _metadata, pos = _string(frame, pos, flexible)
            if flexible:
                pos = _skip_tags(frame, pos)
        if flexible:
            pos = _skip_tags(frame, pos)
        out += tags
    out += tags
    return struct.pack(">i", len(out)) + bytes(out)


def fetch_failure(frame: bytes, version: int, error: int) -> bytes | None:
    """A Fetch answer (v4-v17, size included) with every partition that carries records
    answered ``error`` instead, its records emptied - as a broker refusing the partition
    answers (high watermark, last stable offset and the rest as they were); None if no
    partition of it carries records (nothing to fail). Only sizes of records change, and
    none of the frame's other fields counts bytes: the frame is rebuilt around them."""
    if not 4 <= version <= 17:
        raise ValueError(f"Fetch v{version} is not read (v4-v17 are)")
    flexible = version >= _FETCH_FLEXIBLE_FROM
    pos, failed = 8, False  # past the size and the correlation id
    if flexible:
        pos = _skip_tags(frame, pos)  # the response header's
    pos += 4 + (6 if version >= 7 else 0)  # throttle time; error code and session id
    topics, pos = _count(frame, pos, flexible)
    for _ in range(topics):
        if version >= _FETCH_TOPIC_IDS_FROM:
            pos += 16
        else:
            _name, pos = _string(frame, pos, flexible)
        partitions, pos = _count(frame, pos, flexible)
        for _ in range(partitions):
            error_at = pos + 4  # after the partition index
            pos += 4 + 2 + 8 + 8 + (8 if version >= 5 else 0)  # .. last stable, log start
            aborted, pos = _count(frame, pos, flexible)
            for _ in range(max(aborted, 0)):
                pos += 16  # producer id, first offset
                if flexible:
                    pos = _skip_tags(frame, pos)
            if version >= 11:
                pos += 4  # preferred read replica
            records_at = pos
            if flexible:
                size, pos = _uvarint(frame, pos)
                size -= 1
            else:
                (size,) = struct.unpack_from(">i", frame, pos)
                pos += 4
            if size > 0:  # failed: the error in, the records out (empty, not null)
                empty = _put_count(0, flexible)
                frame = (frame[:error_at] + struct.pack(">h", error)
                         + frame[error_at + 2:records_at] + empty + frame[pos + size:])
                pos, failed = records_at + len(empty), True
            else:
                pos += max(size, 0)
            if flexible:
                pos = _skip_tags(frame, pos)
        if flexible:
            pos = _skip_tags(frame, pos)
    if flexible:
        pos = _skip_tags(frame, pos)
    if pos != len(frame):
        raise ValueError(f"Fetch v{version} answer read to byte {pos} of {len(frame)}")
    if not failed:
        return None
    return struct.pack(">i", len(frame) - 4) + frame[4:]


def _read_frame(sock: socket.socket, buffer: bytearray) -> bytes | None:
    """The next whole frame (size prefix included) from ``sock``; None at end of stream."""
    while True:
        if len(buffer) >= 4:
            size = int.from_bytes(buffer[:4], "big") + 4
            if len(buffer) >= size:
                frame = bytes(buffer[:size])
                del buffer[:size]
                return frame
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk


class KafkaProxy:
    """A TCP proxy on 127.0.0.1 (free ports) in front of a Kafka cluster, reading requests
    as they pass. Give the learner :attr:`bootstrap`; the addresses the brokers announce
    (Metadata, FindCoordinator, DescribeCluster) are rewritten to ports of this proxy, one
    per broker, so the client never goes around it.

    * observe: :meth:`requests`, :meth:`events` (requests and answers, in order), :meth:`wait_for`;
    * intervene per api key: :meth:`hold` until :meth:`release`, :meth:`hold_answers`
      until :meth:`release_answers` (forwarded, but the answer waits), :meth:`drop` (never
      forwarded, never answered), :meth:`refuse` (answered with an error), and
      :meth:`on_request` (call a function when such a request arrives, before anything is
      done with it: kill the learner's process there);
    * change answers: :meth:`fail_fetches` (a Fetch answer's records replaced with a
      partition error).

    A held request whose client has closed its connection meanwhile (a killed process) is
    never forwarded. ``with KafkaProxy(kafka.bootstrap) as proxy:`` closes it."""

    def __init__(self, bootstrap: str) -> None:
        host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._listeners: dict[tuple[str, int], socket.socket] = {}
        self._sockets: list[socket.socket] = []
        self._events: list[KafkaEvent] = []
        self._rules: dict[int, tuple[Rule, int | None]] = {}
        self._hooks: dict[int, list[Callable[[KafkaRequest], object]]] = {}
        self._held_answers: set[int] = set()
        self._failing: tuple[int, int] | None = None  # Fetch: (error, answers left)
        self._held = self._connections = 0
        self._closed = False
        self.errors: list[str] = []
        self.bootstrap = f"127.0.0.1:{self._port_for(host or '127.0.0.1', int(port))}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- observing
    def requests(self, *api_keys: int) -> list[KafkaRequest]:
        """Every request seen so far (only those of ``api_keys`` if given), in order."""
        with self._lock:
            return [e.request for e in self._events if e.kind == "request"
                    and (not api_keys or e.request.api_key in api_keys)]

    def events(self) -> list[KafkaEvent]:
        """Requests arriving and answers leaving, in the order the proxy saw them."""
        with self._lock:
            return list(self._events)

    def held(self) -> int:
        """How many requests are being held right now."""
        with self._lock:
            return self._held

    def wait_for(self, api_key: int, count: int = 1, timeout: float = 15,
                 what: str = "") -> KafkaRequest:
        """Wait until ``count`` requests of ``api_key`` have arrived; return the last.
        Otherwise fail the test saying what never came (``what``: whose request)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                seen = [e.request for e in self._events
                        if e.kind == "request" and e.request.api_key == api_key]
                if len(seen) >= count:
                    return seen[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {count} "
                    f"{API_NAMES.get(api_key, api_key)} request(s){what} at the Kafka proxy "
                    f"(it saw {len(seen)})", pytrace=False)

    # -- intervening

    def hold(self, api_key: int) -> None:
        """Hold requests of ``api_key`` (and, as on one TCP connection, those sent after
        them on the same connection) until :meth:`release`."""
        self._rule(api_key, "hold")

    def release(self, api_key: int) -> None:
        """Forward the held requests of ``api_key`` and the later ones."""
        self._rule(api_key, "forward")

    def hold_answers(self, api_key: int, held: bool = True) -> None:
        """Forward requests of ``api_key``, but hold the broker's answers to them (and the
        later answers on their connection) until :meth:`release_answers`: the broker did
        the work (a Produce is stored) while the client still waits to hear so."""
        with self._changed:
            (self._held_answers.add if held else self._held_answers.discard)(api_key)
            self._changed.notify_all()

    def release_answers(self, api_key: int) -> None:
        """Send the held answers to requests of ``api_key``, and the later ones at once."""
        self.hold_answers(api_key, held=False)

    def drop(self, api_key: int) -> None:
        """Never forward requests of ``api_key``: their client waits for an answer that
        never comes (its own timeout decides)."""
        self._rule(api_key, "drop")

    def refuse(self, api_key: int = OFFSET_COMMIT, count: int | None = 1) -> None:
        """Refuse the next ``count`` requests of ``api_key`` (None: all): answer them in the
        broker's place with an error, never forwarded, so nothing is stored. Only
        OffsetCommit (v2-v9), answered OFFSET_METADATA_TOO_LARGE for every partition: an
        error clients take as final (no retry, no rebalance)."""
        if api_key != OFFSET_COMMIT:
            raise ValueError("only OffsetCommit requests can be refused")
        self._rule(api_key, "refuse", count)

    def fail_fetches(self, error: int = TOPIC_AUTHORIZATION_FAILED, count: int = 1) -> None:
        """Fail the next ``count`` Fetch answers that carry records: each partition with
        records is answered ``error`` instead, its records emptied (:func:`fetch_failure`),
        recorded as a "failed" event before the answer's. The client never sees those
        records in that answer and fetches them again. librdkafka hands most codes to the
        application (``poll()`` returns a message whose ``error()`` is it, then goes on),
        TOPIC_AUTHORIZATION_FAILED among them; retriable ones such as
        NOT_LEADER_OR_FOLLOWER it handles itself, unseen."""
        with self._changed:
            self._failing = (error, count) if count > 0 else None

    def on_request(self, api_key: int, action: Callable[[KafkaRequest], object]) -> None:
        """Call ``action(request)`` when a request of ``api_key`` arrives, before it is
        held, dropped or forwarded (on the proxy's thread: keep it short)."""
        with self._lock:
            self._hooks.setdefault(api_key, []).append(action)

    def _rule(self, api_key: int, rule: Rule, count: int | None = None) -> None:
        with self._changed:
            self._rules[api_key] = (rule, count)
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            listeners, sockets = list(self._listeners.values()), list(self._sockets)
        for sock in listeners:
            try:  # wakes the accept() thread (Linux)
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for sock in sockets:
            sock.close()

    # -- the proxy

    def _port_for(self, host: str, port: int) -> int:
        """The proxy's port for the broker at (host, port), listening from now on."""
        with self._lock:
            listener = self._listeners.get((host, port))
            if listener is None:
                listener = socket.create_server(("127.0.0.1", 0))
                self._listeners[(host, port)] = listener
                threading.Thread(target=self._accept, args=(listener, (host, port)),
                                 daemon=True).start()
            return int(listener.getsockname()[1])

    def _accept(self, listener: socket.socket, target: tuple[str, int]) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(target, timeout=10)
                upstream.settimeout(None)
            except OSError as exc:
                client.close()
                self.errors.append(f"connecting to the broker {target}: {exc}")
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._connections += 1
                number = self._connections
                self._sockets += [client, upstream]
            pending: dict[int, KafkaRequest] = {}
            sending = threading.Lock()  # whole answers to the client, from either thread
            threading.Thread(target=self._requests,
                             args=(client, upstream, number, pending, sending),
                             daemon=True).start()
            threading.Thread(target=self._answers, args=(upstream, client, pending, sending),
                             daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, number: int,
                  pending: dict[int, KafkaRequest], sending: threading.Lock) -> None:
        """Client -> broker: record each request, apply the hooks and rules, forward."""
        buffer = bytearray()
        try:
            while (frame := _read_frame(client, buffer)) is not None:
                request, body = parse_request(frame, number)
                with self._changed:
                    pending[request.correlation_id] = request
                    self._held += (counted := self._rules.get(request.api_key, ("",))[0] == "hold")
                    self._events.append(KafkaEvent("request", request))
                    self._changed.notify_all()
                    hooks = list(self._hooks.get(request.api_key, ()))
                for hook in hooks:
                    try:
                        hook(request)
                    except Exception as exc:  # noqa: BLE001 - the test reads errors
                        self.errors.append(f"on_request({request.name}): {exc!r}")
                what = self._decide(request, client, counted)
                if what == "forwarded":
                    upstream.sendall(frame)
                    continue
                with self._changed:
                    self._events.append(KafkaEvent(what, request))
                    self._changed.notify_all()
                if what == "refused":
                    self._answer(client, sending, pending, request,
                                 offset_commit_refusal(frame, body, request.api_version))
                else:
                    with self._lock:
                        pending.pop(request.correlation_id, None)
        except OSError:
            pass
        finally:
            try:
                upstream.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _decide(self, request: KafkaRequest, client: socket.socket, counted: bool) -> EventKind:
        """What to do with ``request`` (wait while held, unless its client goes: "forwarded",
        "dropped", "refused" or "gone"); ``counted``: in held() since seen, taken over."""
        with self._changed:
            self._held -= counted
            while True:
                rule, count = self._rules.get(request.api_key, ("forward", None))
                if rule != "hold" or self._closed:
                    break
                self._held += 1
                try:
                    self._changed.wait(0.05)  # wakes to notice a client that went away
                finally:
                    self._held -= 1
                if _closed_by_peer(client):
                    return "gone"
            if rule == "drop":
                return "dropped"
            if rule == "refuse" and request.api_version > 9:
                self.errors.append(f"cannot refuse {request.name} v{request.api_version}")
            elif rule == "refuse":
                if count is not None:
                    self._rules[request.api_key] = (
                        ("refuse", count - 1) if count > 1 else ("forward", None))
                return "refused"
            return "forwarded"

    def _answers(self, upstream: socket.socket, client: socket.socket,
                 pending: dict[int, KafkaRequest], sending: threading.Lock) -> None:
        """Broker -> client: point broker addresses back at the proxy, record, forward."""
        buffer = bytearray()
        try:
            while (frame := _read_frame(upstream, buffer)) is not None:
                (correlation,) = struct.unpack_from(">i", frame, 4)
                with self._lock:
                    request = pending.get(correlation)
                if request is not None and request.api_key in _ADDRESS_RESPONSES:
                    frame = self._rewrite_addresses(frame)
                if request is not None and request.api_key == FETCH:
                    frame = self._fail_fetch(request, frame)
                if request is not None:
                    with self._changed:
                        while request.api_key in self._held_answers and not self._closed:
                            self._changed.wait(0.05)
                self._answer(client, sending, pending, request, frame)
        except OSError:
            pass
        finally:
            try:
                client.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _fail_fetch(self, request: KafkaRequest, frame: bytes) -> bytes:
        """``frame`` (the answer to the Fetch ``request``), failed if :meth:`fail_fetches`
        asks for it and it carries records."""
        with self._changed:
            if self._failing is None:
                return frame
            error, left = self._failing
            try:
                failed = fetch_failure(frame, request.api_version, error)
            except (ValueError, struct.error, IndexError) as exc:
                self.errors.append(f"failing a Fetch v{request.api_version} answer: {exc!r}")
                return frame
            if failed is None:
                return frame
            self._failing = (error, left - 1) if left > 1 else None
            self._events.append(KafkaEvent("failed", request))
            self._changed.notify_all()
            return failed

    def _answer(self, client: socket.socket, sending: threading.Lock,
                pending: dict[int, KafkaRequest], request: KafkaRequest | None,
                frame: bytes) -> None:
        """Record the answer to ``request`` (before the client can act on it), send it."""
        if request is not None:
            with self._changed:
                pending.pop(request.correlation_id, None)
                self._events.append(KafkaEvent("answer", request))
                self._changed.notify_all()
        with sending:
            client.sendall(frame)

    def _rewrite_addresses(self, frame: bytes) -> bytes:
        """Every broker port that follows a broker host string (compact or classic) ->
        the proxy's port for that broker. Same 4-byte width: sizes do not change."""
        with self._lock:
            hosts = {host for host, _ in self._listeners}
        data = bytearray(frame)
        for host in hosts:
            raw = host.encode()
            for prefix in (bytes([len(raw) + 1]) + raw, struct.pack(">h", len(raw)) + raw):
                start = 0
                while (found := data.find(prefix, start)) >= 0:
                    at = found + len(prefix)
                    start = at
                    if at + 4 > len(data):
                        break
                    (port,) = struct.unpack_from(">i", data, at)
                    if 0 < port < 65536:
                        struct.pack_into(">i", data, at, self._port_for(host, port))
        return bytes(data)


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock``, even with bytes it sent still unread."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLRDHUP)
        return any(mask & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL)
                   for _fd, mask in poller.poll(0))
    except (OSError, ValueError):
        return True
