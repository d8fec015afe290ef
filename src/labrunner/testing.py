"""Helpers for lab verifications: the peers and probes several labs' tests need.

A verification imports what it needs (``from labrunner.testing import serve_wsgi``):

* :func:`serve_wsgi` runs a learner's WSGI app behind a real threaded HTTP server on
  ``127.0.0.1:0``, and :func:`http_request` sends it one real request with ``http.client``
  (an :class:`HttpReply` comes back);
* :func:`redis_commands` records, with ``MONITOR``, the commands executed in the test's own
  Redis database while a block runs;
* :class:`PgStatementProxy` is a TCP proxy in front of Postgres that reads the frontend
  protocol and records every statement clients ask the server to run, so a verification can
  count queries on the wire instead of trusting the learner's code;
* :func:`wait_until` waits for an observable condition (a lock wait, a row) instead of
  sleeping for a guessed time, and fails the test saying what never happened;
* :func:`serve_tls_once` and :func:`tls_exchange` run a TLS server or client with a context
  in the process the context lives in (the learner's own, when grading);
* :func:`threads_waiting_in` and :func:`file_bytes` observe the learner's process from
  inside it, and :func:`process_threads` counts the threads of a learner's program beside
  it, through ``learner.run_helper``;
* :func:`generate_stubs` compiles a learner's ``.proto`` with grpcio-tools, at test time, into
  importable ``*_pb2`` / ``*_pb2_grpc`` modules (:class:`ProtoStubs`).

Everything here fails a test with ``pytest.fail(..., pytrace=False)`` where the cause is the
learner's (a ``.proto`` protoc rejects, a body that is not JSON), like the plugin does.
"""

from __future__ import annotations

import atexit
import hashlib
import http.client
import importlib
import importlib.resources
import importlib.util
import json
import queue
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, overload
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer, make_server

import pytest

if TYPE_CHECKING:
    from .services.kinds.redis import RedisDB

__all__ = [
    "HttpReply",
    "PgStatementProxy",
    "ProtoStubs",
    "file_bytes",
    "generate_stubs",
    "http_request",
    "redis_commands",
    "serve_tls_once",
    "serve_wsgi",
    "threads_waiting_in",
    "tls_exchange",
]


# --------------------------------------------------------------------------------------
# Where an object lives: a helper that must share its process runs there


def _lives_elsewhere(obj: Any) -> bool:
    """True for a proxy to an object in another process (the learner's, when grading)."""
    from .learner_process import remote_connection

    return remote_connection(obj) is not None


def _beside(obj: Any, helper: Callable[..., Any], *args: Any) -> Any:
    """``helper(obj, *args)`` run in the process ``obj`` lives in: the learner's own
    (grading) for the learner's objects, this one for the test's."""
    from .learner_process import remote_connection

    conn = remote_connection(obj)
    if conn is None:
        return helper(obj, *args)
    return conn.root.run_helper(helper.__module__, helper.__qualname__, (obj, *args))


def _entered(context: Any) -> tuple[Any, Callable[[], Any]]:
    """Enter a context manager here; return what it yields and how to leave it (a server
    the test stops when its block ends, from the other process)."""
    value = context.__enter__()
    return value, lambda: context.__exit__(None, None, None)


def _serve_wsgi_there(app: Any, http11: bool) -> tuple[str, Callable[[], Any]]:
    return _entered(serve_wsgi(app, http11=http11))


def _serve_grpc_there(servicer: Any, stubs_module: str, service: str,
                      workers: int) -> tuple[int, Callable[[], Any]]:
    return _entered(serve_grpc(servicer, stubs_module, service, workers))


# --------------------------------------------------------------------------------------
# A real HTTP server around a WSGI app, and a real client


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep output clean
        pass


class _ServerHandler11(ServerHandler):
    http_version = "1.1"  # wsgiref answers HTTP/1.0 by default

    def cleanup_headers(self) -> None:
        super().cleanup_headers()
        # wsgiref serves one request per connection (typeshed does not declare .headers)
        self.headers["Connection"] = "close"  # type: ignore[attr-defined]


