"""gRPC: a server for a servicer (in the process it lives in), and stubs generated from the
learner's .proto at test time."""

from __future__ import annotations

import atexit
import hashlib
import importlib
import importlib.resources
import importlib.util
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .beside import _beside, _entered, _lives_elsewhere


def _serve_grpc_there(servicer: Any, stubs_module: str, service: str,
                      workers: int) -> tuple[int, Callable[[], Any]]:
    return _entered(serve_grpc(servicer, stubs_module, service, workers))


# --------------------------------------------------------------------------------------
# A real HTTP server around a WSGI app, and a real client


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


ANSWER_WITHIN = 3.0  # seconds to wait for a message that should come at once


def drain(stream: Any) -> queue.Queue[Any]:
    """Read a gRPC response stream on a thread into a queue, so a test can drive a stream in
    lock step (send one request, wait for its answer); the final item is the ``RpcError``
    that ended the stream, or None for a clean end."""
    import grpc

    out: queue.Queue[Any] = queue.Queue()

    def read() -> None:
        try:
            for message in stream:
                out.put(message)
            out.put(None)
        except grpc.RpcError as err:
            out.put(err)

    threading.Thread(target=read, daemon=True).start()
    return out


def next_message(out: queue.Queue[Any], what: str, timeout: float = ANSWER_WITHIN) -> Any:
    """The next message :func:`drain` read; fail the test saying ``what`` did not come (in
    ``timeout`` seconds, or because the stream failed or ended instead)."""
    import grpc

    try:
        item = out.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"{what}: nothing arrived within {timeout:.0f} s", pytrace=False)
    if isinstance(item, grpc.RpcError):
        pytest.fail(f"{what}: the stream failed with {item.code().name}: {item.details()}",
                    pytrace=False)
    if item is None:
        pytest.fail(f"{what}: the stream ended instead", pytrace=False)
    return item
