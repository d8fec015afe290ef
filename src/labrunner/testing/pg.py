"""Postgres: statements counted on the wire, by a proxy that reads the frontend protocol."""

from __future__ import annotations

import re
import struct
import threading
from typing import Any, Literal, Self

from .relay import RelayLink, TcpRelay

# Requests a client may send before (or instead of) a StartupMessage: SSL, GSSAPI, cancel.
_PRE_STARTUP_CODES = (80877103, 80877104, 80877102)
TRANSACTION_CONTROL = re.compile(
    r"^\s*(BEGIN|START|COMMIT|END|ROLLBACK|SAVEPOINT|RELEASE|SET|SHOW|RESET|DISCARD|"
    r"DEALLOCATE|CLOSE|LISTEN|UNLISTEN)\b", re.IGNORECASE)


class PgStatementProxy(TcpRelay):
    """A :class:`TcpRelay` on 127.0.0.1:<free port> in front of Postgres that records each
    statement clients ask the server to run, reading the frontend protocol as it passes.

    A statement is a simple Query ('Q') or an execution of a Parse'd statement, so prepared
    statements count each time too. It is recorded before its bytes are forwarded: by the
    time a client has a result, its statement is in the log. Hand the learner
    :meth:`dsn_for` (no TLS, so every message can be read).

    Where verifications differ, the choice is a parameter:

    * ``count_on``: record an execution at its Execute message (``"execute"``, the portal's
      statement) or at its Bind (``"bind"``);
    * ``split``: a simple Query holding several statements separated by ``;`` records each
      (whitespace folded, empty ones left out) instead of the text as sent;
    * ``ignore``: statements matching this regex are not recorded (e.g.
      :data:`TRANSACTION_CONTROL`: BEGIN, COMMIT, SET ... are not queries).
    """

    def __init__(self, host: str, port: int, *,
                 count_on: Literal["execute", "bind"] = "execute", split: bool = True,
                 ignore: re.Pattern[str] | None = TRANSACTION_CONTROL) -> None:
        super().__init__((host, port))
        self._count_on = count_on
        self._split = split
        self._ignore = ignore
        self._log: list[str] = []
        self._rows = 0
        self._notices: list[str] = []

    @classmethod
    def for_dsn(cls, dsn: str, **options: Any) -> Self:
        """A proxy in front of the server ``dsn`` names (a TCP host and port)."""
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(dsn)
        return cls(str(info.get("host") or "127.0.0.1"), int(str(info.get("port") or 5432)),
                   **options)

    def dsn_for(self, dsn: str) -> str:
        """``dsn`` pointed at this proxy, with TLS and GSS encryption off."""
        from psycopg.conninfo import make_conninfo

        return make_conninfo(dsn, host="127.0.0.1", port=self.port, sslmode="disable",
                             gssencmode="disable")

    # -- reading the log

    def statements(self) -> list[str]:
        """Every statement recorded so far (since the last :meth:`take`)."""
        with self.lock:
            return list(self._log)

    def take(self) -> list[str]:
        """The statements recorded since the last take(), removed from the log."""
        with self.lock:
            log, self._log = self._log, []
        return log

    def count(self, pattern: str) -> int:
        """How many recorded statements match ``pattern`` (a regex, case-insensitive)."""
        regex = re.compile(pattern, re.IGNORECASE | re.DOTALL)
        with self.lock:
            return sum(1 for sql in self._log if regex.search(sql))

    # -- the proxy

    def _record(self, sql: str) -> None:
        if self._split:
            sql = " ".join(sql.split())
            if not sql:
                return
        if self._ignore is not None and self._ignore.match(sql):
            return
        with self.lock:
            self._log.append(sql)

    def before_forwarding(self, link: RelayLink, sql: str) -> None:
        """Called for each statement (as sent: before the log's whitespace folding and
        filter), in the thread of the connection ``link`` that sent it and before its
        bytes go on to the server. Nothing by default; a verification that must hold one
        connection's statement (two rotations stopped before their UPDATEs, to run them in
        the order it chooses) overrides it and blocks here."""

    def on_message(self, link: RelayLink, kind: bytes, body: bytes) -> None:
        """Called for each message a client sends after its startup (its type byte and
        body: b"Q" a query, b"X" Terminate - what a closing client sends last), in the
        thread of its connection ``link``, before its bytes go on. Nothing by default
        (ph6.10 marks the connections that ended with Terminate)."""

    def _statement(self, link: RelayLink, sql: str) -> None:
        self._record(sql)
        self.before_forwarding(link, sql)

    def take_rows(self) -> int:
        """How many rows the server sent to clients (DataRow messages) since the last
        take_rows(): what the learner's code read, whatever it then kept."""
        with self.lock:
            rows, self._rows = self._rows, 0
        return rows

    def take_notices(self) -> list[str]:
        """The primary text of every notice the server sent clients (NoticeResponse, e.g.
        auto_explain's plans at ``log_level = notice``) since the last take_notices(): read
        on the wire, so the learner's code can neither hide nor forge one."""
        with self.lock:
            notices, self._notices = self._notices, []
        return notices

    def downward(self, link: RelayLink, chunk: bytes) -> bool | None:
        """Server -> client: count DataRow messages, keep notices' texts, forward the bytes
        unchanged (a notice is kept before its bytes go on, so a client that has its
        result has its notices in the log). With TLS and GSS off (dsn_for) every server
        message is typed: a byte, then a length."""
        buffer: bytearray = link.state.setdefault("from_server", bytearray())
        buffer += chunk
        rows = pos = 0
        notices: list[str] = []
        while len(buffer) - pos >= 5:
            length = int.from_bytes(buffer[pos + 1:pos + 5], "big")
            if len(buffer) - pos < 1 + length:
                break
            if buffer[pos] == ord("D"):
                rows += 1
            elif buffer[pos] == ord("N"):
                notices.append(_primary_text(bytes(buffer[pos + 5:pos + 1 + length])))
            pos += 1 + length
        del buffer[:pos]
        if rows or notices:
            with self.lock:
                self._rows += rows
                self._notices += notices
        link.client.sendall(chunk)
        return None

    def upward(self, link: RelayLink, chunk: bytes) -> bool | None:
        """Client -> server: parse messages, record statements, forward the bytes unchanged.
        Before the StartupMessage, messages have no type byte."""
        state = link.state
        if "buffer" not in state:   # (the other direction keeps its own key here)
            state.update(buffer=bytearray(), started=False,
                         prepared={}, portals={})   # statement / portal name -> SQL
        buffer: bytearray = state["buffer"]
        buffer += chunk
        while True:
            if not state["started"]:
                if len(buffer) < 8:
                    break
                (length,) = struct.unpack("!I", buffer[:4])
                if len(buffer) < length:
                    break
                (code,) = struct.unpack("!I", buffer[4:8])
                state["started"] = code not in _PRE_STARTUP_CODES
                del buffer[:length]
                continue
            if len(buffer) < 5:
                break
            (length,) = struct.unpack("!I", buffer[1:5])
            if len(buffer) < 1 + length:
                break
            kind, body = bytes(buffer[:1]), bytes(buffer[5:1 + length])
            del buffer[:1 + length]
            self._message(link, kind, body, state["prepared"], state["portals"])
        link.upstream.sendall(chunk)
        return None

    def _message(self, link: RelayLink, kind: bytes, body: bytes, prepared: dict[bytes, str],
                 portals: dict[bytes, str]) -> None:
        self.on_message(link, kind, body)
        if kind == b"Q":
            text = body.split(b"\0", 1)[0].decode(errors="replace")
            for sql in text.split(";") if self._split else [text]:
                self._statement(link, sql)
        elif kind == b"P":  # Parse: statement name, query text
            name, query = body.split(b"\0")[:2]
            prepared[name] = query.decode(errors="replace")
        elif kind == b"B":  # Bind: portal name, statement name
            portal, statement = body.split(b"\0")[:2]
            if self._count_on == "bind":
                self._statement(link, prepared.get(statement, "?"))
            else:
                portals[portal] = prepared.get(statement, "")
        elif kind == b"E" and self._count_on == "execute":  # Execute: portal name
            self._statement(link, portals.get(body.split(b"\0")[0], ""))


