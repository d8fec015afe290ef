"""A C10K echo server: one asyncio event loop (epoll underneath) on one thread holds every
connection. A connection costs a socket and a small object, not a thread and its stack,
and never more than its transport's write buffer: a client that does not read its echoes
is no longer read either.

    python server.py            prints "listening on <port>", echoes lines until EOF
"""

from __future__ import annotations

import asyncio


class Echo(asyncio.Protocol):
    """Protocol callbacks, not a coroutine per connection: the leanest per-connection state
    asyncio offers (about a kilobyte or two)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    # Flow control: a client that sends and does not read its echoes would have them pile up
    # in the transport's write buffer, without limit. The transport calls pause_writing()
    # when that buffer passes its high-water mark (64 KiB) and resume_writing() when it has
    # drained below the low one: stop reading that client meanwhile. Its bytes then wait in
    # the kernel, whose TCP window, once full, blocks the client's send().
    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close our side too


async def main() -> None:
    loop = asyncio.get_running_loop()
    # a deep accept backlog: thousands of clients connect within a second
    server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=4096)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
