"""The memory-server daemon: a ZeroMQ socket in front of one ``MemoryStore``.

The socket speaks ZMTP to the clients' DEALER sockets: a STREAM socket with ZMTP parsed here
(``zmtp.py``), so messages are read and bounded as they arrive, or with CURVE, whose
cryptography is libzmq's, a ROUTER.

Threads
    - The I/O thread (the caller of ``Server.run``) owns the socket, as ZeroMQ sockets are
      not thread-safe. It receives and decodes requests, answers ``ping`` and ``shutdown`` itself,
      hands every other request to the sequencer, and sends the replies workers leave on a queue
      (workers wake it through a pipe that its poller watches).
    - ``threads`` request workers run one request each.
    - The store has its own pool of ``threads`` for the rows of one request. A separate pool,
      because a request worker waits for its rows: on a shared pool, workers could take every
      thread and wait forever for rows that have none left to run on.

Ordering
    The operations on one memory are applied in the order its client sent them; nothing else is
    ordered. Requests are sequenced per *scope* = (client session, namespace), or (connection,
    namespace) for a request without a session (protocol version 1): ``add`` and
    ``search`` run after the previous request of their scope that touched the same layer, ``clear``
    after those that touched its layers, and ``open``, ``drop``, ``snapshot``, ``restore`` and
    ``clear`` of every layer are barriers for the whole scope. So an add and the search right
    after it are in order (read your writes), and a snapshot holds every add its client sent
    before it, while other clients, other namespaces and other layers overlap. ``ping``,
    ``stats``, ``snapshots`` and ``shutdown`` touch no memory and are not ordered. The session, not
    the connection, keys the scope, so the requests a client sends after it reconnected run after
    those it sent before, which may still be queued here.

Retries
    A client that gets no reply in time reconnects and sends its unanswered requests again, with
    the same session and ``seq`` (the model is Kafka's idempotent producer). The I/O thread keeps
    each session's recent requests (``_Sessions``): a retry of one still running waits for the
    original's reply, a retry of one finished gets its kept reply, and only a request never seen
    runs. Replies are kept for the ops that change memories, when they succeed (a few dozen
    bytes); a retried request that failed, or that only reads (``search``, ``stats``,
    ``snapshots``), runs again once finished: a failed request changed nothing, and a read's reply
    can be large. Bounds: the last ``SESSION_WINDOW`` finished requests of a session, sessions
    silent for ``SESSION_IDLE`` seconds forgotten, at most ``MAX_SESSIONS`` sessions (least recently
    heard from forgotten first). A retry older than its session's window is refused with
    ``unavailable`` (whether it ran is unknown) rather than run again.

Failure detection
    The server sends ZMTP heartbeats (``protocol.HEARTBEAT_*``: ``zmtp.py``'s, or the ROUTER's),
    so a client that died without closing its connection has it closed within 2 s, and clients
    do the same towards the server.
    Every reply names this process's ``instance`` (random at start), so a client can tell a
    restarted server that lost its namespaces from the one it opened them on.

Snapshots
    With ``--data-dir``, ``snapshot`` streams a namespace out of the store (each memory copied
    under its lock, written, let go) and writes it atomically (``snapshot.py``), MACed with
    ``--snapshot-key-file`` if given; ``restore`` and ``--restore NAMESPACE:TAG``
    (loaded before the first request is read) verify a whole file before they replace the
    namespace with it. Requests of other clients may overlap a snapshot: a client that needs a
    consistent cut across clients (the trainer's ranks) makes the others wait until it returns.

Bad input
    A request that breaks the wire format, names an unknown namespace or has out-of-range
    arguments gets an error reply and changes nothing: the protocol checks the framing and schema,
    the store checks the values before it writes. Unexpected exceptions become ``internal`` error
    replies, logged with their traceback, and the server goes on serving.

Security and limits
    A loopback bind needs nothing. Any other bind needs CURVE (``--curve-secret-key`` and
    ``--curve-allow``; see ``auth.py``): a ZAP handler admits only the listed client keys, so a
    stranger's handshake fails and it never reaches the I/O thread. ``--insecure`` binds without
    it, with a loud warning. Tenants (``tenants.py``): with CURVE each allowed key, else with
    ``--token-file`` each token, is a tenant confined to its own namespaces; the I/O thread
    identifies the sender of every request before anything else and refuses a request without a
    known credential with ``unauthorized``. An ipc socket file is created with mode 0700 (the
    umask is narrowed around the bind, so there is no moment when it is open to others). Limits
    (bytes, message size, namespaces, memories per namespace, bytes in flight) are refused with
    ``limit_exceeded`` replies naming the flag, a tenant's quota (``--tenant-max-bytes``, or
    ``max_bytes=`` on its token line; booked by the store per tenant prefix) with
    ``quota_exceeded``; connections past ``--max-connections``, or past
    ``--max-connections-per-host`` from one host, are shut down before their handshake
    (``connections.py``), and on a CURVE server ZeroMQ's frame cap applies before it too
    (``max_frame_bytes``); what clients did wrong is logged at a bounded rate, clipped
    (``ratelog.py``); with ``--namespace-ttl`` a thread drops idle namespaces and a later
    request for one is told it expired.

Bytes in flight
    A request's frames are held from its receipt to its reply, and a reply's until ZeroMQ has
    written them out (zero-copy sends with a tracker per frame), so a client that does not read
    its replies keeps their bytes here. Both count per connection and in all: past
    ``max_client_inflight_bytes`` a connection's next request is refused, past
    ``max_inflight_bytes`` the I/O thread reads nothing until some are done. Requests sent
    together all pass the check at receipt, before any reply exists, so the reply of a read
    (``search``, ``stats``, ``snapshots``) whose connection is past its budget by then is
    replaced with a ``limit_exceeded`` error. A message of more than ``MAX_FRAMES`` frames or
    ``max_message_bytes`` is refused; over the STREAM socket none of it past the limit is kept
    (its bytes are skipped as they come), and the bytes of messages still arriving count as in
    flight: past ``max_inflight_bytes`` the connection holding most of them is closed.

Shutdown
    SIGTERM or SIGINT (or the ``shutdown`` op) only sets a flag; the I/O thread then stops
    reading, lets the requests it accepted finish, sends their replies and returns. Requests still
    running ``drain_timeout`` seconds later are abandoned: their clients get an ``unavailable``
    reply at once, and ``run`` raises ``DrainTimeout``, because their threads cannot be joined
    (the process should exit without them).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import ipaddress
import itertools
import logging
import math
import os
import queue
import signal
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import zmq

from . import auth, connections, metrics, snapshot, tenants, zmtp
from .errors import (ConfigMismatch, InvalidRequest, LimitExceeded, MemoryServerError,
                     ProtocolError, ServerUnavailable, SnapshotError, Unauthorized,
                     UnknownNamespace)
from .protocol import (HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, MAX_FRAMES,
                       MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Request, decode_request, encode_error,
                       encode_reply)
from .ratelog import RateLimitedLog
from .store import MemoryStore, NamespaceConfig
from .tenants import Tenant
from .wakeup import Wakeup

log = logging.getLogger("memory_server")

DEFAULT_BIND = "tcp://127.0.0.1:5555"

_POLL_MS = 1000  # upper bound on a poll; wakeups normally come at once through the pipe
_UNSENT_POLL_MS = 20  # how often the bytes of replies ZeroMQ still holds are looked at
_RECV_BATCH = 64  # requests read in a row before the I/O thread sends queued replies
_CLOSE_LINGER_MS = 2000  # time the last replies get to leave at shutdown
_LATENCY_WINDOW = 1024  # latencies kept per op for the percentiles in stats

SESSION_WINDOW = 64
"""Finished requests remembered per client session: more than a client has outstanding on one
server (the trainer: a search and an add per memorizing layer and micro-batch, and a clear)."""
SESSION_IDLE = 600.0
"""Seconds after which a silent session is forgotten: far longer than any client's time-out, so
no retry of it can still come."""
MAX_SESSIONS = 1024
"""Sessions remembered at once. A finished request costs about 330 bytes (measured), so all of
them hold at most about 1024 x 64 x 330 bytes = 22 MB."""
KEPT_REPLIES = frozenset({"open", "add", "clear", "drop", "snapshot", "restore"})
"""Ops whose successful replies a session keeps for retries: the ones that change memories."""

try:
    VERSION = importlib.metadata.version("memtrans")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    VERSION = "unknown"


class BindError(OSError):
    """The server could not listen on its endpoint (in use, bad address, no permission)."""


class DrainTimeout(RuntimeError):
    """The server stopped with requests unfinished after its drain deadline. Their worker threads
    may still run, and joining them could take for ever: exit the process without them."""


WIRE_DTYPES = ("float32", "float16")
"""Value dtypes a search reply may carry (numpy has no bfloat16, so it is not offered)."""


@dataclass(kw_only=True, slots=True)
class ServerConfig:
    """How a memory server listens and what it allows."""

    bind: str = DEFAULT_BIND
    """ZeroMQ endpoint to listen on: ``tcp://HOST:PORT`` or ``ipc://PATH``."""
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Request worker threads; the store gets as many again for the rows of one request."""
    max_bytes: int | None = None
    """Cap on the bytes the memories may hold; an add that would pass it is refused (None: no
    cap)."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    """Requests larger than this (all frames together) are refused with ``limit_exceeded``."""
    wire_dtype: str | None = None
    """Dtype of the values in search replies (None: as stored, the namespace's ``value_dtype``);
    ``float16`` halves their bytes on the wire. Keys travel as stored, in the namespace's
    ``key_dtype``."""
    drain_timeout: float = 10.0
    """Seconds a stopping server lets accepted requests finish before it abandons them."""
    max_pending: int = 1024
    """Requests accepted but not yet answered; at this many the server stops reading, so ZeroMQ's
    high-water marks push back on clients instead of the queue growing without bound."""
    max_connections: int | None = None
    """Connections open at once; one past it is shut down at once, before its handshake
    (``connections.py``). None: ``connections.DEFAULT_MAX_CONNECTIONS``, or fewer when the
    open-file limit does not allow that many."""
    max_connections_per_host: int | None = None
    """Connections one host (an IPv4 address, an IPv6 /64, on ipc a user id) may have open at
    once; one past it is shut down like one past ``max_connections``, so one host cannot take
    them all (None: no cap per host)."""
    max_inflight_bytes: int = 1 << 30
    """Bytes of requests accepted but not yet answered and of replies not yet transmitted, all
    clients together; at this many the server stops reading, as at ``max_pending``."""
    max_client_inflight_bytes: int = MAX_MESSAGE_BYTES
    """The same, per connection: a request that would take its connection past it is refused
    with ``limit_exceeded`` (one request is always let in when nothing of its connection is in
    flight). A client that does not read its replies is so cut off: nothing more of it is run
    until it reads them."""
    data_dir: str | None = None
    """Directory of ``snapshot`` files (``snapshot.py``); None: ``snapshot``/``restore`` are
    refused."""
    restore: tuple[str, ...] = ()
    """``NAMESPACE:TAG`` snapshots loaded from ``data_dir`` before the first request is served."""
    snapshot_key_file: str | None = None
    """A secret (mode 0600, at least 16 bytes) that keys the snapshots' checksums, making them
    MACs: a snapshot changed without the key, written under another or without one is refused
    at restore (``snapshot.py``). None: plain checksums, which catch corruption only."""
    insecure: bool = False
    """Allow binding a non-loopback address without CURVE: anyone who can reach the port can read
    and change every memory."""
    curve_secret_key: str | None = None
    """The server's CURVE secret key (a ``.key_secret`` file from ``memory-server keygen``, or
    ``z85:KEY``); with it every connection is encrypted and only ``curve_allow`` clients get in."""
    curve_allow: str | None = None
    """Client public keys allowed to connect: a ``.key`` file or a directory of them; each is a
    tenant named by its file."""
    curve_admin: str | None = None
    """With CURVE, admin client public keys (a ``.key`` file or a directory of them), allowed to
    connect too: an admin sees and may act on every namespace, reads server-wide stats and may
    shut the server down."""
    token_file: str | None = None
    """Without CURVE, the tenants' tokens (``NAME TOKEN`` lines, mode 0600; ``tenants.py``): with
    it every request needs one, and each client sees only its own namespaces."""
    admin_token_file: str | None = None
    """Without CURVE, the admins' tokens (same format)."""
    tenant_max_bytes: int | None = None
    """Each tenant's quota (admins have none): the bytes all its namespaces may hold together, so
    that one tenant cannot fill ``max_bytes`` for all; a ``max_bytes=SIZE`` on a tenant's line of
    ``token_file`` overrides it (None: only those lines have quotas)."""
    max_namespaces: int | None = None
    """Cap on namespaces open at once; an ``open`` past it is refused (None: no cap)."""
    max_memories_per_namespace: int | None = None
    """Cap on ``num_layers * num_rows`` a namespace may declare (None: no cap)."""
    namespace_ttl: float | None = None
    """Seconds a namespace may go unused before it is dropped (None: never)."""
    metrics_port: int | None = None
    """Serve Prometheus metrics on this HTTP port (needs prometheus-client)."""
    metrics_host: str = "127.0.0.1"
    """Address the metrics port listens on."""

    def __post_init__(self):
        if not isinstance(self.bind, str) or self.bind.partition("://")[0] not in ("tcp", "ipc",
                                                                                  "inproc"):
            raise ValueError(f"bind must be a ZeroMQ endpoint like tcp://127.0.0.1:5555 or "
                             f"ipc:///tmp/memory.sock, got {self.bind!r}")
        if self.wire_dtype is not None and self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {WIRE_DTYPES}, got {self.wire_dtype!r}")
        if self.snapshot_key_file is not None and self.data_dir is None:
            raise ValueError("--snapshot-key-file needs --data-dir: the directory of the "
                             "snapshots it keys")
        if self.restore and self.data_dir is None:
            raise ValueError("--restore needs --data-dir: the directory holding the snapshots")
        for item in self.restore:
            namespace, sep, tag = item.rpartition(":")
            if not sep:
                raise ValueError(f"--restore takes NAMESPACE:TAG, got {item!r}")
            try:
                snapshot.snapshot_path(self.data_dir, namespace, tag)  # checks both names
            except InvalidRequest as exc:
                raise ValueError(f"--restore {item!r}: {exc.message}") from None
        required = ("threads", "max_message_bytes", "max_pending", "max_inflight_bytes",
                    "max_client_inflight_bytes")
        for name in (*required, "max_bytes", "tenant_max_bytes", "max_namespaces", "max_memories_per_namespace",
                     "max_connections", "max_connections_per_host", "metrics_port"):
            value = getattr(self, name)
            if value is None and name not in required:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.namespace_ttl is not None and not (isinstance(self.namespace_ttl, (int, float))
                                                   and self.namespace_ttl > 0):
            raise ValueError(f"namespace_ttl must be positive seconds, got {self.namespace_ttl!r}")
        if not (isinstance(self.drain_timeout, (int, float)) and 0 < self.drain_timeout
                < math.inf):
            raise ValueError(f"drain_timeout must be positive seconds, got "
                             f"{self.drain_timeout!r}")
        if (self.curve_secret_key is None) != (self.curve_allow is None):
            raise ValueError("CURVE needs both --curve-secret-key (the server's key) and "
                             "--curve-allow (the clients' public keys); make keys with "
                             "`memory-server keygen`")
        if self.curve and (self.token_file or self.admin_token_file):
            raise ValueError("with CURVE the client keys are the tenants: pass --curve-allow and "
                             "--curve-admin instead of --token-file and --admin-token-file")
        if self.tenant_max_bytes is not None and not (self.curve or self.token_file):
            raise ValueError("--tenant-max-bytes needs tenants: --token-file, or CURVE "
                             "(--curve-allow)")
        if self.curve_admin is not None and not self.curve:
            raise ValueError("--curve-admin needs CURVE (--curve-secret-key and --curve-allow); "
                             "without CURVE, admins are named in --admin-token-file")
        if not is_loopback(self.bind) and not self.curve and not self.insecure:
            raise ValueError(
                f"refusing to bind {self.bind}: it is reachable from other hosts. Pass "
                f"--curve-secret-key and --curve-allow (keys from `memory-server keygen`) to "
                f"encrypt and authenticate, bind a loopback address (tcp://127.0.0.1:PORT), or "
                f"pass --insecure to bind anyway, unencrypted and unauthenticated")

    @property
    def curve(self) -> bool:
        return self.curve_secret_key is not None


