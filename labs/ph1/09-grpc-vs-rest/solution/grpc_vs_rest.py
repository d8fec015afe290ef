"""ph1.9 - the same 1,000 users as JSON over HTTP/1.1 and as protobuf over gRPC, measured.

What is measured is what crosses the TCP connection - headers, framing, connection setup,
flow-control frames and all - not the size of the payload in memory. A relay on loopback
sees exactly that: the client talks to the relay, the relay to the server, and every byte
in either direction is counted on the way through.

directory_pb2 and directory_pb2_grpc are generated from directory.proto (never committed):
    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. directory.proto
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypedDict

import directory_pb2
import directory_pb2_grpc
import grpc

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Measurement(TypedDict):
    users: int           # users decoded by the client
    bytes_sent: int      # client -> server, on the wire
    bytes_received: int  # server -> client, on the wire
    connections: int     # TCP connections opened
    seconds: float       # from before connecting until the last user was decoded


# ---- the two servers --------------------------------------------------------------------

def make_app(users: list[dict[str, Any]]) -> WSGIApp:
    body = json.dumps(users).encode()  # the representation never changes: encode it once

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        if environ.get("PATH_INFO") != "/users" or environ["REQUEST_METHOD"] != "GET":
            start_response("404 Not Found", [("Content-Length", "0")])
            return []
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    return app


class UserDirectory(directory_pb2_grpc.UserDirectoryServicer):
    def __init__(self, users: list[dict[str, Any]]) -> None:
        self._users = [directory_pb2.User(**user) for user in users]

    def ListUsers(self, request: directory_pb2.ListUsersRequest,
                  context: grpc.ServicerContext) -> directory_pb2.UserList:
        return directory_pb2.UserList(users=self._users)

    def StreamUsers(self, request: directory_pb2.ListUsersRequest,
                    context: grpc.ServicerContext) -> Iterator[directory_pb2.User]:
        yield from self._users


# ---- counting the bytes on the wire -----------------------------------------------------

class CountingRelay:
    """Listens on 127.0.0.1:<free port> and forwards every connection to `target`, counting
    the bytes of each direction."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.sent = self.received = self.connections = 0
        self._lock = threading.Lock()
        self._pumps: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # the listener was closed: no more connections
                return
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                # The server cannot be reached: end the client's connection at once, so the
                # failure reaches the client as it would without the relay (it fails now,
                # instead of waiting for an answer that cannot come).
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            for source, sink, upward in ((client, upstream, True), (upstream, client, False)):
                pump = threading.Thread(target=self._pump, args=(source, sink, upward),
                                        daemon=True)
                self._pumps.append(pump)
                pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket, upward: bool) -> None:
        try:
            while chunk := source.recv(65536):
                with self._lock:
                    if upward:
                        self.sent += len(chunk)
                    else:
                        self.received += len(chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:  # pass the end of the stream on, so the other side sees it too
            for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
                try:
                    sock.shutdown(how)
                except OSError:
                    pass

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, then wait until every relayed connection has ended."""
        try:  # on Linux, shutdown() is what wakes a thread blocked in accept()
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._acceptor.join(timeout)
        for pump in self._pumps:
            pump.join(timeout)
        for sock in self._sockets:
            sock.close()


def measured(target: str, fetch: Callable[[str], int]) -> Measurement:
    """Run fetch(relay_address) -> users decoded, through a fresh relay, and report."""
    relay = CountingRelay(target)
    try:
        start = time.perf_counter()
        users = fetch(relay.address)
        seconds = time.perf_counter() - start
    finally:
        relay.close()
    return Measurement(users=users, bytes_sent=relay.sent, bytes_received=relay.received,
                       connections=relay.connections, seconds=seconds)


# ---- the three measurements -------------------------------------------------------------

def measure_json(address: str) -> Measurement:
    def fetch(via: str) -> int:
        conn = http.client.HTTPConnection(via, timeout=30)
        try:
            conn.request("GET", "/users")
            response = conn.getresponse()
            return len(json.loads(response.read()))
        finally:
            conn.close()
    return measured(address, fetch)


def measure_grpc_unary(address: str) -> Measurement:
    def fetch(via: str) -> int:
        with grpc.insecure_channel(via) as channel:
            stub = directory_pb2_grpc.UserDirectoryStub(channel)
            return len(stub.ListUsers(directory_pb2.ListUsersRequest(), timeout=30).users)
    return measured(address, fetch)


def measure_grpc_stream(address: str) -> Measurement:
    def fetch(via: str) -> int:
        with grpc.insecure_channel(via) as channel:  # one channel: one TCP connection
            stub = directory_pb2_grpc.UserDirectoryStub(channel)
            return sum(1 for _ in stub.StreamUsers(directory_pb2.ListUsersRequest(),
                                                   timeout=30))
    return measured(address, fetch)


if __name__ == "__main__":  # a report to read: python grpc_vs_rest.py
    from concurrent.futures import ThreadPoolExecutor
    from wsgiref.simple_server import make_server

    people = [{"id": i, "username": f"user{i}", "email": f"user{i}@example.com",
               "created_at": 1_700_000_000 + i} for i in range(1, 1001)]
    http_server = make_server("127.0.0.1", 0, make_app(people))
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    grpc_server = grpc.server(ThreadPoolExecutor(4))
    directory_pb2_grpc.add_UserDirectoryServicer_to_server(UserDirectory(people), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    print(f"{'case':<22}{'sent':>8}{'received':>10}{'conns':>7}{'ms':>9}")
    for name, result in (
            ("JSON / HTTP/1.1", measure_json(f"127.0.0.1:{http_server.server_port}")),
            ("protobuf / gRPC unary", measure_grpc_unary(f"127.0.0.1:{port}")),
            ("protobuf / gRPC stream", measure_grpc_stream(f"127.0.0.1:{port}"))):
        print(f"{name:<22}{result['bytes_sent']:>8}{result['bytes_received']:>10}"
              f"{result['connections']:>7}{result['seconds'] * 1000:>9.1f}")
    grpc_server.stop(None)
    http_server.shutdown()
