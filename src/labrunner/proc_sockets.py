"""The kernel's TCP socket tables (/proc/net/tcp and tcp6), and the sockets one process
holds. No pytest, nothing heavy: the verification reads them, and so may code a lab runs in
the learner's process (ph6.10 counts, at the app's exit, the connections it still holds)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

BOTH_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")

# The kernel's TCP state numbers, as /proc/net/tcp gives them (include/net/tcp_states.h).
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1",
              5: "FIN_WAIT2", 6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK",
              10: "LISTEN", 11: "CLOSING"}
ESTABLISHED, TIME_WAIT, CLOSE_WAIT, LISTEN = 1, 6, 8, 10


@dataclass(frozen=True)
class TcpSocket:
    """One row of /proc/net/tcp: a TCP socket as the kernel sees it."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: int          # the kernel's TCP state number (TCP_STATES names it)
    tx_queue: int       # bytes sent and not yet acknowledged
    rx_queue: int       # bytes received and not yet read
    inode: int          # 0 while a connection waits in the listen backlog


def tcp_sockets(tables: tuple[str, ...] = ("/proc/net/tcp",)) -> list[TcpSocket]:
    """Every TCP socket of this network namespace, from /proc/net/tcp (and tcp6 when asked):
    the one parser the verifications that watch the kernel's view of a connection share."""
    def address(field: str) -> tuple[str, int]:
        ip_hex, port_hex = field.split(":")
        raw = bytes.fromhex(ip_hex)
        ip = (socket.inet_ntoa(raw[::-1]) if len(raw) == 4
              else socket.inet_ntop(socket.AF_INET6, b"".join(
                  raw[i:i + 4][::-1] for i in range(0, 16, 4))))
        return ip, int(port_hex, 16)

    found = []
    for table in tables:
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) < 10:
                continue
            tx, rx = cols[4].split(":")
            found.append(TcpSocket(address(cols[1]), address(cols[2]), int(cols[3], 16),
                                   int(tx, 16), int(rx, 16), int(cols[9])))
    return found


def process_tcp_sockets(pid: int | str = "self") -> list[TcpSocket]:
    """The TCP sockets process ``pid`` holds open (its descriptors' socket inodes, found in
    both tables); empty when it is gone or out of sight."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        return []
    return [sock for sock in tcp_sockets(BOTH_TABLES) if sock.inode in inodes]
