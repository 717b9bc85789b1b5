"""MemoryClient: the memories of many memory servers behind one numpy interface.

Rows are sharded over servers (``row % len(servers)``): a batch call sends one request to every
server that owns some of its rows, all at once, and gathers the replies back into batch order.
Every op has an ``*_async`` form returning a ``concurrent.futures.Future`` and a blocking form.

Threads: one I/O thread owns every socket (ZeroMQ sockets are not thread-safe). Callers encode
their requests, put them on a queue and wake the I/O thread through a pipe its poller watches, so
the client may be used from any number of threads. Requests sent by one client (from one thread,
or ordered by the caller across threads) reach each server in order, and the server applies them
to a memory in that order: a search sent right after an add sees the add.

Arrays are sent without copying: do not modify an array passed to ``add_async`` or
``search_async`` until its future is done.

Faults (Lazy Pirate, with idempotent retries): a request a server has not answered after
``retry_after`` seconds (half the timeout by default) makes the client close that server's socket,
open a fresh one and send every request still unanswered there again. Each request carries this
client's session id (random, one per client object) and a sequence number, so the server answers a
request it already has with the original's reply (at once, or when the original finishes) instead
of running it twice, and orders the session's requests across connections. A request still
unanswered ``timeout`` seconds after it was first sent fails with ``ServerUnavailable`` naming the
server and the op (whether it took effect is then unknown; calling again makes it a new request),
and later calls succeed once the server is back.

A server that goes away is noticed without waiting for time-outs: ZeroMQ heartbeats close a
connection whose peer is silent for 2 s (``protocol.HEARTBEAT_*``), and a socket monitor sees the
connection drop, at once when the server's process dies. Its requests in flight then fail with
``ServerUnavailable`` saying the server went away, and the socket is replaced, so none of them
reaches a server that comes back. Memories live in the server: every reply names the server
instance that sent it, and when a namespace this client opened is unknown to another instance at
the same address, the client raises ``ServerRestarted`` (an ``UnknownNamespace``) saying that
server's memories were lost. Open the namespace again, or restore a snapshot
(``snapshot``/``restore``: each server keeps its own shard).

Security: with ``server_public_key`` every socket (and every socket opened on reconnect) is a
CURVE client: encrypted, and accepted only by a server that allows this client's public key. A
server that refuses the key sends nothing; the call fails with ``ServerUnavailable`` at its
timeout. Without CURVE, a server started with ``--token-file`` wants a token in every request
(``token``, by default the one in the file ``$MEMTRANS_TOKEN_FILE`` names) and refuses a request
without the right one with ``Unauthorized``. Either way the client's key or token is its tenant:
it sees only the namespaces it opened (``tenants.py``).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import auth, tenants
from .auth import KeySource
from .errors import ERRORS_BY_CODE, InvalidRequest, MemoryServerError, ProtocolError, \
    ServerRestarted, ServerUnavailable, UnknownNamespace
from .protocol import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, Reply, decode_reply, encode_request
from .store import NamespaceConfig, Retrieval
from .wakeup import Wakeup

log = logging.getLogger("memory_server.client")

_GRACE = 5.0  # beyond the timeout, how long a blocking call waits for the I/O thread itself
_POLL_MS = 1000  # upper bound on a poll when nothing is due


@dataclass(slots=True)
class _Call:
    id: int
    op: str
    namespace: str | None
    frames: list
    """Kept until the reply, to be sent again on a new connection."""
    future: Future
    deadline: float = 0.0
    retry_at: float = math.inf
    """When to send it again on a fresh connection; inf once it was."""


@dataclass(slots=True)
class _Connection:
    """A server's socket and its requests awaiting replies, oldest (earliest deadline) first."""

    endpoint: str
    socket: zmq.Socket
    monitor: zmq.Socket
    """The socket's handshake and disconnect events."""
    pending: dict[int, _Call] = field(default_factory=dict)
    up: bool = False
    """Whether the connection was made: only then is a disconnect the server going away."""