CURVE_FRAME_BYTES = 64
"""What CURVE adds to a frame on the wire, rounded up: its MESSAGE command's name, nonce,
authenticator and flags (33 bytes by the CurveZMQ RFC)."""


def max_frame_bytes(config: ServerConfig) -> int:
    """ZeroMQ's cap on one incoming frame (ZMQ_MAXMSGSIZE) on a CURVE server's ROUTER: a peer
    that announces a larger one is disconnected at once, without a reply and before anything is
    allocated for the frame.

    ZeroMQ applies it from the first frame a connection sends, before the handshake, CURVE's
    included (libzmq issue 4436), and a CURVE server's peers are strangers until their
    handshake, so it is the largest frame a request may hold (``max_message_bytes``) plus
    CURVE's framing: a stranger can make the server hold at most one such frame per connection,
    and for at most ``connections.HANDSHAKE_MS``. (Other servers read frames themselves,
    ``zmtp.py``.)
    """
    return config.max_message_bytes + CURVE_FRAME_BYTES


def is_loopback(endpoint: str) -> bool:
    """Whether only this host can reach ``endpoint`` (ipc and inproc always; tcp on loopback)."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # '*', an interface name or a host name: assume reachable from outside
        return False


class Server:
    """A bound memory server; ``run()`` serves until ``stop()`` (or a ``shutdown`` request).

    Use it as a context manager (``with Server(config) as server: server.run()``) so its wakeup
    pipe is closed after ``run()``.
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        if config.metrics_port is not None:
            metrics.require()
        # Keys are read before any socket exists, so a bad key file leaves nothing to clean up.
        keys = auth.load_key_pair(config.curve_secret_key, what="--curve-secret-key") \
            if config.curve else None
        allowed = auth.load_allowed(config.curve_allow) if config.curve else {}
        admins = auth.load_allowed(config.curve_admin, "--curve-admin") \
            if config.curve_admin else {}
        lines = tenants.read_token_lines(config.token_file) if config.token_file else []
        admin_lines = tenants.read_token_lines(config.admin_token_file, "--admin-token-file") \
            if config.admin_token_file else []
        if any(line.max_bytes is not None for line in admin_lines):
            raise ValueError(f"--admin-token-file {config.admin_token_file}: an admin has no "
                             f"quota (it may act on every namespace); remove max_bytes= from "
                             f"its lines")
        self._tenants = tenants.Tenants(
            tokens={line.name: line.token for line in lines} or None,
            admin_tokens={line.name: line.token for line in admin_lines} or None,
            curve_keys=allowed, curve_admins=admins)
        quotas = _quotas(lines, [name for key, name in allowed.items() if key not in admins],
                         config.tenant_max_bytes)
        self._allowed_keys = len(allowed.keys() | admins.keys())
        self._snapshot_key = snapshot.read_key_file(config.snapshot_key_file) \
            if config.snapshot_key_file else None
        max_connections = connections.reserve_descriptors(config.max_connections)
        self._context = zmq.Context()
        self._auth = auth.start_authenticator(self._context, allowed.keys() | admins.keys()) \
            if keys else None
        self.public_key: bytes | None = keys.public if keys else None
        if keys:  # CURVE needs libzmq's engine: a ROUTER
            self._router = self._context.socket(zmq.ROUTER)
            auth.make_curve_server(self._router, keys)
            self._router.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes(config))
            self._router.setsockopt(zmq.HANDSHAKE_IVL, connections.HANDSHAKE_MS)
            # Connections of clients that died without closing them are closed within 2 s.
            self._router.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            self._router.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            self._zmtp = None
        else:  # ZMTP spoken here, to read messages as they arrive (zmtp.py)
            self._router = self._context.socket(zmq.STREAM)
            self._router.setsockopt(zmq.RCVHWM, zmtp.RCVHWM)
            self._zmtp = zmtp.ZmtpStream(self._router, config.max_message_bytes,
                                         self._violation)
        try:
            with _owner_only(config.bind):
                self._router.bind(config.bind)
        except zmq.ZMQError as exc:
            self._router.close(linger=0)
            if self._auth is not None:
                self._auth.stop()
            self._context.term()
            raise BindError(f"cannot bind {config.bind}: {exc.strerror}") from None
        self.endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._rejections = RateLimitedLog(log)
        """Lines about what clients did wrong: theirs to make, so at most 10 a second."""
        self._connections = connections.ConnectionGuard(self._router, max_connections,
                                                        self._rejections,
                                                        config.max_connections_per_host)
        self.store = MemoryStore(threads=config.threads, max_bytes=config.max_bytes,
                                 max_namespaces=config.max_namespaces,
                                 max_memories_per_namespace=config.max_memories_per_namespace,
                                 max_search_bytes=config.max_message_bytes, quotas=quotas)
        self._sequencer = _Sequencer(
            ThreadPoolExecutor(config.threads, thread_name_prefix="memory-server-request"))
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = Wakeup()
        self._stopping = False
        # Accepted and not yet answered, ticket -> (identity, request, its session's record of it
        # or None); I/O thread only.
        self._pending: dict[int, tuple[bytes, Request, _Sent | None, int]] = {}
        # Bytes in flight (see max_inflight_bytes) per connection and in all, and the replies
        # ZeroMQ still holds: (tracker, connection, bytes). I/O thread only.
        self._held: dict[bytes, int] = {}
        self._held_total = 0
        self._unsent: list[tuple[zmq.MessageTracker, bytes, int]] = []
        self._sessions = _Sessions()
        self.instance = os.urandom(8).hex()
        """Names this server process in every reply, so clients notice a restart."""
        self._tickets = itertools.count()
        self._metrics = _Metrics()
        self._restore_lock = threading.Lock()
        self._started = time.monotonic()
        self._expired = _ExpiredNames()
        self._idle_stop = threading.Event()
        self._background: list = []  # the TTL thread and the metrics HTTP server, while running

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self._wakeup.close()

    def stop(self) -> None:
        """Ask the server to stop; safe from signal handlers and other threads."""
        self._stopping = True
        self._wake()

    def run(self) -> None:
        cfg = self.config
        log.info("memory-server %s listening on %s (threads=%d, max_bytes=%s, "
                 "max_message_bytes=%d, protocol v%d, pid %d)", VERSION, self.endpoint,
                 cfg.threads, cfg.max_bytes, cfg.max_message_bytes, PROTOCOL_VERSION, os.getpid())
        if cfg.curve:
            log.info("CURVE on: encrypted, %d client keys allowed, server public key %s",
                     self._allowed_keys, self.public_key.decode())
        elif not is_loopback(cfg.bind):
            log.warning("INSECURE (--insecure): listening on %s WITHOUT CURVE: anyone who can "
                        "reach this port can %s, and traffic is unencrypted", self.endpoint,
                        "present a token it sniffed" if not self._tenants.open else
                        "read and change every memory")
        if cfg.bind.startswith("ipc://@"):
            log.warning("%s is an abstract socket, which has no file permissions: any local "
                        "user can connect%s", cfg.bind, "" if not self._tenants.open else
                        "; pass --token-file, or bind a socket file (ipc:///path)")
        if self._tenants.open:
            log.warning("no --token-file (or CURVE): every client, so every local user, can "
                        "read, change and drop every namespace and shut the server down")
        else:
            log.info("tenants on: %d tenants, %d of them admins; each sees only its own "
                     "namespaces", len(self._tenants.names), self._tenants.admins)
        quotas = self.store.quotas
        if quotas:
            overcommitted = cfg.max_bytes is not None and sum(quotas.values()) > cfg.max_bytes
            log.info("quotas for %d tenants: %d bytes in all%s", len(quotas), sum(quotas.values()),
                     " (more than --max-bytes: a tenant may find the server full before its "
                     "quota is)" if overcommitted else "")
        poller = zmq.Poller()
        poller.register(self._wakeup.read_fd, zmq.POLLIN)
        reading = False
        deadline = None  # when a stopping server gives up on what is still running
        abandoned = 0
        try:
            for item in cfg.restore:  # before any request: a client sees the restored memories
                namespace, _, tag = item.rpartition(":")
                self._restore(namespace, tag)
            self._connections.start()
            self._start_background()
            while not (self._stopping and not self._pending):
                if self._stopping and deadline is None:
                    deadline = time.monotonic() + cfg.drain_timeout
                self._reap_sent()
                want = not self._stopping and len(self._pending) < cfg.max_pending \
                    and self._held_total < cfg.max_inflight_bytes
                if want and not reading:
                    poller.register(self._router, zmq.POLLIN)
                elif reading and not want:
                    poller.unregister(self._router)
                reading = want
                wait_ms = _POLL_MS if deadline is None else \
                    max(0, min(_POLL_MS, math.ceil((deadline - time.monotonic()) * 1000)))
                if self._zmtp is not None:  # its heartbeats and deadlines are ours to keep
                    self._zmtp.tick(reading)
                    wait_ms = min(wait_ms, HEARTBEAT_IVL_MS)
                if self._unsent:  # nothing wakes the poll when ZeroMQ has sent a reply
                    wait_ms = min(wait_ms, _UNSENT_POLL_MS)
                events = dict(poller.poll(wait_ms))
                if self._wakeup.read_fd in events:
                    self._wakeup.drain()
                if events.get(self._router):
                    self._receive()
                self._send_replies()
                if deadline is not None and self._pending and time.monotonic() >= deadline:
                    abandoned = self._abandon()
                    break
        finally:
            self._close(wait=not abandoned)
        log.info("memory-server on %s stopped", self.endpoint)
        if abandoned:
            raise DrainTimeout(f"stopped with {abandoned} requests unfinished after the drain "
                               f"deadline of {cfg.drain_timeout:g} s (--drain-timeout)")

    def _abandon(self) -> int:
        """Answer every unfinished request with ``unavailable``; returns how many there were."""
        ops = sorted({request.op for _, request, _, _ in self._pending.values()})
        log.error("drain deadline of %g s (--drain-timeout) passed: abandoning %d unfinished "
                  "request(s) (%s)", self.config.drain_timeout, len(self._pending),
                  ", ".join(ops))
        for identity, request, sent, _ in self._pending.values():
            frames = self._error(
                request.id, ServerUnavailable.code,
                f"the memory server stopped before finishing this {request.op} request: it was "
                f"still running {self.config.drain_timeout:g} s after the stop request "
                f"(--drain-timeout), so whether it took effect is unknown", request.version)
            for peer in (identity, *(sent.waiters if sent else ())):
                self._send(peer, frames)
        return len(self._pending)

    # I/O thread

    def _receive(self) -> None:
        if self._zmtp is not None:
            self._receive_stream()
            return
        cfg = self.config
        for _ in range(_RECV_BATCH):
            if self._stopping or len(self._pending) >= cfg.max_pending \
                    or self._held_total >= cfg.max_inflight_bytes:
                return
            try:
                frames, count = self._recv_message()
            except zmq.Again:
                return
            self._accept_safely(frames[0].bytes, frames[1:], time.monotonic(), count=count)

    def _receive_stream(self) -> None:
        cfg = self.config
        room = max(1, min(_RECV_BATCH, cfg.max_pending - len(self._pending)))
        for message in self._zmtp.receive(room):
            # Whole, or refused for its size or frames: then decode_request says so, with its id.
            self._accept_safely(message.identity, message.frames, time.monotonic(),
                                message.size, message.count)
        while self._zmtp.buffered and \
                self._held_total + self._zmtp.buffered > cfg.max_inflight_bytes:
            kept = self._zmtp.close_largest()
            self._rejections("closed the connection holding the most bytes of a message still "
                             "arriving (%d): with the requests and replies in flight they passed "
                             "max_inflight_bytes=%d (--max-inflight-bytes)", kept,
                             cfg.max_inflight_bytes)

    def _accept_safely(self, identity: bytes, body: list, received: float,
                       size: int | None = None, count: int | None = None) -> None:
        try:
            self._accept(identity, body, received, size, count)
        except Exception as exc:  # a bug, not bad input: answer and keep serving
            log.exception("internal error accepting a request")
            self._send(identity, self._error(None, "internal", f"internal server error: {exc!r}"))

    def _violation(self, text: str, *args) -> None:
        self._rejections(text, *args)

    def _recv_message(self) -> tuple[list, int]:
        """The next message (identity first) and its frame count besides the identity. Frames
        past MAX_FRAMES are read and dropped at once: ZeroMQ delivers a message whole, but none
        of a message of a million frames is kept (raises zmq.Again when there is none)."""
        frame = self._router.recv(zmq.NOBLOCK, copy=False)
        frames, count = [frame], 0
        while frame.more and count < MAX_FRAMES:  # the rest of a message is there already
            frame = self._router.recv(copy=False)
            frames.append(frame)
            count += 1
        if frame.more:  # too many: drop the rest the cheapest way (about 1.5 us a frame)
            recv, more = self._router.recv, self._router.get
            while more(zmq.RCVMORE):
                recv()
                count += 1
        return frames, count

    def _accept(self, identity: bytes, body: list, received: float,
                size: int | None = None, count: int | None = None) -> None:
        try:
            request = decode_request(body, max_message_bytes=self.config.max_message_bytes,
                                     size=size, count=count)
        except ProtocolError as exc:
            self._rejections("rejected a malformed request (id %s): %s", exc.request_id,
                             exc.message)
            self._send(identity, self._error(exc.request_id, exc.code, exc.message, exc.version))
            self._metrics.record("malformed", received, ok=False)
            return
        try:
            tenant = self._identify(body[0], request)
            if request.op == "shutdown" and not tenant.admin:
                raise Unauthorized("shutdown needs an admin credential (a token of the server's "
                                   "--admin-token-file, or with CURVE a --curve-admin key)")
        except Unauthorized as exc:
            self._rejections("refused an unauthorized %s request: %s", request.op, exc.message)
            self._send(identity, self._error(request.id, exc.code, exc.message, request.version))
            self._metrics.record("unauthorized", received, ok=False)
            return
        if request.op == "ping":
            self._send(identity, self._reply(request, {"version": VERSION,
                                                       "protocol": PROTOCOL_VERSION}))
            self._metrics.record("ping", received, ok=True)
        elif request.op == "shutdown":
            log.info("shutdown requested by client %r", tenant.name)
            self._send(identity, self._reply(request))
            self._metrics.record("shutdown", received, ok=True)
            self.stop()
        else:
            sent = key = None
            if request.session is not None:
                key = (tenant.name, request.session)  # a session id is only good for its tenant
                try:
                    earlier = self._sessions.find(key, request, received)
                except MemoryServerError as exc:
                    self._send(identity, self._error(request.id, exc.code, exc.message,
                                                     request.version))
                    self._metrics.record(request.op, received, ok=False)
                    return
                if earlier is not None:  # a retry: the original's reply, now or when it comes
                    if earlier.finished:
                        self._send(identity, earlier.reply)
                    else:
                        earlier.waiters.append(identity)
                    return
            size = sum(memoryview(frame).nbytes for frame in body)
            held = self._held.get(identity, 0)
            if held and held + size > self.config.max_client_inflight_bytes:
                self._send(identity, self._error(
                    request.id, LimitExceeded.code,
                    f"{request.op} refused: this connection has {held} bytes of requests in flight "
                    f"and replies it has not read, and this one ({size} bytes) would pass "
                    f"max_client_inflight_bytes={self.config.max_client_inflight_bytes} "
                    f"(memory-server --max-client-inflight-bytes); read the replies before "
                    f"sending more", request.version))
                self._metrics.record(request.op, received, ok=False)
                return
            if key is not None:
                sent = self._sessions.begin(key, request, received)
            ticket = next(self._tickets)
            self._pending[ticket] = (identity, request, sent, size)
            self._hold(identity, size)
            scope, layers = _scope(identity, tenant, request)
            self._sequencer.submit(scope, layers, partial(self._execute, ticket, identity,
                                                          request, received, tenant))

    def _identify(self, head, request: Request) -> Tenant:
        """The tenant that sent ``request`` (its header frame ``head``); raises Unauthorized."""
        curve_key = head.get("User-Id").encode() if self.config.curve else None
        try:
            return self._tenants.identify(request.token, curve_key)
        except Unauthorized as exc:
            if request.version < 3:
                raise Unauthorized(f"{exc.message} (this client speaks protocol version "
                                   f"{request.version}, which cannot carry a token: upgrade "
                                   f"memtrans)") from None
            raise

    def _reply(self, request: Request, result: dict | None = None,
               arrays: dict | None = None) -> list:
        return encode_reply(request.id, result, arrays, version=request.version,
                            instance=self.instance)

    def _error(self, request_id: int | None, code: str, message: str,
               version: int | None = None) -> list:
        return encode_error(request_id, code, message, version=version or PROTOCOL_VERSION,
                            instance=self.instance)

    def _send(self, identity: bytes, frames: list) -> None:
        """Queue a reply; until ZeroMQ has transmitted (or dropped) its frames, its bytes count
        against its connection's and the server's in-flight budgets."""
        trackers = []
        try:
            if self._zmtp is not None:
                trackers = self._zmtp.send(identity, frames)
            else:
                parts = [identity, *frames]
                for i, part in enumerate(parts):
                    more = zmq.SNDMORE if i < len(parts) - 1 else 0
                    trackers.append(self._router.send(part, zmq.NOBLOCK | more, copy=False,
                                                      track=True))
        except zmq.ZMQError as exc:  # the peer's queue is full or it is gone: it will time out
            self._rejections("could not send a reply: %s", exc, level=logging.WARNING)
        waiting = [t for t in trackers if not t.done]  # small frames are copied: done at once
        if waiting:
            nbytes = sum(memoryview(frame).nbytes for frame in frames)
            self._unsent.append((zmq.MessageTracker(*waiting), identity, nbytes))
            self._hold(identity, nbytes)

    def _reap_sent(self) -> None:
        """Release the bytes of the replies ZeroMQ has transmitted, or dropped with their peer."""
        if not self._unsent:
            return
        unsent = []
        for item in self._unsent:
            if item[0].done:
                self._release(item[1], item[2])
            else:
                unsent.append(item)
        self._unsent = unsent

    def _hold(self, identity: bytes, nbytes: int) -> None:
        self._held[identity] = self._held.get(identity, 0) + nbytes
        self._held_total += nbytes

    def _release(self, identity: bytes, nbytes: int) -> None:
        left = self._held[identity] - nbytes
        if left:
            self._held[identity] = left
        else:
            del self._held[identity]
        self._held_total -= nbytes

    def _send_replies(self) -> None:
        while True:
            try:
                ticket, identity, frames, op, received, ok = self._replies.get_nowait()
            except queue.Empty:
                return
            _, request, sent, size = self._pending.pop(ticket)
            self._release(identity, size)
            held = self._held.get(identity, 0)
            if ok and op not in KEPT_REPLIES and held > self.config.max_client_inflight_bytes:
                frames, ok = self._unread(request, held), False
            self._send(identity, frames)
            if sent is not None:
                for waiter in self._sessions.finish(request.op, sent, frames, ok):
                    self._send(waiter, frames)
            self._metrics.record(op, received, ok)

    def _unread(self, request: Request, held: int) -> list:
        """The reply that replaces a read's (a search's, say: its reply can be megabytes) when
        its connection does not read what it was sent: requests pipelined before the replies
        piled up pass the check at receipt, and this bounds what they hold to one reply each
        while it is made. A request that changed memories keeps its (small) reply."""
        return self._error(
            request.id, LimitExceeded.code,
            f"{request.op} reply withheld: this connection has {held} bytes of replies it has "
            f"not read, over max_client_inflight_bytes="
            f"{self.config.max_client_inflight_bytes} (memory-server "
            f"--max-client-inflight-bytes); read the replies before sending more",
            request.version)

    def _wake(self) -> None:
        self._wakeup.wake()

    def _start_background(self) -> None:
        cfg = self.config
        if cfg.namespace_ttl is not None:
            thread = threading.Thread(target=self._expire_idle, name="memory-server-ttl",
                                      daemon=True)
            thread.start()
            self._background.append(thread)
        if cfg.metrics_port is not None:
            try:
                http = metrics.serve_metrics(cfg.metrics_port, cfg.metrics_host, self.stats)
            except OSError as exc:
                raise BindError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port}: "
                                f"{exc.strerror or exc}") from None
            self._background.append(http)
            log.info("Prometheus metrics on http://%s:%d/metrics", cfg.metrics_host,
                     cfg.metrics_port)

    def _expire_idle(self) -> None:
        """Drop namespaces idle for --namespace-ttl, checking a few times per TTL."""
        ttl = self.config.namespace_ttl
        while not self._idle_stop.wait(min(ttl / 4, 10.0)):
            for name in self.store.expire(ttl):
                self._expired.add(name)
                log.info("namespace %r expired after %g s idle (--namespace-ttl)", name, ttl)

    def _close(self, wait: bool = True) -> None:
        """Release everything; ``wait=False`` leaves abandoned requests' threads unjoined."""
        self._idle_stop.set()
        self._connections.stop()
        self._rejections.flush()
        for item in self._background:
            if isinstance(item, threading.Thread):
                item.join()
            else:
                item.shutdown()
        self._sequencer.close(wait)
        self.store.close(wait)
        self._router.close(linger=_CLOSE_LINGER_MS)
        if self._auth is not None:
            self._auth.stop()
        self._context.term()

    # worker threads

    def _execute(self, ticket: int, identity: bytes, request: Request, received: float,
                 tenant: Tenant) -> None:
        """Run one request and queue its reply; never raises, so every request is answered."""
        ok = False
        namespace = request.args.get("namespace")
        qualified = None if namespace is None else tenant.qualify(namespace)
        try:
            result, arrays = _HANDLERS[request.op](self, tenant, request.args, request.arrays)
            frames = self._reply(request, result, arrays)
            ok = True
        except MemoryServerError as exc:
            message = exc.message
            if isinstance(exc, UnknownNamespace):
                message = self._expired.explain(qualified, message, self.config.namespace_ttl)
            if qualified != namespace:  # the store names the namespace as it knows it
                message = message.replace(repr(qualified), repr(namespace))
            frames = self._error(request.id, exc.code, message, request.version)
        except Exception as exc:
            log.exception("internal error in %s request %d", request.op, request.id)
            frames = self._error(request.id, "internal",
                                 f"internal server error in {request.op}: "
                                 f"{type(exc).__name__}: {exc} (see the server log)",
                                 request.version)
        self._replies.put((ticket, identity, frames, request.op, received, ok))
        self._wake()

    # Handlers take the sender's tenant: every namespace they touch is its qualified name.

    def _op_open(self, tenant: Tenant, args: dict, arrays: dict):
        namespace = tenant.qualify(args["namespace"])
        self.store.open(namespace, NamespaceConfig.from_dict(args["config"]))
        self._expired.discard(namespace)
        return {}, {}

    def _op_add(self, tenant: Tenant, args: dict, arrays: dict):
        self.store.add(tenant.qualify(args["namespace"]), args["layer"], arrays["rows"],
                       arrays["keys"], arrays["values"])
        return {}, {}

    def _op_search(self, tenant: Tenant, args: dict, arrays: dict):
        found = self.store.search(tenant.qualify(args["namespace"]), args["layer"],
                                  arrays["rows"], arrays["queries"], args["k"])
        values = found.values if self.config.wire_dtype is None \
            else found.values.astype(self.config.wire_dtype, copy=False)
        return {}, {"keys": found.keys, "values": values, "positions": found.positions}

    def _op_clear(self, tenant: Tenant, args: dict, arrays: dict):
        self.store.clear(tenant.qualify(args["namespace"]), arrays["rows"], args.get("layers"))
        return {}, {}

    def _op_drop(self, tenant: Tenant, args: dict, arrays: dict):
        self.store.drop(tenant.qualify(args["namespace"]))
        return {}, {}

    def _op_snapshot(self, tenant: Tenant, args: dict, arrays: dict):
        namespace, tag = tenant.qualify(args["namespace"]), args["tag"]
        data_dir = self._data_dir("snapshot")
        snapshot.snapshot_path(data_dir, namespace, tag)  # a bad name fails before the copy
        config, count, memories = self.store.export_stream(namespace)
        info = snapshot.write_snapshot(data_dir, namespace, tag, config, count, memories,
                                       self._snapshot_key)
        log.info("snapshot of namespace %r written to %s (%d bytes)", namespace, info.path,
                 info.bytes)
        return {"path": str(info.path), "bytes": info.bytes, "memories": count}, {}

    def _op_restore(self, tenant: Tenant, args: dict, arrays: dict):
        namespace, tag = tenant.qualify(args["namespace"]), args["tag"]
        self._data_dir("restore")
        with self._restore_lock:  # if_missing: of two concurrent restores, one loads
            if args.get("if_missing") and namespace in self.store.namespaces():
                return {"restored": False}, {}
            return {"restored": True, **self._restore(namespace, tag)}, {}

    def _op_snapshots(self, tenant: Tenant, args: dict, arrays: dict):
        data_dir = self._data_dir("snapshots")
        found = []
        for info in snapshot.list_snapshots(data_dir):
            namespace = tenant.unqualify(info.namespace)
            if namespace is not None:  # a tenant sees the snapshots of its own namespaces only
                found.append({**info.to_dict(), "namespace": namespace})
        return {"snapshots": found}, {}

    def _restore(self, namespace: str, tag: str) -> dict:
        """Load a snapshot into the store, replacing the namespace; all or nothing. What the
        snapshot's header and records describe is checked and booked before its arrays are
        read, so one too large for --max-bytes or the tenant's quota is refused at once."""
        booked = None

        def admit(config: NamespaceConfig, slots: list[int]) -> None:
            nonlocal booked
            self._check_restore(namespace, tag, config.dim)
            booked = self.store.book_restore(namespace, config, slots)

        loaded = False
        try:
            state = snapshot.read_snapshot(self.config.data_dir, namespace, tag,
                                           self._snapshot_key, admit)
            if booked is None:  # an old format's header admitted nothing: checked now
                self._check_restore(namespace, tag, state["config"]["dim"])
            self.store.import_namespace(namespace, state, booked)
            loaded = True
        except InvalidRequest as exc:
            path = snapshot.snapshot_path(self.config.data_dir, namespace, tag)
            raise SnapshotError(f"snapshot {path} is refused: {exc.message}; nothing was "
                                f"loaded") from None
        finally:
            if booked is not None and not loaded:
                self.store.unbook(booked)
        log.info("namespace %r restored from snapshot %r (%d memories)", namespace, tag,
                 len(state["memories"]))
        return {"memories": len(state["memories"])}

    def _check_restore(self, namespace: str, tag: str, dim: int) -> None:
        """What the store does not check of a restore: a new namespace counts against
        --max-namespaces as an ``open`` does, and an open namespace keeps its key width (its
        clients send keys of that width; a restore once changed it silently). Restores are
        serialized by ``_restore_lock``; an ``open`` racing one may still pass the cap by one."""
        open_now = self.store.namespaces()
        try:
            current = self.store.config(namespace).dim if namespace in open_now else None
        except UnknownNamespace:  # dropped meanwhile
            current = None
        if current is not None:
            if dim != current:
                raise ConfigMismatch(
                    f"restore of snapshot {tag!r} refused: namespace {namespace!r} is open with "
                    f"dim={current} and the snapshot's keys have dim={dim}; its clients would "
                    f"send keys of the wrong width. Drop the namespace first to restore it with "
                    f"another dim")
        elif (self.config.max_namespaces is not None
              and len(open_now) >= self.config.max_namespaces):
            raise LimitExceeded(
                f"restore of snapshot {tag!r} into namespace {namespace!r} refused: the server "
                f"holds {len(open_now)} namespaces, the limit max_namespaces="
                f"{self.config.max_namespaces} (memory-server --max-namespaces); drop finished "
                f"namespaces first")

    def _data_dir(self, op: str) -> str:
        if self.config.data_dir is None:
            raise InvalidRequest(f"{op} needs a data directory: start the server with "
                                 f"--data-dir DIR")
        return self.config.data_dir

    def _op_stats(self, tenant: Tenant, args: dict, arrays: dict):
        if tenant.admin:
            return {**self.stats(), "tenant": tenant.name, "admin": True}, {}
        # A tenant's view: its own namespaces (by its names) and the server's limits; request
        # counts, latencies and sessions are everyone's, so they are the admin's to read.
        per_namespace = {}
        for qualified, ns in self.store.stats()["per_namespace"].items():
            name = tenant.unqualify(qualified)
            if name is not None:
                per_namespace[name] = ns
        return {**_totals(per_namespace), "per_namespace": per_namespace,
                "quota": self.store.quota(tenant.name), "version": VERSION,
                "protocol": PROTOCOL_VERSION, "instance": self.instance, "tenant": tenant.name,
                "admin": False, "config": self._config_stats()}, {}

    def stats(self) -> dict:
        """What the ``stats`` op of an admin, ``memory-server status`` and the metrics port
        report."""
        return {
            **self.store.stats(),
            "requests": self._metrics.snapshot(),
            "uptime_s": time.monotonic() - self._started,
            "version": VERSION,
            "protocol": PROTOCOL_VERSION,
            "instance": self.instance,
            "quotas": {name: self.store.quota(name) for name in self.store.quotas},
            "sessions": self._sessions.stats(),
            "connections": self._connections.stats(),
            "log_lines_suppressed": self._rejections.suppressed_total,
            "config": self._config_stats(),
        }

    def _config_stats(self) -> dict:
        cfg = self.config
        return {"threads": cfg.threads, "max_bytes": cfg.max_bytes,
                "drain_timeout": cfg.drain_timeout, "max_message_bytes": cfg.max_message_bytes,
                "max_namespaces": cfg.max_namespaces, "tenant_max_bytes": cfg.tenant_max_bytes,
                "max_memories_per_namespace": cfg.max_memories_per_namespace,
                "max_connections": self._connections.max_connections,
                "max_connections_per_host": cfg.max_connections_per_host,
                "namespace_ttl": cfg.namespace_ttl, "curve": cfg.curve,
                "tenants": not self._tenants.open, "persistent": cfg.data_dir is not None,
                "snapshot_key": None if self._snapshot_key is None else self._snapshot_key.id}


