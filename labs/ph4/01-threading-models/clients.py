"""The verification's slow clients, run as a process of their own and driven over
stdin/stdout by the test, one JSON line per command and per reply. A client is slow
because the test holds it: it sends the first lines of its request and then nothing until
the test says "finish". Every connection reads whatever the server sends, until EOF.

    -> {"open": N, "send": "head"|"full"|"none"|"rst"|"huge", "port": P}   N new
    <- {"ports": [p, ...]}     connections to 127.0.0.1:P; "head" sends the start of a
                               request (no blank line), "full" the whole request in one
                               write, "none" nothing, "rst" resets each connection (RST)
                               right as connect() returns, before the server can have
                               written to it, "huge" a request head of HUGE bytes of
                               header lines that never ends (handed to the transport,
                               not waited for); the reply lists the clients' own ports
    -> {"finish": [i, ...]}                 send the rest of those requests
    <- {"ok": true}
    -> {"drop": [i, ...], "how": "fin"|"rst"}   close them (FIN) or abort them (RST)
    <- {"ok": true}
    -> {"state": true}                      what each connection got so far:
    <- {"conns": [[data, closed], ...]}       data (latin-1), closed: null|"eof"|"reset"
    -> {"quit": true}
Connections are numbered from 0 in the order they were opened.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys

LIMIT = 64 * 1024
CONNECT_TIMEOUT = 60.0
REST = b"X-Slow: released\r\n\r\n"   # the end of a request: "finish" sends it
HUGE = 1 << 20                        # bytes of header lines a "huge" head sends, no end


class Conn:
    def __init__(self, index: int) -> None:
        self.index = index
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.data = b""
        self.closed: str | None = None
        self.task: asyncio.Task[None] | None = None

    async def read_all(self) -> None:
        assert self.reader is not None
        try:
            while len(self.data) < LIMIT:
                chunk = await self.reader.read(4096)
                if not chunk:
                    self.closed = "eof"
                    return
                self.data += chunk
        except (ConnectionError, OSError):
            self.closed = "reset"


async def main() -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    conns: list[Conn] = []
    gate = asyncio.Semaphore(64)

    def reset_at_once(conn: Conn, port: int) -> int:
        """Connect and reset (SO_LINGER 0) in the next statement: the server's accept()
        hands over a connection its client has already reset."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.bind(("127.0.0.1", 0))
        own = int(sock.getsockname()[1])
        sock.connect(("127.0.0.1", port))
        sock.close()
        conn.closed = "reset"
        return own

    async def open_one(conn: Conn, send: str, port: int) -> int:
        async with gate:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT)
        conn.reader, conn.writer = reader, writer
        if send in ("head", "full"):
            writer.write(f"GET /c/{conn.index} HTTP/1.1\r\nHost: lab\r\n".encode()
                         + (REST if send == "full" else b""))
            await writer.drain()
        elif send == "huge":   # what the kernel does not take waits in the transport
            line = b"X-Pad: " + b"a" * 1017 + b"\r\n"
            writer.write(f"GET /c/{conn.index} HTTP/1.1\r\n".encode() + line * (HUGE // 1026))
        conn.task = asyncio.create_task(conn.read_all())
        return int(writer.get_extra_info("sockname")[1])

    def reply(doc: object) -> None:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()

    while True:
        line = await stdin.readline()
        if not line:
            break
        cmd = json.loads(line)
        try:
            if "open" in cmd:
                new = [Conn(len(conns) + i) for i in range(int(cmd["open"]))]
                conns.extend(new)
                port = int(cmd["port"])
                if cmd["send"] == "rst":
                    ports = [reset_at_once(c, port) for c in new]
                else:
                    ports = await asyncio.gather(*(open_one(c, cmd["send"], port)
                                                   for c in new))
                reply({"ports": ports})
            elif "finish" in cmd:
                for i in cmd["finish"]:
                    writer = conns[i].writer
                    assert writer is not None
                    try:
                        writer.write(REST)
                    except (ConnectionError, OSError, RuntimeError):
                        pass   # the server closed it already: state shows what came
                reply({"ok": True})
            elif "drop" in cmd:
                for i in cmd["drop"]:
                    writer = conns[i].writer
                    assert writer is not None
                    if cmd["how"] == "rst":
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                        writer.transport.abort()
                    else:
                        writer.close()
                reply({"ok": True})
            elif "state" in cmd:
                reply({"conns": [[c.data.decode("latin-1"), c.closed] for c in conns]})
            elif "quit" in cmd:
                break
        except Exception as exc:  # noqa: BLE001 - reported to the test
            reply({"error": f"{type(exc).__name__}: {exc}"})
    for c in conns:
        if c.writer is not None:
            c.writer.transport.abort()


if __name__ == "__main__":
    asyncio.run(main())
