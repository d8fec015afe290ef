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
import queue
import socket
import threading

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


def serve_one(conn: socket.socket) -> None:
    try:
        handle(conn)
    except (ClientGone, OSError):
        pass   # the client left: nothing to answer, and the thread ends


def serve_thread_per_connection(listener: socket.socket) -> None:
    """Accept forever; each connection gets a thread of its own that serves it and ends."""
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


# ---------------------------------------------------------------------------------------
# 2. A bounded pool of workers with a bounded queue


def serve_bounded_pool(listener: socket.socket, workers: int, queue_size: int) -> None:
    """``workers`` threads, started once, serve connections taken from a queue of at most
    ``queue_size`` waiting connections. When every worker is busy and the queue is full, the
    accept loop answers 503 at once and closes the connection: load beyond capacity is
    refused, not hoarded."""
    # A slot per connection taken in, being served or waiting: workers + queue_size of them,
    # taken without waiting by the accept loop, given back when the connection is done.
    # (queue.Queue(maxsize=queue_size) is no such bound: maxsize=0 means unbounded.)
    slots = threading.BoundedSemaphore(workers + queue_size)
    waiting: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()

    def work() -> None:
        while True:
            conn = waiting.get()
            try:
                serve_one(conn)   # whatever the client did, the worker comes back for more
            finally:
                slots.release()

    for _ in range(workers):
        threading.Thread(target=work, daemon=True).start()
    while True:
        conn, _ = listener.accept()
        if slots.acquire(blocking=False):
            waiting.put(conn)
        else:
            reject(conn)


def reject(conn: socket.socket) -> None:
    try:
        conn.sendall(BUSY)
    except OSError:
        pass
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------
# 3. asyncio: one thread, one event loop


async def handle_async(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """handle() for the event loop: every wait is an await, so a slow client holds only
    its own coroutine, never the thread."""
    try:
        head = await reader.readuntil(HEAD_END)
        writer.write(answer(path_of(head)))
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass   # the client left mid-request
    finally:
        writer.close()


async def serve_asyncio(listener: socket.socket) -> None:
    """Serve every connection from one event loop on the calling thread."""
    server = await asyncio.start_server(handle_async, sock=listener)
    async with server:
        await server.serve_forever()


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