class StatementGate(PgStatementProxy):
    """A :class:`PgStatementProxy` that holds the n-th statement its connection sends (BEGIN
    and COMMIT count) before it reaches the server, until released: one worker stopped
    before each of its statements in turn while another runs to its end (ph2.4's transfers,
    ph2.6's claims). ``arm(n)`` before the worker starts, ``held`` names the statement while
    it waits, ``release()`` lets it go (and disarms)."""

    def __init__(self, *args: Any, **options: Any) -> None:
        super().__init__(*args, **options)
        self._gate = threading.Condition()
        self._sent, self._hold_at = 0, 0
        self.held: str | None = None   # the statement held, while it is

    def arm(self, n: int) -> None:
        with self._gate:
            self._sent, self._hold_at, self.held = 0, n, None

    def release(self) -> None:
        with self._gate:
            self._hold_at = 0
            self._gate.notify_all()

    def before_forwarding(self, link: RelayLink, sql: str) -> None:
        with self._gate:
            self._sent += 1
            if self._sent != self._hold_at:
                return
            self.held = " ".join(sql.split())
            self._gate.wait_for(lambda: self._hold_at == 0, timeout=60)
            self.held = None


def _primary_text(fields: bytes) -> str:
    """The 'M' field (the primary message) of a NoticeResponse or ErrorResponse body: fields
    of a type byte and a NUL-terminated string, the list ended by a NUL."""
    for field in fields.split(b"\0"):
        if field[:1] == b"M":
            return field[1:].decode(errors="replace")
    return ""
