"""Closing a TCP connection: gracefully (FIN, half-close, drain) or abortively (RST).

A TCP connection is two independent byte streams. shutdown(SHUT_WR) ends *our* stream
with a FIN while we keep reading *theirs*; recv() returning b"" is *their* FIN. Whoever
sends the first FIN (the active closer) holds the connection in TIME_WAIT for 2*MSL so
that stray segments of this connection cannot corrupt a new one with the same ports.
An abortive close (SO_LINGER with a zero timeout) skips all of that: the kernel drops
anything unsent and sends RST; the peer sees "connection reset".
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

CHUNK = 65536


def _read_to_eof(sock: socket.socket) -> bytes:
    """Everything the peer sends until its FIN (recv() == b"")."""
    chunks = []
    while chunk := sock.recv(CHUNK):
        chunks.append(chunk)
    return b"".join(chunks)


def graceful_close(sock: socket.socket) -> bytes:
    """Active, orderly close: send our FIN, keep reading until the peer's FIN, close.

    Returns the bytes the peer sent after our FIN: a half-closed connection still
    delivers them. Because we send the first FIN, our side ends in TIME_WAIT.
    """
    try:
        sock.shutdown(socket.SHUT_WR)  # FIN: "I will send nothing more", reading stays open
        return _read_to_eof(sock)      # drain: the peer may still be answering
    finally:
        sock.close()


def abortive_close(sock: socket.socket) -> None:
    """Abort the connection: RST instead of FIN, no TIME_WAIT, unsent data discarded."""
    # SO_LINGER {l_onoff=1, l_linger=0}: close() resets the connection at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def serve_until_eof(sock: socket.socket, handler: Callable[[bytes], bytes]) -> None:
    """Passive side of a half-close: the request ends with the client's FIN.

    Read until EOF, send ``handler(request)`` on our still-open half, then close (our
    FIN comes second, so this side skips TIME_WAIT).
    """
    try:
        request = _read_to_eof(sock)
        sock.sendall(handler(request))
    finally:
        sock.close()
