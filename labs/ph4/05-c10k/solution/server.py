"""A C10K echo server: one asyncio event loop (epoll underneath) on one thread holds every
connection. A connection costs a socket and a small object, not a thread and its stack.

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
