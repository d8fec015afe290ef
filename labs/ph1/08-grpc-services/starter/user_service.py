"""ph1.8 - UserService: one rpc of each kind, on grpcio.

user_pb2 and user_pb2_grpc are generated from user.proto; generate them next to this file
while you work (do not commit them):

    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. user.proto
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import user_pb2
import user_pb2_grpc


class UserService(user_pb2_grpc.UserServiceServicer):
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._users: dict[str, user_pb2.UserResponse] = {}

    def GetUser(self, request: user_pb2.GetUserRequest,
                context: grpc.ServicerContext) -> user_pb2.UserResponse:
        # TODO: the user, or the status NOT_FOUND
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "GetUser is not implemented yet")

    def WatchUser(self, request: user_pb2.GetUserRequest,
                  context: grpc.ServicerContext) -> Iterator[user_pb2.UserResponse]:
        # TODO: the current state, then every update, until the client goes away
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "WatchUser is not implemented yet")

    # TODO: CreateUsers (client-streaming) and UpdateUsers (bidirectional), once user.proto
    # declares them.
