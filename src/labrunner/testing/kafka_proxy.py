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

from .kafka_wire import (
    ADD_OFFSETS_TO_TXN,
    API_NAMES,
    CONSUMER_GROUP_HEARTBEAT,
    DESCRIBE_CLUSTER,
    END_TXN,
    FETCH,
    FIND_COORDINATOR,
    HEARTBEAT,
    INIT_PRODUCER_ID,
    JOIN_GROUP,
    LEAVE_GROUP,
    LIST_OFFSETS,
    METADATA,
    OFFSET_COMMIT,
    PRODUCE,
    REFUSAL_ERROR,
    SYNC_GROUP,
    TOPIC_AUTHORIZATION_FAILED,
    TXN_OFFSET_COMMIT,
    KafkaRequest,
    fetch_failure,
    offset_commit_refusal,
    parse_request,
)

# Labs import the API keys and the wire helpers from here, as before kafka_wire was split off.
__all__ = [
    "ADD_OFFSETS_TO_TXN",
    "API_NAMES",
    "CONSUMER_GROUP_HEARTBEAT",
    "DESCRIBE_CLUSTER",
    "END_TXN",
    "FETCH",
    "FIND_COORDINATOR",
    "HEARTBEAT",
    "INIT_PRODUCER_ID",
    "JOIN_GROUP",
    "LEAVE_GROUP",
    "LIST_OFFSETS",
    "METADATA",
    "OFFSET_COMMIT",
    "PRODUCE",
    "REFUSAL_ERROR",
    "SYNC_GROUP",
    "TOPIC_AUTHORIZATION_FAILED",
    "TXN_OFFSET_COMMIT",
    "KafkaRequest",
    "fetch_failure",
    "offset_commit_refusal",
    "parse_request",
    "KafkaEvent",
    "KafkaProxy",
]

# The responses that name brokers (host, port): rewritten to point back at the proxy.
_ADDRESS_RESPONSES = (METADATA, FIND_COORDINATOR, DESCRIBE_CLUSTER)

Rule = Literal["forward", "hold", "drop", "refuse"]
EventKind = Literal["request", "answer", "forwarded", "dropped", "refused", "gone", "failed"]


@dataclass(frozen=True)
class KafkaEvent:
    """What the proxy saw or did, in order: a request arrived ("request"), its answer left
    for the client ("answer"), or the proxy did not forward it as sent: "dropped",
    "refused" (answered with an error, never forwarded), "gone" (held while its client closed
    the connection: never forwarded); or its answer left changed: "failed" (a Fetch answer
    whose records the proxy replaced with an error, recorded before its "answer")."""

    kind: EventKind
    request: KafkaRequest


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