_HANDLERS = {
    "open": Server._op_open,
    "add": Server._op_add,
    "search": Server._op_search,
    "clear": Server._op_clear,
    "drop": Server._op_drop,
    "stats": Server._op_stats,
    "snapshot": Server._op_snapshot,
    "restore": Server._op_restore,
    "snapshots": Server._op_snapshots,
}


def _quotas(lines: list[tenants.TokenLine], curve_tenants: list[str],
            default: int | None) -> dict[str, int]:
    """Tenant name -> its quota: its token line's, else ``default`` (CURVE tenants have no line);
    tenants without either have none."""
    quotas = {name: default for name in curve_tenants}
    quotas.update({line.name: line.max_bytes or default for line in lines})
    return {name: quota for name, quota in quotas.items() if quota is not None}


def _totals(per_namespace: dict) -> dict:
    return {"namespaces": len(per_namespace),
            **{what: sum(ns[what] for ns in per_namespace.values())
               for what in ("memories", "entries", "bytes")}}


@contextlib.contextmanager
def _owner_only(endpoint: str):
    """Bind ``endpoint`` so that an ipc socket file is created with mode 0700: only this user can
    connect (connecting to a Unix socket needs write permission on its file). The umask, not a
    chmod after the bind, so there is no moment when others could connect. The umask is the
    process's: nothing else creates files while a server binds, at its start."""
    if not endpoint.startswith("ipc://"):
        yield
        return
    umask = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(umask)


