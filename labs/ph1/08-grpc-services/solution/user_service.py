"""ph1.8 - UserService: one rpc of each kind, on grpcio.

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
        user = self._users.get(user_id)
        if user is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no user {user_id!r}")
        return user

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
        # All or nothing, as a batch create is (AIP-233): a bad request anywhere in the
        # stream fails the rpc and none of its users is stored - the client, told the batch
        # failed, never learns their ids and could neither read nor remove them.
        batch: list[user_pb2.UserResponse] = []
        for request in request_iterator:  # each message is checked as it arrives
            if not request.username or not request.email:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              "username and email are required")
            batch.append(user_pb2.UserResponse(
                user_id=uuid.uuid4().hex, username=request.username, email=request.email,
                created_at=int(self._clock())))
        with self._lock:  # the stream ended well: store the whole batch at once
            self._users.update((user.user_id, user) for user in batch)
        return user_pb2.CreateUsersSummary(created=len(batch),
                                           user_ids=[user.user_id for user in batch])

    def UpdateUsers(self, request_iterator: Iterator[user_pb2.UpdateUserRequest],
                    context: grpc.ServicerContext) -> Iterator[user_pb2.UserResponse]:
        for request in request_iterator:
            with self._lock:
                current = self._find(request.user_id, context)
                # proto3 strings carry no presence: "" is "not set", so the update changes
                # only the fields it sets (AIP-134: with no update_mask, the populated
                # fields), and one that sets none changes nothing.
                updated = user_pb2.UserResponse(
                    user_id=current.user_id, created_at=current.created_at,
                    username=request.username or current.username,
                    email=request.email or current.email)
                self._users[updated.user_id] = updated
                for watcher in self._watchers[updated.user_id]:
                    watcher.put(updated)
            yield updated  # answered before the next request is read
