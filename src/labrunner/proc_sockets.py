"""The kernel's TCP socket tables (/proc/net/tcp and tcp6), one connection's socket by its
address pair (sock_diag), and the sockets one process holds. No pytest, nothing heavy: the
verification reads them, and so may code a lab runs in the learner's process (ph6.10 counts,
at the app's exit, the connections it still holds)."""

from __future__ import annotations

import os
import socket
import struct
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


# sock_diag (netlink family 4): one inet_diag request, answered by the kernel's own lookup.
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, _NLMSG_HEADER = 4, 20, 0x1, 16


def connection_socket(local: tuple[str, int], remote: tuple[str, int]) -> TcpSocket | None:
    """One IPv4 connection's socket at its ``local`` end, looked up by its exact address pair
    through sock_diag netlink (what ``ss`` asks; no dump of the table): reading the whole of
    /proc/net/tcp takes a fifth of a second with the thousands of sockets a loaded machine
    holds, and a verification that watches a connection step by step reads it hundreds of
    times. Never a TIME_WAIT socket (an earlier connection's, from a client port loopback
    reused) nor the port's listening socket (the kernel's lookup falls back to it once the
    pair is gone): None then, and when there is no such connection. Where netlink is refused,
    the same answer from the table."""
    # inet_diag_req_v2: family, protocol, ext, pad, states; inet_diag_sockid: sport, dport
    # (network order), src[16], dst[16], interface, cookie (none: ~0 twice).
    req = struct.pack("=BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)
    req += struct.pack("!HH", local[1], remote[1])
    req += socket.inet_aton(local[0]) + bytes(12) + socket.inet_aton(remote[0]) + bytes(12)
    req += struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)
    header = struct.pack("=IHHII", _NLMSG_HEADER + len(req), _SOCK_DIAG_BY_FAMILY,
                         _NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(10)
            nl.sendall(header + req)
            data = nl.recv(65536)
    except OSError:
        return next((s for s in tcp_sockets() if (s.local, s.remote) == (local, remote)
                     and s.state not in (TIME_WAIT, LISTEN)), None)
    length, kind = struct.unpack_from("=IH", data, 0) if len(data) >= _NLMSG_HEADER else (0, 2)
    msg = data[_NLMSG_HEADER:length]
    if kind != _SOCK_DIAG_BY_FAMILY or len(msg) < 72:   # NLMSG_ERROR: ENOENT, no such socket
        return None
    # inet_diag_msg: family, state, timer, retrans, the sockid (as asked), expires, then
    # rqueue, wqueue, uid, inode.
    state = msg[1]
    if msg[4:12] + msg[24:28] != req[8:16] + req[28:32] or state in (TIME_WAIT, LISTEN):
        return None
    rx_queue, tx_queue, _uid, inode = struct.unpack_from("=IIII", msg, 56)
    return TcpSocket(local, remote, state, tx_queue, rx_queue, inode)
