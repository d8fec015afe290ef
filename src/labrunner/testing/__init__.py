"""Helpers for lab verifications: the peers and probes several labs' tests need.

One module a concern (http, grpc, tls, kafka, redis, pg, beside: the learner's process,
waiting); every public name is importable from here, as labs import them.

A verification imports what it needs (``from labrunner.testing import serve_wsgi``):

* :func:`serve_wsgi` runs a learner's WSGI app behind a real threaded HTTP server on
  ``127.0.0.1:0``, and :func:`http_request` sends it one real request with ``http.client``
  (an :class:`HttpReply` comes back);
* :func:`redis_commands` records, with ``MONITOR``, the commands executed in the test's own
  Redis database while a block runs (:func:`timed_redis_commands`: with the server's time
  of each); :func:`redis_gate` puts a :class:`RedisGate` between a learner's Redis
  client and the server, calling a hook of the test's before each command (act there,
  or hold the command: a read-modify-write interleaved step by step); :func:`assert_decoded`
  fails a reply that is bytes, or the text of bytes, where text was expected;
* :class:`PgStatementProxy` is a TCP proxy in front of Postgres that reads the frontend
  protocol and records every statement clients ask the server to run, so a verification can
  count queries on the wire instead of trusting the learner's code (:class:`StatementGate`
  holds a connection's n-th statement until released);
* :func:`wait_until` waits for an observable condition (a lock wait, a row) instead of
  sleeping for a guessed time, and fails the test saying what never happened;
* :func:`serve_tls_once` and :func:`tls_exchange` run a TLS server or client with a context
  in the process the context lives in (the learner's own, when grading);
* :func:`threads_waiting_in`, :func:`learner_threads` and :func:`file_bytes` observe the
  learner's process from inside it (:func:`local_timezone` sets its local zone), and
  :func:`process_threads` / :func:`process_resources` count the threads
  (descriptors, memory; :func:`process_address_space` its mapped KiB) of a learner's
  program beside it, through ``learner.run_helper``,
  and :func:`process_activity` tells whether it sleeps while work waits for it
  (:func:`thread_times`: how long and how often each thread slept, as the scheduler counted)
  (:func:`asleep_throughout` two readings; :func:`cpu_burnt_while_idle`: a busy loop);
  :func:`open_descriptors`, :func:`open_files_limit` and :func:`epoll_interest` read which
  descriptors it holds, its limit on them and what its epoll sets watch, and
  :func:`program_reading` runs one of them where the program's /proc can be seen;
* :func:`call` is the request most HTTP labs send (a JSON document or bytes, headers);
* :func:`read_all` reads a Kafka topic back to its end (:class:`KafkaRecord`);
* :class:`KafkaProxy` is a TCP proxy in front of the Kafka broker that reads the protocol:
  every request a learner's client sends (a Produce's ``acks``, OffsetCommit vs
  TxnOffsetCommit), held, dropped, refused or met with a test's action (a SIGKILL) at the
  moment it arrives - or forwarded with the broker's answer held back (a reply overtaking
  the acknowledgement of its request), or a Fetch answer failed with a partition error (a
  consumer error reaching ``poll()``);
* :func:`signals_caught` reads which signals a learner's program handles (a SIGTERM
  handler that never lets it end vs no handler), :func:`objects_alive` counts objects of
  named classes the learner's process keeps alive (waiters left behind by timed-out calls);
* :class:`TcpRelay` sits between a learner's client and a real server and hands every
  chunk, each way, to a hook of the test's (count it, hold it, act between two commands,
  answer in the server's place);
* :func:`drain` reads a gRPC response stream on a thread, :func:`next_message` takes its
  next message or fails saying what never came;
* :func:`verdict` calls the learner's code where a refusal is an answer ("ok" or
  "refused"), failing the test on what is neither;
* :func:`generate_stubs` compiles a learner's ``.proto`` with grpcio-tools, at test time, into
  importable ``*_pb2`` / ``*_pb2_grpc`` modules (:class:`ProtoStubs`).

Everything here fails a test with ``pytest.fail(..., pytrace=False)`` where the cause is the
learner's (a ``.proto`` protoc rejects, a body that is not JSON), like the plugin does.
"""

from ..proc_sockets import (
    CLOSE_WAIT,
    ESTABLISHED,
    LISTEN,
    TCP_STATES,
    TIME_WAIT,
    TcpSocket,
    connection_socket,
    process_tcp_sockets,
    tcp_sockets,
)
from .beside import (
    Activity,
    asleep_throughout,
    cpu_burnt_while_idle,
    epoll_interest,
    file_bytes,
    learner_threads,
    listening_ports,
    local_timezone,
    open_descriptors,
    open_files_limit,
    own_cpu_seconds,
    process_activity,
    process_address_space,
    process_resources,
    process_threads,
    program_reading,
    thread_times,
    threads_waiting_in,
)
from .grpc import DaemonExecutor, ProtoStubs, drain, generate_stubs, next_message, serve_grpc
from .http import HttpReply, call, http_request, read_http_request, serve_wsgi
from .kafka import KafkaRecord, read_all
from .kafka_proxy import API_NAMES, KafkaEvent, KafkaProxy, KafkaRequest
from .pg import TRANSACTION_CONTROL, PgStatementProxy, StatementGate
from .redis import (
    CONNECTION_SETUP,
    RedisGate,
    assert_decoded,
    redis_commands,
    redis_gate,
    resp_command,
    timed_redis_commands,
)
from .relay import Outage, RelayLink, TcpRelay
from .signals import objects_alive, signals_caught
from .tls import TlsOnce, serve_tls_once, tls_exchange
from .verdicts import verdict
from .waiting import came_true, wait_until

__all__ = [
    "API_NAMES",
    "CONNECTION_SETUP",
    "TRANSACTION_CONTROL",
    "DaemonExecutor",
    "HttpReply",
    "KafkaEvent",
    "KafkaProxy",
    "KafkaRecord",
    "KafkaRequest",
    "PgStatementProxy",
    "StatementGate",
    "ProtoStubs",
    "RedisGate",
    "RelayLink",
    "Outage",
    "TcpRelay",
    "TcpSocket",
    "TlsOnce",
    "call",
    "drain",
    "epoll_interest",
    "file_bytes",
    "generate_stubs",
    "http_request",
    "read_http_request",
    "listening_ports",
    "local_timezone",
    "next_message",
    "objects_alive",
    "open_descriptors",
    "open_files_limit",
    "own_cpu_seconds",
    "process_activity",
    "process_address_space",
    "Activity",
    "asleep_throughout",
    "cpu_burnt_while_idle",
    "process_resources",
    "process_threads",
    "program_reading",
    "thread_times",
    "read_all",
    "assert_decoded",
    "redis_commands",
    "redis_gate",
    "resp_command",
    "serve_grpc",
    "serve_tls_once",
    "serve_wsgi",
    "signals_caught",
    "tcp_sockets",
    "connection_socket",
    "TCP_STATES",
    "ESTABLISHED",
    "TIME_WAIT",
    "CLOSE_WAIT",
    "LISTEN",
    "process_tcp_sockets",
    "threads_waiting_in",
    "learner_threads",
    "timed_redis_commands",
    "tls_exchange",
    "verdict",
    "wait_until",
    "came_true",
]
