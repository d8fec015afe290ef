"""ph1.9 - the same 1,000 users as JSON over HTTP/1.1 and as protobuf over gRPC, measured.

directory_pb2 and directory_pb2_grpc are generated from directory.proto (never committed):
    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. directory.proto
See README.md for the exact interface.
"""

from __future__ import annotations

import json
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


def make_app(users: list[dict[str, Any]]) -> WSGIApp:
    body = json.dumps(users).encode()

    def app(environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
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


def measure_json(address: str) -> Measurement:
    """GET http://<address>/users once; report what crossed the wire."""
    raise NotImplementedError("measure_json: fetch /users through a counting relay")


def measure_grpc_unary(address: str) -> Measurement:
    """Call ListUsers once on a channel to <address>; report what crossed the wire."""
    raise NotImplementedError("measure_grpc_unary: call ListUsers through a counting relay")


def measure_grpc_stream(address: str) -> Measurement:
    """Read StreamUsers to the end on one channel to <address>; report what crossed the wire."""
    raise NotImplementedError("measure_grpc_stream: read StreamUsers through a counting relay")