class _QuietHandler11(_QuietHandler):
    """Answers with an HTTP/1.1 status line (and ``Connection: close``)."""

    def handle(self) -> None:
        self.raw_requestline = self.rfile.readline(65537)
        if not self.parse_request():
            return
        handler = _ServerHandler11(self.rfile, self.wfile,  # type: ignore[arg-type]
                                   self.get_stderr(), self.get_environ(), multithread=True)
        handler.request_handler = self  # type: ignore[attr-defined]
        handler.run(self.server.get_app())  # type: ignore[attr-defined]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15) -> None:
    """Wait for an observable condition (not for a guessed amount of time); fail the test
    with ``timed out after N s waiting for <what>``."""
    import pytest

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
        time.sleep(0.01)


@contextmanager
def serve_wsgi(app: Callable[..., Any], *, http11: bool = False) -> Iterator[str]:
    """Serve a WSGI app on 127.0.0.1:<free port> in a thread; yield ``"127.0.0.1:<port>"``.

    Each request runs on a daemon thread of its own (an app that hangs cannot keep the test
    process alive), and the server logs nothing. wsgiref answers HTTP/1.0; with
    ``http11=True`` the status line says HTTP/1.1 (and every answer carries
    ``Connection: close``, since wsgiref still serves one request per connection). The
    server is shut down when the block ends.

    An app that lives in the learner's own process (grading) is served there, so the
    server's calls into it (environ, start_response, the body it reads) stay local."""
    if _lives_elsewhere(app):
        address, stop = _beside(app, _serve_wsgi_there, http11)
        try:
            yield str(address)
        finally:
            stop()
        return
    handler = _QuietHandler11 if http11 else _QuietHandler
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadingServer,
                         handler_class=handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class DaemonExecutor(futures.Executor):
    """A fixed pool of daemon threads for a grpc server: a handler that never returns (a
    bug some tests look for) cannot keep the test process alive."""

    def __init__(self, workers: int) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(workers):
            threading.Thread(target=self._work, daemon=True).start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # noqa: BLE001 - handed to the future
                    future.set_exception(exc)

    def submit(self, fn: Callable[..., Any], /, *args: Any,
               **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        self._jobs.put((future, fn, args, kwargs))
        return future


@contextmanager
def serve_grpc(servicer: Any, stubs_module: str, service: str,
               workers: int = 4) -> Iterator[int]:
    """Serve ``servicer`` as ``service`` (registered by ``add_<service>Servicer_to_server``
    of the generated module ``stubs_module``, e.g. ``user_pb2_grpc``) in a grpc server on
    127.0.0.1:<free port> with ``workers`` daemon threads; yield the port.

    A servicer that lives in the learner's own process (grading) is served there, with that
    process's stubs (see ``learner.run_helper(generate_stubs, ...)``), so grpc's calls into it,
    ``context.abort()`` and streams stay local."""
    if _lives_elsewhere(servicer):
        port, stop = _beside(servicer, _serve_grpc_there, stubs_module, service, workers)
        try:
            yield int(port)
        finally:
            stop()
        return
    import grpc

    module = sys.modules.get(stubs_module) or importlib.import_module(stubs_module)
    server = grpc.server(DaemonExecutor(workers))
    getattr(module, f"add_{service}Servicer_to_server")(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


@dataclass
class HttpReply:
    """A response as received: status, headers and the whole body."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> Any:
        """The body parsed as JSON; a body that is not JSON fails the test."""
        try:
            return json.loads(self.body)
        except ValueError:
            pytest.fail(f"expected a JSON body, saw {self.body[:200]!r}", pytrace=False)


def http_request(host: str, method: str, path: str, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None, *, document: Any = None,
                 content_type: str | None = "application/json",
                 timeout: float = 15) -> HttpReply:
    """Send one request to ``host`` (``"127.0.0.1:<port>"``) on a fresh connection.

    ``document`` (when not None) is sent as the JSON-encoded body instead of ``body``. A
    request with a body carries ``Content-Type: <content_type>`` unless ``content_type`` is
    None; ``headers`` are added last and win."""
    if document is not None:
        body = json.dumps(document).encode()
    conn = http.client.HTTPConnection(host, timeout=timeout)
    try:
        implied = {"Content-Type": content_type} if body is not None and content_type else {}
        conn.request(method, path, body=body, headers={**implied, **(headers or {})})
        resp = conn.getresponse()
        return HttpReply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


# --------------------------------------------------------------------------------------
# Redis: the commands executed in the test's own database, read with MONITOR

_MONITOR_LINE = re.compile(r"^\S+ \[(\d+) (\S*)\] (.*)$")
_MONITOR_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')
# What a new connection sends before its first command: not the learner's commands.
CONNECTION_SETUP = frozenset({"SELECT", "HELLO", "AUTH", "CLIENT", "PING"})


@overload
def redis_commands(redis_db: RedisDB | Any, *, with_source: Literal[False] = False
                   ) -> AbstractContextManager[list[list[str]]]: ...


@overload
def redis_commands(redis_db: RedisDB | Any, *, with_source: Literal[True]
                   ) -> AbstractContextManager[list[tuple[str, list[str]]]]: ...


def redis_commands(redis_db: RedisDB | Any, *, with_source: bool = False
                   ) -> AbstractContextManager[list[Any]]:
    """Record the commands executed in ``redis_db``'s database while the block runs.

    Yields a list filled as commands arrive; each is ``[NAME, arg, ...]`` with the name in
    upper case, or with ``with_source=True`` a ``(source, [NAME, arg, ...])`` pair whose
    source is ``"lua"`` for a command a script ran, else the client's address. A new
    connection's setup chatter (SELECT, HELLO, AUTH, CLIENT, PING) is left out.

    MONITOR streams every command the server executes, in order, each line naming its
    database; a marker command the test sends after the block tells the reader it has seen
    everything up to there, so the list is complete when the block has ended."""
    return _monitor(redis_db, with_source)


@contextmanager
def _monitor(redis_db: Any, with_source: bool) -> Iterator[list[Any]]:
    commands: list[Any] = []
    marker = f"labrunner-end-{uuid.uuid4().hex}"
    watcher = redis_db.client(socket_timeout=15)
    conn = watcher.connection_pool.get_connection()
    conn.send_command("MONITOR")
    if conn.read_response() not in (b"OK", "OK"):
        pytest.fail("MONITOR was refused by the Redis server", pytrace=False)

    def read() -> None:
        while True:
            raw = conn.read_response()
            line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            match = _MONITOR_LINE.match(line)
            if not match or int(match.group(1)) != redis_db.db:
                continue
            args = [a.replace('\\"', '"') for a in _MONITOR_ARG.findall(match.group(3))]
            if args and args[-1] == marker:
                return
            if args and args[0].upper() not in CONNECTION_SETUP:
                command = [args[0].upper(), *args[1:]]
                commands.append((match.group(2), command) if with_source else command)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield commands
    finally:
        client = redis_db.client()
        client.echo(marker)
        client.close()
        reader.join(15)
        conn.disconnect()
        watcher.close()


# --------------------------------------------------------------------------------------
# Postgres: statements counted on the wire

# Requests a client may send before (or instead of) a StartupMessage: SSL, GSSAPI, cancel.
_PRE_STARTUP_CODES = (80877103, 80877104, 80877102)
TRANSACTION_CONTROL = re.compile(
    r"^\s*(BEGIN|START|COMMIT|END|ROLLBACK|SAVEPOINT|RELEASE|SET|SHOW|RESET|DISCARD|"
    r"DEALLOCATE|CLOSE|LISTEN|UNLISTEN)\b", re.IGNORECASE)


class PgStatementProxy:
    """A TCP proxy on 127.0.0.1:<free port> in front of Postgres that records each statement
    clients ask the server to run, reading the frontend protocol as it passes.

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
        self._target = (host, port)
        self._count_on = count_on
        self._split = split
        self._ignore = ignore
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._log: list[str] = []
        self._rows = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def for_dsn(cls, dsn: str, **options: Any) -> PgStatementProxy:
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
        with self._lock:
            return list(self._log)

    def take(self) -> list[str]:
        """The statements recorded since the last take(), removed from the log."""
        with self._lock:
            log, self._log = self._log, []
        return log

    def count(self, pattern: str) -> int:
        """How many recorded statements match ``pattern`` (a regex, case-insensitive)."""
        regex = re.compile(pattern, re.IGNORECASE | re.DOTALL)
        with self._lock:
            return sum(1 for sql in self._log if regex.search(sql))

    def close(self) -> None:
        try:  # wakes the accept() thread (Linux)
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    # -- the proxy

    def _record(self, sql: str) -> None:
        if self._split:
            sql = " ".join(sql.split())
            if not sql:
                return
        if self._ignore is not None and self._ignore.match(sql):
            return
        with self._lock:
            self._log.append(sql)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._frontend, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._backend, args=(upstream, client), daemon=True).start()

    def take_rows(self) -> int:
        """How many rows the server sent to clients (DataRow messages) since the last
        take_rows(): what the learner's code read, whatever it then kept."""
        with self._lock:
            rows, self._rows = self._rows, 0
        return rows

    def _backend(self, upstream: socket.socket, client: socket.socket) -> None:
        """Server -> client: count DataRow messages, forward the bytes unchanged. With TLS
        and GSS off (dsn_for) every server message is typed: a byte, then a length."""
        buffer = bytearray()
        try:
            while chunk := upstream.recv(65536):
                buffer += chunk
                rows = pos = 0
                while len(buffer) - pos >= 5:
                    length = int.from_bytes(buffer[pos + 1:pos + 5], "big")
                    if len(buffer) - pos < 1 + length:
                        break
                    if buffer[pos] == ord("D"):
                        rows += 1
                    pos += 1 + length
                del buffer[:pos]
                if rows:
                    with self._lock:
                        self._rows += rows
                client.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                client.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _frontend(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client -> server: parse messages, record statements, forward the bytes unchanged."""
        buffer = bytearray()
        started = False  # before the StartupMessage, messages have no type byte
        prepared: dict[bytes, str] = {}  # statement name -> SQL (Parse)
        portals: dict[bytes, str] = {}  # portal name -> SQL (Bind)
        try:
            while chunk := client.recv(65536):
                buffer += chunk
                while True:
                    if not started:
                        if len(buffer) < 8:
                            break
                        (length,) = struct.unpack("!I", buffer[:4])
                        if len(buffer) < length:
                            break
                        (code,) = struct.unpack("!I", buffer[4:8])
                        started = code not in _PRE_STARTUP_CODES
                        del buffer[:length]
                        continue
                    if len(buffer) < 5:
                        break
                    (length,) = struct.unpack("!I", buffer[1:5])
                    if len(buffer) < 1 + length:
                        break
                    kind, body = bytes(buffer[:1]), bytes(buffer[5:1 + length])
                    del buffer[:1 + length]
                    self._message(kind, body, prepared, portals)
                upstream.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                upstream.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _message(self, kind: bytes, body: bytes, prepared: dict[bytes, str],
                 portals: dict[bytes, str]) -> None:
        if kind == b"Q":
            text = body.split(b"\0", 1)[0].decode(errors="replace")
            for sql in text.split(";") if self._split else [text]:
                self._record(sql)
        elif kind == b"P":  # Parse: statement name, query text
            name, query = body.split(b"\0")[:2]
            prepared[name] = query.decode(errors="replace")
        elif kind == b"B":  # Bind: portal name, statement name
            portal, statement = body.split(b"\0")[:2]
            if self._count_on == "bind":
                self._record(prepared.get(statement, "?"))
            else:
                portals[portal] = prepared.get(statement, "")
        elif kind == b"E" and self._count_on == "execute":  # Execute: portal name
            self._record(portals.get(body.split(b"\0")[0], ""))


# --------------------------------------------------------------------------------------
# Observing the learner's process, and TLS endpoints made where a context lives


def threads_waiting_in(folder: str) -> int:
    """How many threads of this process sit in a ``threading`` wait (a Condition, an Event,
    a Semaphore: a pool's queue) called, at any depth, from code in ``folder``. Run it where
    the learner's code runs: ``learner.run_helper(threads_waiting_in, str(learner.dir))``."""
    prefix = str(folder).rstrip("/") + "/"
    waiting = 0
    for frame in sys._current_frames().values():
        in_wait = from_folder = False
        current: Any = frame
        while current is not None:
            code = current.f_code
            if code.co_name == "wait" and code.co_filename.endswith("threading.py"):
                in_wait = True
            elif code.co_filename.startswith(prefix):
                from_folder = True
            current = current.f_back
        waiting += in_wait and from_folder
    return waiting


def file_bytes(path: str) -> bytes:
    """A file's bytes, read where this runs: ``learner.run_helper(file_bytes, key)`` reads a
    file the learner's code made private to its own user (a 0600 key)."""
    return Path(path).read_bytes()


def process_threads(pid: int) -> int:
    """How many threads process ``pid`` runs (its entries in /proc/<pid>/task), or -1 when it
    is gone or out of sight. Run it where the learner's code runs:
    ``learner.run_helper(process_threads, proc.pid)`` counts the threads of a program that
    ``learner.python`` or ``learner.popen`` started, which under grading runs as the
    learner's uid, in a /proc where the verification's uid cannot see it (ph4.1)."""
    try:
        return sum(1 for _ in Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return -1


class TlsOnce:
    """A loopback TLS server for one connection: it accepts with ``ctx``, reads one message
    and answers ``b"pong:" + message``. ``error`` says how the handshake or exchange failed
    on the server's side (None: it completed)."""

    def __init__(self, ctx: Any, timeout: float) -> None:
        self._ctx = ctx
        self._timeout = timeout
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(timeout)
        self.port: int = self._listener.getsockname()[1]
        self.error: str | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import ssl

        try:
            conn, _ = self._listener.accept()
            conn.settimeout(self._timeout)
            with self._ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"pong:" + tls.recv(1024))
        except (OSError, ssl.SSLError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def wait(self) -> str | None:
        """Wait for the connection to end; the server's error, if any."""
        self._thread.join(self._timeout)
        return self.error

    def close(self) -> None:
        self.wait()
        self._listener.close()


def serve_tls_once(ctx: Any, timeout: float = 5.0) -> TlsOnce:
    """A :class:`TlsOnce` server with ``ctx``, started in the process ``ctx`` lives in (the
    learner's own when grading), so the context's handshake runs with its own sockets."""
    return _beside(ctx, TlsOnce, timeout)  # type: ignore[no-any-return]


def _tls_exchange_here(ctx: Any, port: int, server_hostname: str, message: bytes,
                       timeout: float) -> dict[str, Any]:
    import ssl

    seen: dict[str, Any] = {"version": None, "cipher": None, "error": None, "reply": b""}
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                suite = tls.cipher()
                seen["version"], seen["cipher"] = tls.version(), suite[0] if suite else None
                tls.sendall(message)
                seen["reply"] = tls.recv(1024)
        except (OSError, ssl.SSLError) as exc:
            seen["error"] = f"{type(exc).__name__}: {exc}"
    return seen


def tls_exchange(ctx: Any, port: int, server_hostname: str, message: bytes = b"ping",
                 timeout: float = 5.0) -> dict[str, Any]:
    """Connect to 127.0.0.1:``port`` with the client context ``ctx`` (in the process it
    lives in), send ``message``, read the reply. Returns plain data: ``version`` and
    ``cipher`` negotiated (None if the handshake failed), ``error``, ``reply``."""
    return _beside(ctx, _tls_exchange_here, port, server_hostname, message,  # type: ignore[no-any-return]
                   timeout)


# --------------------------------------------------------------------------------------
# gRPC: stubs generated from the learner's .proto


@dataclass
class ProtoStubs:
    """The modules protoc generated from one ``<name>.proto``."""

    pb2: ModuleType   # <name>_pb2: the messages (and the DESCRIPTOR)
    grpc: ModuleType  # <name>_pb2_grpc: the servicer base, add_..._to_server, the stub


_generated: dict[tuple[str, str], ProtoStubs] = {}


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the _pb2_grpc module and the learner import it by this name
    spec.loader.exec_module(module)
    return module


def generate_stubs(proto: Path, *, prefix: str | None = None) -> ProtoStubs:
    """protoc ``<name>.proto`` -> ``<name>_pb2.py`` + ``<name>_pb2_grpc.py`` in a temporary
    folder (removed at exit; stubs are never committed), imported and registered in
    ``sys.modules`` under those names, as the learner's code imports them.

    Generated once per content (protobuf refuses to load two different files of one name
    into one process); a file protoc rejects fails the test with protoc's message.
    ``prefix`` names the temporary folder."""
    stem = proto.stem
    key = (proto.name, hashlib.sha256(proto.read_bytes()).hexdigest())
    if key not in _generated:
        out = Path(tempfile.mkdtemp(prefix=prefix or f"{stem}-stubs-"))
        atexit.register(shutil.rmtree, out, True)
        well_known = importlib.resources.files("grpc_tools") / "_proto"
        done = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto.parent}", f"-I{well_known}",
             f"--python_out={out}", f"--grpc_python_out={out}", proto.name],
            capture_output=True, text=True, cwd=proto.parent, timeout=60)
        if done.returncode != 0:
            pytest.fail(f"protoc rejected {proto.name}: {done.stderr.strip()[:800]}",
                        pytrace=False)
        _generated[key] = ProtoStubs(_import(f"{stem}_pb2", out / f"{stem}_pb2.py"),
                                     _import(f"{stem}_pb2_grpc", out / f"{stem}_pb2_grpc.py"))
    stubs = _generated[key]
    sys.modules[f"{stem}_pb2"], sys.modules[f"{stem}_pb2_grpc"] = stubs.pb2, stubs.grpc
    return stubs
