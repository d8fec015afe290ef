"""Closing a TCP connection: gracefully (FIN, half-close, drain) or abortively (RST).

Implement the three functions below with the socket module only.
"""

from __future__ import annotations

import socket
from collections.abc import Callable


def graceful_close(sock: socket.socket) -> bytes:
    """Active, orderly close: send our FIN, keep reading until the peer's FIN, close.

    Returns the bytes the peer sent after our FIN.
    """
    # TODO: shutdown(SHUT_WR), recv() until b"", then close()
    raise NotImplementedError("graceful_close: send FIN with shutdown(SHUT_WR), drain to EOF")


def abortive_close(sock: socket.socket) -> None:
    """Abort the connection: the peer must see a reset (RST), not an orderly EOF."""
    # TODO: SO_LINGER with a zero timeout, then close()
    raise NotImplementedError("abortive_close: set SO_LINGER (on, 0 s) and close")


def serve_until_eof(sock: socket.socket, handler: Callable[[bytes], bytes]) -> None:
    """Read the request until the client's FIN, send handler(request), close."""
    # TODO: recv() until b"", sendall(handler(request)), close()
    raise NotImplementedError("serve_until_eof: read to EOF, then answer on the open half")
