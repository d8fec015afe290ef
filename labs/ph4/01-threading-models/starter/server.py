"""One HTTP server three ways: a thread per connection, a bounded pool of workers with a
queue (503 when it is full), and asyncio on one thread. See README.md.

    python server.py threads
    python server.py pool --workers 8 --queue 16
    python server.py asyncio

main() (at the bottom, given) binds the listening socket, prints "listening on <port>" and
hands the socket to the serve_* function of the model asked for. The request helpers
(read_request, handle, the responses) are given too: the models are yours.
"""

from __future__ import annotations

import argparse
import asyncio
import queue  # noqa: F401 - for the pool
import socket
import threading  # noqa: F401 - for the threads

HEAD_END = b"\r\n\r\n"
MAX_HEAD = 16 * 1024


class ClientGone(Exception):
    """The client closed or reset its connection before its request was complete."""


def path_of(head: bytes) -> str:
    """The path of a request head's first line ("GET /a HTTP/1.1" -> "/a")."""
    parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
    return parts[1] if len(parts) == 3 else "/"


def response(status: int, body: bytes) -> bytes:
    reason = {200: "OK", 503: "Service Unavailable"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def answer(path: str) -> bytes:
    """The 200 response to a request for ``path``."""
    return response(200, f"hello {path}\n".encode())


BUSY = response(503, b"busy: every worker is taken and the queue is full, retry later\n")


def read_request(conn: socket.socket) -> str:
    """Read one request head from a blocking socket and return its path. A slow client
    keeps this waiting as long as it likes. Raises ClientGone if the client closes or
    resets the connection first."""
    buf = b""
    while HEAD_END not in buf:
        try:
            chunk = conn.recv(4096)
        except ConnectionError as exc:
            raise ClientGone(f"connection reset mid-request: {exc}") from exc
        if not chunk:
            raise ClientGone("the client closed its connection mid-request")
        buf += chunk
        if len(buf) > MAX_HEAD:
            raise ClientGone("request head too large")
    return path_of(buf)


def handle(conn: socket.socket) -> None:
    """Serve one connection on the calling thread: read its request, answer it, close it.
    Raises ClientGone (after closing) if the client went away mid-request."""
    try:
        path = read_request(conn)
        conn.sendall(answer(path))
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------
# 1. A thread per connection


def serve_thread_per_connection(listener: socket.socket) -> None:
    """Accept forever; each connection gets a thread of its own that serves it (handle())
    and ends, also when the client leaves mid-request (ClientGone)."""
    raise NotImplementedError(
        "serve_thread_per_connection(): accept in a loop and start a thread per accepted "
        "connection that runs handle(conn)")


# ---------------------------------------------------------------------------------------
# 2. A bounded pool of workers with a bounded queue


def serve_bounded_pool(listener: socket.socket, workers: int, queue_size: int) -> None:
    """``workers`` threads, started once, serve connections taken from a queue of at most
    ``queue_size`` waiting connections. When every worker is busy and the queue is full
    (``--queue 0``: no waiting room at all), the accept loop answers BUSY (503) at once and
    closes the connection."""
    raise NotImplementedError(
        "serve_bounded_pool(): start `workers` threads that serve connections from a queue; "
        "admit at most workers + queue_size connections at once and answer BUSY (503) to "
        "the next at once (queue.Queue(maxsize=0) is unbounded, not zero)")


# ---------------------------------------------------------------------------------------
# 3. asyncio: one thread, one event loop


async def handle_async(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """handle() for the event loop: read the head with await reader.readuntil(HEAD_END),
    answer it, close the writer; a client that leaves mid-request must not leak it."""
    raise NotImplementedError("handle_async(): await the request head, answer, close")


async def serve_asyncio(listener: socket.socket) -> None:
    """Serve every connection from one event loop on the calling thread."""
    raise NotImplementedError(
        "serve_asyncio(): serve the listener with asyncio.start_server(handle_async, "
        "sock=listener) on this one thread")


# ---------------------------------------------------------------------------------------
# Given: pick the model from the command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["threads", "pool", "asyncio"])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--queue", type=int, default=16)
    args = parser.parse_args()
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    print(f"listening on {listener.getsockname()[1]}", flush=True)
    if args.model == "threads":
        serve_thread_per_connection(listener)
    elif args.model == "pool":
        serve_bounded_pool(listener, args.workers, args.queue)
    else:
        asyncio.run(serve_asyncio(listener))


if __name__ == "__main__":
    main()
