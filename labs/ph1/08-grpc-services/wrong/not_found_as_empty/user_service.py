"""ph1.8 WRONG (not_found_as_empty): an unknown user_id gets an empty UserResponse with status OK.


user_pb2 and user_pb2_grpc are generated from user.proto (python -m grpc_tools.protoc ...);
they are build output, never committed.

The users live in memory; what the lab is about is the shape of each rpc:
- GetUser     unary: one request, one response, or a status such as NOT_FOUND;
- WatchUser   server-streaming: the current state, then every change, until the client
              goes away (cancel or deadline) - and then the handler must stop too;
- CreateUsers client-streaming: read requests as they come, answer once at the end;
- UpdateUsers bidirectional: answer each request as soon as it is read.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator

import grpc
import user_pb2
import user_pb2_grpc

_GONE = None  # put in a watcher's queue when its rpc ends


class UserService(user_pb2_grpc.UserServiceServicer):
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._users: dict[str, user_pb2.UserResponse] = {}
        self._watchers: dict[str, set[queue.SimpleQueue[user_pb2.UserResponse | None]]] = (
            defaultdict(set))

    def _find(self, user_id: str, context: grpc.ServicerContext) -> user_pb2.UserResponse:
        return self._users.get(user_id) or user_pb2.UserResponse()  # WRONG: OK, empty

    def GetUser(self, request: user_pb2.GetUserRequest,
                context: grpc.ServicerContext) -> user_pb2.UserResponse:
        with self._lock:
            return self._find(request.user_id, context)

    def WatchUser(self, request: user_pb2.GetUserRequest,
                  context: grpc.ServicerContext) -> Iterator[user_pb2.UserResponse]:
        changes: queue.SimpleQueue[user_pb2.UserResponse | None] = queue.SimpleQueue()
        with self._lock:
            current = self._find(request.user_id, context)
            # Registered under the same lock as the snapshot: no update falls in between.
            self._watchers[request.user_id].add(changes)
        try:
            # When the rpc ends (client cancel, deadline, disconnect) wake the loop below,
            # or this thread would wait for the next update forever.
            if not context.add_callback(lambda: changes.put(_GONE)):
                return
            yield current
            while (change := changes.get()) is not _GONE:
                yield change
        finally:
            with self._lock:
                self._watchers[request.user_id].discard(changes)

    def CreateUsers(self, request_iterator: Iterator[user_pb2.CreateUserRequest],
                    context: grpc.ServicerContext) -> user_pb2.CreateUsersSummary:
        created: list[str] = []
        for request in request_iterator:  # each message is handled as it arrives
            if not request.username or not request.email:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              "username and email are required")
            user = user_pb2.UserResponse(user_id=uuid.uuid4().hex, username=request.username,
                                         email=request.email, created_at=int(self._clock()))
            with self._lock:
                self._users[user.user_id] = user
            created.append(user.user_id)
        return user_pb2.CreateUsersSummary(created=len(created), user_ids=created)

    def UpdateUsers(self, request_iterator: Iterator[user_pb2.UpdateUserRequest],
                    context: grpc.ServicerContext) -> Iterator[user_pb2.UserResponse]:
        for request in request_iterator:
            with self._lock:
                current = self._find(request.user_id, context)
                updated = user_pb2.UserResponse(
                    user_id=current.user_id, created_at=current.created_at,
                    username=request.username or current.username,
                    email=request.email or current.email)
                self._users[updated.user_id] = updated
                for watcher in self._watchers[updated.user_id]:
                    watcher.put(updated)
            yield updated  # answered before the next request is read