def _scope(identity: bytes, tenant: Tenant, request: Request):
    """The sequencing scope of a request and the layers it touches (None: all of them)."""
    namespace = request.args.get("namespace")
    if namespace is None:
        return None, None
    client = ("connection", identity) if request.session is None \
        else ("session", tenant.name, request.session)
    if request.op in ("add", "search"):
        return (client, namespace), (request.args["layer"],)
    if request.op == "clear" and "layers" in request.args:
        return (client, namespace), tuple(request.args["layers"])
    return (client, namespace), None


def serve(config: ServerConfig) -> None:
    """Bind, serve until SIGTERM/SIGINT or a ``shutdown`` request, finish in-flight work, return.

    Raises ``BindError`` if the endpoint cannot be bound.
    """
    with Server(config) as server, _stop_on_signals(server):
        server.run()


@contextlib.contextmanager
def _stop_on_signals(server: Server):
    """SIGTERM and SIGINT make ``server`` stop (when we are the main thread, which owns signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: server.stop())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    # A signal may land on a worker thread while the I/O thread sits in poll: the wakeup fd
    # makes the C-level handler wake the poll, and the Python handler then runs at once.
    previous_fd = signal.set_wakeup_fd(server._wakeup.write_fd)
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Task:
    __slots__ = ("fn", "waiting", "dependents")

    def __init__(self, fn):
        self.fn = fn
        self.waiting = 0  # unfinished tasks this one must wait for
        self.dependents: list[_Task] = []


@dataclass(slots=True)
class _ScopeState:
    tails: dict = field(default_factory=dict)
    """Layer -> the last unfinished task that touched it since the last barrier."""
    barrier: _Task | None = None
    """The last unfinished task that touched every layer. Finished tasks are removed from both,
    so whatever a new task finds here it must wait for."""


class _Sequencer:
    """Runs tasks on a pool, each after the earlier unfinished tasks of its scope that touch the
    same layers (see Ordering in the module docstring); tasks without a scope run at once."""

    def __init__(self, pool: ThreadPoolExecutor):
        self._pool = pool
        self._lock = threading.Lock()
        self._scopes: dict[object, _ScopeState] = {}

    def submit(self, scope, layers: tuple | None, fn) -> None:
        task = _Task(fn)
        if scope is not None:
            with self._lock:
                state = self._scopes.setdefault(scope, _ScopeState())
                if layers is None:
                    before = [*state.tails.values(), state.barrier]
                    state.tails, state.barrier = {}, task
                else:
                    before = [state.tails.get(layer, state.barrier) for layer in layers]
                    state.tails.update(dict.fromkeys(layers, task))
                for earlier in {id(t): t for t in before if t is not None}.values():
                    earlier.dependents.append(task)
                    task.waiting += 1
                if task.waiting:
                    return
        self._pool.submit(self._run, scope, task)

    def _run(self, scope, task: _Task) -> None:
        try:
            task.fn()
        finally:
            with self._lock:
                ready = []
                for later in task.dependents:
                    later.waiting -= 1
                    if later.waiting == 0:
                        ready.append(later)
                state = self._scopes.get(scope)
                if state is not None:
                    state.tails = {k: t for k, t in state.tails.items() if t is not task}
                    if state.barrier is task:
                        state.barrier = None
                    if not state.tails and state.barrier is None:
                        del self._scopes[scope]
            for later in ready:
                self._pool.submit(self._run, scope, later)

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)


@dataclass(slots=True)
class _Sent:
    """A session's request: running, or finished (its reply kept when ``KEPT_REPLIES`` and
    successful)."""

    id: int
    op: str
    key: tuple
    """Its session: (tenant name, session id)."""
    seq: int
    waiters: list[bytes] = field(default_factory=list)
    """Connections whose retries of it wait for its reply."""
    finished: bool = False
    reply: list | None = None


@dataclass(slots=True)
class _Session:
    requests: dict[int, _Sent] = field(default_factory=dict)
    """seq -> request: the running ones and the last SESSION_WINDOW finished ones."""
    finished: deque = field(default_factory=deque)
    """seqs in the order they finished, to forget the oldest."""
    forgotten: int = 0
    """The highest seq forgotten: a retry of it or below cannot be told from a new request."""
    heard: float = 0.0


class _Sessions:
    """Each client session's recent requests, so a retry is answered once (see Retries in the
    module docstring). I/O thread only."""

    def __init__(self):
        self._sessions: OrderedDict[bytes, _Session] = OrderedDict()  # least recently heard first
        self._retries = 0

    def find(self, key, request: Request, now: float) -> _Sent | None:
        """The earlier request this one (of session ``key``) retries, when it still runs or its
        reply is kept; None for a request to run. Raises for a seq used by another request or
        forgotten."""
        session = self._sessions.get(key)
        if session is None:
            return None
        self._sessions.move_to_end(key)
        session.heard = now
        sent = session.requests.get(request.seq)
        if sent is None:
            if request.seq <= session.forgotten:
                raise ServerUnavailable(
                    f"{request.op} request seq {request.seq} is a retry older than the server "
                    f"remembers (the last {SESSION_WINDOW} finished requests of a session), so "
                    f"whether it ran is unknown")
            return None
        if (sent.id, sent.op) != (request.id, request.op):
            raise InvalidRequest(
                f"seq {request.seq} of this session was used by {sent.op} request {sent.id}, "
                f"not by {request.op} request {request.id}: a retry must repeat its request")
        if sent.finished and sent.reply is None:  # failed, or only read: run it again
            return None
        self._retries += 1
        return sent

    def begin(self, key, request: Request, now: float) -> _Sent:
        """Record a request of session ``key`` about to run."""
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _Session()
        self._sessions.move_to_end(key)
        session.heard = now
        sent = session.requests[request.seq] = _Sent(request.id, request.op, key, request.seq)
        self._forget_idle(now)
        return sent

    def finish(self, op: str, sent: _Sent, frames: list, ok: bool) -> list[bytes]:
        """Record the reply of a request; returns the connections of its waiting retries."""
        sent.finished = True
        if ok and op in KEPT_REPLIES:
            sent.reply = frames
        session = self._sessions.get(sent.key)
        if session is not None and session.requests.get(sent.seq) is sent:
            session.finished.append(sent.seq)
            while len(session.finished) > SESSION_WINDOW:
                seq = session.finished.popleft()
                old = session.requests.get(seq)
                if old is not None and old.finished:  # not one run again, still running
                    del session.requests[seq]
                    session.forgotten = max(session.forgotten, seq)
        waiters, sent.waiters = sent.waiters, []
        return waiters

    def _forget_idle(self, now: float) -> None:
        while self._sessions:
            key, oldest = next(iter(self._sessions.items()))
            if len(self._sessions) <= MAX_SESSIONS and now - oldest.heard <= SESSION_IDLE:
                return
            del self._sessions[key]

    def stats(self) -> dict:
        return {"sessions": len(self._sessions), "retries_answered": self._retries}


class _ExpiredNames:
    """Recently expired namespaces, so a late request hears why its namespace is gone."""

    _KEEP = 4096  # names remembered; the oldest are forgotten first

    def __init__(self):
        self._lock = threading.Lock()
        self._names: OrderedDict[str, None] = OrderedDict()

    def add(self, name: str) -> None:
        with self._lock:
            self._names[name] = None
            self._names.move_to_end(name)
            while len(self._names) > self._KEEP:
                self._names.popitem(last=False)

    def discard(self, name: str) -> None:
        with self._lock:
            self._names.pop(name, None)

    def explain(self, name, message: str, ttl: float | None) -> str:
        with self._lock:
            expired = name in self._names
        if not expired:
            return message
        return (f"namespace {name!r} expired after {ttl:g} s without requests (the server's "
                f"--namespace-ttl) and its memories were dropped; open it again to start afresh")


class _Metrics:
    """Per-op request counts, error counts and recent latencies (receipt to reply), for stats."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ops: dict[str, tuple[list[int], deque]] = {}

    def record(self, op: str, received: float, ok: bool) -> None:
        latency = time.monotonic() - received
        with self._lock:
            counts, latencies = self._ops.setdefault(op, ([0, 0], deque(maxlen=_LATENCY_WINDOW)))
            counts[0] += 1
            counts[1] += not ok
            latencies.append(latency)

    def snapshot(self) -> dict:
        with self._lock:
            ops = {op: (list(counts), list(latencies)) for op, (counts, latencies) in
                   self._ops.items()}
        out = {}
        for op, ((count, errors), latencies) in ops.items():
            p50, p99 = np.percentile(latencies, [50, 99]) * 1000
            out[op] = {"count": count, "errors": errors, "p50_ms": float(p50),
                       "p99_ms": float(p99)}
        return out