class MemoryClient:
    """Numpy client of one or more memory servers; see the module docstring."""

    def __init__(self, servers: list[str] | str, *, timeout: float = 30.0,
                 retry_after: float | None = None,
                 server_public_key: KeySource | Sequence[KeySource] | None = None,
                 public_key: KeySource | None = None, secret_key: KeySource | None = None,
                 token: str | None = None):
        """``timeout``: seconds a request may go unanswered before it fails; ``retry_after``:
        seconds after which it is sent again on a fresh connection (default ``timeout / 2``).
        ``server_public_key`` (one for all servers, or one per server) turns CURVE on; it
        needs this client's ``secret_key`` (``public_key`` is derived from it when omitted).
        Keys are key files from ``memory-server keygen``, or Z85 keys inline (bytes, or a
        string ``"z85:KEY"``). ``token``: this client's token for servers started with
        ``--token-file``; by default read from the file ``$MEMTRANS_TOKEN_FILE`` names, when
        set."""
        servers = [servers] if isinstance(servers, str) else list(servers)
        if not servers or not all(isinstance(s, str) and "://" in s for s in servers):
            raise ValueError(f"servers must be a non-empty list of ZeroMQ endpoints like "
                             f"tcp://127.0.0.1:5555, got {servers!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        if retry_after is not None and not retry_after > 0:
            raise ValueError(f"retry_after must be positive seconds, got {retry_after!r}")
        self.servers: tuple[str, ...] = tuple(servers)
        self.timeout = float(timeout)
        self.retry_after = self.timeout / 2 if retry_after is None else float(retry_after)
        self.session = os.urandom(16)
        """Sent with every request, so the servers answer a retried one once."""
        self._seqs = [itertools.count(1) for _ in self.servers]
        # (endpoint, namespace) -> instance of the server that opened it; I/O thread only.
        self._opened: dict[tuple[str, str], str] = {}
        self._curve = _curve_options(self.servers, server_public_key, public_key, secret_key)
        if token is None and os.environ.get(tenants.TOKEN_ENV):
            try:
                token = tenants.read_client_token(os.environ[tenants.TOKEN_ENV])
            except ValueError as exc:
                raise ValueError(f"${tenants.TOKEN_ENV}: {exc}") from None
        self._token = token
        self._context = zmq.Context()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = Wakeup()
        self._lock = threading.Lock()  # no request enters the inbox once close() has begun
        self._closed = False
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="memory-client-io", daemon=True)
        self._thread.start()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ops

    def ping_async(self) -> Future[list[float]]:
        """Round-trip seconds to each server, in the order of ``servers``."""
        start = time.monotonic()
        futures = [self._submit(i, "ping") for i in range(len(self.servers))]
        times = [0.0] * len(futures)
        for i, f in enumerate(futures):
            f.add_done_callback(lambda _, i=i: times.__setitem__(i, time.monotonic() - start))
        return _gather(futures, lambda replies: times)

    def open_async(self, namespace: str, config: NamespaceConfig) -> Future[None]:
        """Declare ``namespace`` with ``config`` on every server (a no-op if already the same)."""
        args = {"namespace": namespace, "config": config.to_dict()}
        return _gather([self._submit(i, "open", args) for i in range(len(self.servers))], _none)

    def add_async(self, namespace: str, layer: int, rows, keys: np.ndarray,
                  values: np.ndarray) -> Future[None]:
        """Append ``keys``/``values`` ``(b, n, dim)`` float32 to the memories of ``rows``."""
        rows = _rows(rows)
        _check_batch(rows, keys=keys, values=values)
        args = {"namespace": namespace, "layer": _plain(layer)}
        futures = [self._submit(server, "add", args, {"rows": _take(rows, idx),
                                                      "keys": _take(keys, idx),
                                                      "values": _take(values, idx)})
                   for server, idx in self._shard(rows)]
        return _gather(futures, _none)

    def search_async(self, namespace: str, layer: int, rows, queries: np.ndarray,
                     k: int) -> Future[Retrieval]:
        """Top-``k`` memories by inner product for ``queries`` ``(b, q, dim)`` float32."""
        rows = _rows(rows)
        _check_batch(rows, queries=queries)
        args = {"namespace": namespace, "layer": _plain(layer), "k": _plain(k)}
        shards = self._shard(rows)
        futures = [self._submit(server, "search", args, {"rows": _take(rows, idx),
                                                         "queries": _take(queries, idx)})
                   for server, idx in shards]
        shape = (len(rows), np.shape(queries)[1], k)
        return _gather(futures, lambda replies: _merge(shards, replies, shape))

    def clear_async(self, namespace: str, rows,
                    layers: Sequence[int] | None = None) -> Future[None]:
        """Empty the memories of ``rows`` in ``layers`` (default: every layer)."""
        rows = _rows(rows)
        args = {"namespace": namespace}
        if layers is not None:
            args["layers"] = [_plain(layer) for layer in layers]
        futures = [self._submit(server, "clear", args, {"rows": _take(rows, idx)})
                   for server, idx in self._shard(rows)]
        return _gather(futures, _none)

    def drop_async(self, namespace: str) -> Future[None]:
        """Free ``namespace`` on every server."""
        args = {"namespace": namespace}
        return _gather([self._submit(i, "drop", args) for i in range(len(self.servers))], _none)

    def stats_async(self) -> Future[list[dict]]:
        """Each server's stats (memories, entries, bytes, requests and latency per op, ...)."""
        return _gather([self._submit(i, "stats") for i in range(len(self.servers))],
                       lambda replies: [r.result for r in replies])

    def snapshot_async(self, namespace: str, tag: str) -> Future[list[dict]]:
        """Each server writes its shard of ``namespace`` to its data directory, as
        ``shard_tag(tag, i, n)``, after every request this client sent before; one result each."""
        n = len(self.servers)
        return _gather([self._submit(i, "snapshot", {"namespace": namespace,
                                                     "tag": shard_tag(tag, i, n)})
                        for i in range(n)], lambda replies: [r.result for r in replies])

    def restore_async(self, namespace: str, tag: str, *, servers: Sequence[str] | None = None,
                      if_missing: bool = False) -> Future[list[dict]]:
        """Replace ``namespace`` on each server (or only on ``servers``) by its shard of the
        snapshot ``tag``; with ``if_missing``, only on servers where it is not open."""
        n = len(self.servers)
        chosen = range(n) if servers is None else [self._index(s) for s in servers]
        return _gather([self._submit(i, "restore", {"namespace": namespace,
                                                    "tag": shard_tag(tag, i, n),
                                                    "if_missing": if_missing})
                        for i in chosen], lambda replies: [r.result for r in replies])

    def snapshots_async(self) -> Future[list[list[dict]]]:
        """The snapshot files in each server's data directory."""
        return _gather([self._submit(i, "snapshots") for i in range(len(self.servers))],
                       lambda replies: [r.result["snapshots"] for r in replies])

    def ping(self) -> list[float]:
        return self._wait(self.ping_async())

    def open(self, namespace: str, config: NamespaceConfig) -> None:
        self._wait(self.open_async(namespace, config))

    def add(self, namespace: str, layer: int, rows, keys: np.ndarray, values: np.ndarray) -> None:
        self._wait(self.add_async(namespace, layer, rows, keys, values))

    def search(self, namespace: str, layer: int, rows, queries: np.ndarray, k: int) -> Retrieval:
        return self._wait(self.search_async(namespace, layer, rows, queries, k))

    def clear(self, namespace: str, rows, layers: Sequence[int] | None = None) -> None:
        self._wait(self.clear_async(namespace, rows, layers))

    def drop(self, namespace: str) -> None:
        self._wait(self.drop_async(namespace))

    def stats(self) -> list[dict]:
        return self._wait(self.stats_async())

    def snapshot(self, namespace: str, tag: str) -> list[dict]:
        return self._wait(self.snapshot_async(namespace, tag))

    def restore(self, namespace: str, tag: str, *, servers: Sequence[str] | None = None,
                if_missing: bool = False) -> list[dict]:
        return self._wait(self.restore_async(namespace, tag, servers=servers,
                                             if_missing=if_missing))

    def snapshots(self) -> list[list[dict]]:
        return self._wait(self.snapshots_async())

    def shutdown_server(self, endpoint: str) -> None:
        """Ask the server at ``endpoint`` (one of ``servers``) to finish its work and exit."""
        self._wait(_gather([self._submit(self._index(endpoint), "shutdown")], _none))

    def _index(self, endpoint: str) -> int:
        if endpoint not in self.servers:
            raise ValueError(f"{endpoint!r} is not one of this client's servers {self.servers}")
        return self.servers.index(endpoint)

    def close(self) -> None:
        """Fail what is outstanding, close the sockets (linger 0) and stop the I/O thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake()
        self._thread.join(timeout=_GRACE)
        if self._thread.is_alive():
            log.error("memory client I/O thread did not stop; leaving its sockets open")
            return
        self._context.term()
        self._wakeup.close()

    # caller side

    def _submit(self, server: int, op: str, args: dict | None = None,
                arrays: dict | None = None) -> Future[Reply]:
        request_id = next(self._ids)
        future: Future = Future()
        future.set_running_or_notify_cancel()  # requests in flight cannot be taken back
        with self._lock:  # so each server's requests enter the inbox in the order of their seq
            if self._closed:
                raise MemoryServerError("this MemoryClient is closed")
            try:
                frames = encode_request(request_id, op, args, arrays, session=self.session,
                                        seq=next(self._seqs[server]), token=self._token)
            except TypeError as exc:  # msgpack cannot encode an argument
                raise InvalidRequest(f"{op}: an argument cannot be sent: {exc}") from None
            namespace = (args or {}).get("namespace")
            self._inbox.put((server, _Call(request_id, op, namespace, frames, future)))
            self._wake()
        return future

    def _wait(self, future: Future):
        try:
            return future.result(timeout=self.timeout + _GRACE)
        except FutureTimeout:
            raise ServerUnavailable(f"no answer from the memory client's I/O thread within "
                                    f"{self.timeout + _GRACE:g} s") from None

    def _shard(self, rows: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
        """(server, positions in the batch of the rows it owns); None means the whole batch."""
        n = len(self.servers)
        if n == 1:
            return [(0, None)]
        owner = rows % n
        shards = [(s, np.flatnonzero(owner == s)) for s in range(n)]
        return [(s, idx) for s, idx in shards if idx.size]

    def _wake(self) -> None:
        self._wakeup.wake()

    # I/O thread

    def _run(self) -> None:
        connections = [self._connect(endpoint) for endpoint in self.servers]
        poller = zmq.Poller()
        poller.register(self._wakeup.read_fd, zmq.POLLIN)
        for conn in connections:
            poller.register(conn.socket, zmq.POLLIN)
            poller.register(conn.monitor, zmq.POLLIN)
        try:
            while not self._closed:
                events = dict(poller.poll(self._poll_ms(connections)))
                if self._wakeup.read_fd in events:
                    self._wakeup.drain()
                self._send_queued(connections)
                for i, conn in enumerate(connections):
                    if events.get(conn.socket):
                        self._receive(conn)
                    if events.get(conn.monitor):
                        self._watch(connections, i, poller)
                self._expire(connections, poller)
        except Exception:
            log.exception("memory client I/O thread failed")
        finally:
            with self._lock:
                self._closed = True
            closed = MemoryServerError("the MemoryClient was closed before the reply came")
            for conn in connections:
                for call in conn.pending.values():
                    call.future.set_exception(closed)
                _close(conn)
            while not self._inbox.empty():
                _, call = self._inbox.get()
                call.future.set_exception(closed)

    def _connect(self, endpoint: str) -> _Connection:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if self._curve is not None:
            server_keys, keys = self._curve
            auth.make_curve_client(sock, server_keys[endpoint], keys)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(endpoint)
        return _Connection(endpoint, sock, monitor)

    def _replace(self, connections: list[_Connection], i: int, poller: zmq.Poller) -> None:
        """A fresh socket for server ``i``: nothing queued on the old one is sent any more."""
        old = connections[i]
        poller.unregister(old.socket)
        poller.unregister(old.monitor)
        _close(old)
        connections[i] = self._connect(old.endpoint)
        poller.register(connections[i].socket, zmq.POLLIN)
        poller.register(connections[i].monitor, zmq.POLLIN)

    def _watch(self, connections: list[_Connection], i: int, poller: zmq.Poller) -> None:
        """Read socket events: when a connection that was made drops, fail its requests now."""
        conn = connections[i]
        while True:
            try:
                event = recv_monitor_message(conn.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                conn.up = True
            elif event == zmq.EVENT_DISCONNECTED and conn.up:
                for call in conn.pending.values():
                    call.future.set_exception(ServerUnavailable(
                        f"{conn.endpoint} went away while {call.op} was in flight: the connection "
                        f"was lost (the server exited or was killed, or its host did not answer "
                        f"heartbeats for {HEARTBEAT_TIMEOUT_MS / 1000:g} s), so whether it took "
                        f"effect is unknown; later calls will reach the server when it is back"))
                log.warning("%s went away (connection lost, %d requests failed); reconnecting",
                            conn.endpoint, len(conn.pending))
                self._replace(connections, i, poller)
                return

    def _poll_ms(self, connections: list[_Connection]) -> int:
        due = min((min(call.deadline, call.retry_at) for conn in connections
                   for call in conn.pending.values()), default=math.inf)
        if due == math.inf:
            return _POLL_MS
        return max(0, min(_POLL_MS, int((due - time.monotonic()) * 1000) + 1))

    def _send_queued(self, connections: list[_Connection]) -> None:
        while True:
            try:
                server, call = self._inbox.get_nowait()
            except queue.Empty:
                return
            now = time.monotonic()
            call.deadline, call.retry_at = now + self.timeout, now + self.retry_after
            self._send(connections[server], call)

    def _send(self, conn: _Connection, call: _Call) -> None:
        try:
            conn.socket.send_multipart(call.frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # Again: the queue to an unreachable server is full
            call.future.set_exception(ServerUnavailable(
                f"{conn.endpoint}: cannot send {call.op}: {exc}; is the server running?"))
            return
        conn.pending[call.id] = call

    def _receive(self, conn: _Connection) -> None:
        while True:
            try:
                frames = conn.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                reply = decode_reply(frames)
            except ProtocolError as exc:
                log.warning("dropping a malformed reply from %s: %s", conn.endpoint, exc)
                continue
            call = conn.pending.pop(reply.id, None)
            if call is None:
                log.warning("dropping a reply from %s to no outstanding request (id %s): %s",
                            conn.endpoint, reply.id, reply.message or "ok")
            elif reply.ok:
                self._note_opened(conn.endpoint, call, reply)
                call.future.set_result(reply)
            else:
                call.future.set_exception(self._error(conn.endpoint, call, reply))

    def _note_opened(self, endpoint: str, call: _Call, reply: Reply) -> None:
        """Remember which server instance holds each namespace this client opened there."""
        key = (endpoint, call.namespace)
        if call.op in ("open", "restore") and reply.instance is not None:
            self._opened[key] = reply.instance
        elif call.op == "drop":
            self._opened.pop(key, None)

    def _error(self, endpoint: str, call: _Call, reply: Reply) -> MemoryServerError:
        error = ERRORS_BY_CODE.get(reply.code, MemoryServerError)
        opened = self._opened.get((endpoint, call.namespace))
        if error is UnknownNamespace and opened is not None and reply.instance is not None \
                and reply.instance != opened:
            return ServerRestarted(
                f"{endpoint} restarted, or another server took its address, since this client "
                f"opened namespace {call.namespace!r} there (server instance {opened} then, "
                f"{reply.instance} now): the namespace's memories on that server were lost. Open "
                f"it again to go on with empty memories there, or restore a snapshot")
        return error(f"{endpoint}: {reply.message}")

    def _expire(self, connections: list[_Connection], poller: zmq.Poller) -> None:
        """Fail the requests past their deadline; past a request's retry point or a deadline,
        replace the connection and send what is still unanswered again."""
        now = time.monotonic()
        for i, conn in enumerate(connections):
            due = False
            for call in list(conn.pending.values()):
                if call.deadline <= now:
                    del conn.pending[call.id]
                    again = f" (sent again on a fresh connection after {self.retry_after:g} s)" \
                        if self.retry_after < self.timeout else ""
                    call.future.set_exception(ServerUnavailable(
                        f"{conn.endpoint} did not answer {call.op} within {self.timeout:g} s"
                        f"{again}; is the server running? Whether it took effect is unknown; "
                        f"later calls will try again"))
                    due = True
                elif call.retry_at <= now:
                    due = True
            if not due:
                continue
            self._replace(connections, i, poller)
            for call in conn.pending.values():  # the server answers each once
                call.retry_at = math.inf
                self._send(connections[i], call)
            log.warning("no reply from %s in time; reconnected and sent the %d unanswered "
                        "requests again", conn.endpoint, len(conn.pending))


def _close(conn: _Connection) -> None:
    conn.socket.disable_monitor()
    conn.monitor.close(linger=0)
    conn.socket.close(linger=0)


def shard_tag(tag: str, server: int, num_servers: int) -> str:
    """The snapshot tag of server ``server``'s shard: distinct per shard, so servers may share a
    data directory, and naming the server count, so a restore onto another count finds nothing."""
    return f"{tag}.shard-{server}-of-{num_servers}"


def _curve_options(servers: tuple[str, ...], server_public_key, public_key, secret_key):
    """(server endpoint -> its public key, this client's key pair), or None without CURVE."""
    if server_public_key is None:
        if secret_key is not None or public_key is not None:
            raise ValueError("a client key pair was given without server_public_key: CURVE needs "
                             "the server's public key too")
        return None
    if secret_key is None:
        raise ValueError("server_public_key needs this client's secret_key (a .key_secret file "
                         "from `memory-server keygen` whose public key the server allows)")
    if isinstance(server_public_key, (bytes, str, os.PathLike)):
        server_public_key = [server_public_key] * len(servers)
    server_public_key = list(server_public_key)
    if len(server_public_key) != len(servers):
        raise ValueError(f"server_public_key must be one key, or one per server "
                         f"({len(servers)}), got {len(server_public_key)}")
    server_keys = {endpoint: auth.load_key(key, "server_public_key")
                   for endpoint, key in zip(servers, server_public_key)}
    return server_keys, auth.load_key_pair(secret_key, public_key, "secret_key")


def _gather(futures: list[Future], combine: Callable[[list[Reply]], object]) -> Future:
    """One future for all ``futures``: ``combine`` of their replies, or the first one's error."""
    out: Future = Future()
    out.set_running_or_notify_cancel()
    remaining = [len(futures)]
    lock = threading.Lock()

    def done(_):
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            out.set_exception(errors[0])
            return
        try:
            out.set_result(combine([f.result() for f in futures]))
        except Exception as exc:  # a reply that does not have what its op promises
            out.set_exception(ProtocolError(f"malformed reply: {type(exc).__name__}: {exc}"))

    for f in futures:
        f.add_done_callback(done)
    return out


def _none(replies: list[Reply]) -> None:
    return None


def _merge(shards: list[tuple[int, np.ndarray | None]], replies: list[Reply],
           shape: tuple[int, int, int]) -> Retrieval:
    """One Retrieval in batch order from the per-server ones, sharing a single "none" entry 0."""
    if len(replies) == 1 and shards[0][1] is None:
        a = replies[0].arrays
        return Retrieval(a["keys"], a["values"], a["positions"])
    keys, values = [replies[0].arrays["keys"][:1]], [replies[0].arrays["values"][:1]]
    positions = np.zeros(shape, np.int32)
    offset = 0
    for (_, idx), reply in zip(shards, replies):
        a = reply.arrays
        positions[idx] = np.where(a["positions"] > 0, a["positions"] + offset, 0)
        keys.append(a["keys"][1:])
        values.append(a["values"][1:])
        offset += a["keys"].shape[0] - 1
    return Retrieval(np.concatenate(keys), np.concatenate(values), positions)


def _rows(rows) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.size == 0 or rows.dtype.kind not in "iu":
        raise InvalidRequest(f"rows must be a non-empty 1-d integer array, got shape "
                             f"{rows.shape} dtype {rows.dtype}")
    return rows.astype(np.int64, copy=False)


def _check_batch(rows: np.ndarray, **arrays) -> None:
    for name, array in arrays.items():
        shape = np.shape(array)
        if len(shape) != 3 or shape[0] != len(rows):
            raise InvalidRequest(f"{name} must have shape ({len(rows)}, n, dim) to match "
                                 f"{len(rows)} rows, got {shape}")


def _take(array, idx: np.ndarray | None):
    return array if idx is None else np.asarray(array)[idx]


def _plain(value):
    """numpy integers as Python ints, which msgpack can encode."""
    return int(value) if isinstance(value, np.integer) else value


