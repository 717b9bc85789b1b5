"""Bounding a server's connections, so that no number of peers can take its file descriptors.

ZeroMQ accepts every TCP (or ipc) connection it is offered and has no cap of its own, so 1,100
idle connections once took every descriptor a server had: new clients were locked out and
``snapshot`` failed with "Too many open files". Here a thread watches the server socket's monitor
(``ACCEPTED`` and ``DISCONNECTED`` events, which carry the connection's descriptor) and counts
the open connections; one accepted past ``max_connections`` is shut down at once, before its
handshake (``shutdown(2)`` on its descriptor: ZeroMQ sees the end of the stream and closes it
itself, so no descriptor is closed behind its back). Its peer sees the connection close; a ZeroMQ
client retries until one is free or its time-out passes.

With ``max_per_host``, a host may hold at most that many of them (like nginx's ``limit_conn``),
so one client host cannot take all of ``max_connections`` from the others. The peer is known from
the descriptor the ``ACCEPTED`` event carries (``getpeername(2)`` on it, before the handshake).
ZeroMQ's own ``Peer-Address`` is a property of received messages only (``zmq_msg_gets``), so it
comes after the handshake and the first request, too late to refuse a connection that never
sends one. A host is an IPv4 address, an IPv6 /64 (the smallest block usually routed to one
network: a peer given a /64 could otherwise take a new address for each connection; the price is
that hosts sharing a /64 share the cap), or on an ipc socket the peer's user id (``SO_PEERCRED``:
every peer is on this machine). A peer whose address cannot be
read (already gone) counts towards ``max_connections`` only.

A connection that never completes its handshake (a stranger on a CURVE server, a raw TCP peer)
is closed after ``HANDSHAKE_MS``: by ZeroMQ on a CURVE server's ROUTER, else by ``zmtp.py``, which
shuts down the descriptors of the connections it closes, so that their ends reach the monitor.

At start, ``reserve_descriptors`` makes sure the process may open ``max_connections`` plus
``FD_RESERVE`` descriptors (raising its soft limit when the hard one allows), so that connections
cannot starve snapshots, logs and ZeroMQ's own sockets.

Race: a descriptor is shut down only when its accept is the last event seen for it, and it is
done straight after the events are read, while ZeroMQ is still in the handshake. Were ZeroMQ to
close that connection and the number to be reused within those microseconds, the shutdown would
hit the new holder: a socket (another connection, which then reconnects) or nothing (on a file
or a pipe ``shutdown`` fails with ENOTSOCK and is ignored). The peer is read at the same moment,
so the same reuse would count the connection against the new holder's host.

``zmtp.py`` closes connections long after their accept (a handshake that did not finish, a
peer that broke ZMTP or went silent), from the descriptor their connect notice carried. By then
ZeroMQ may have closed that connection and given its number to another, whose notice is read
later (the old one's end waits unread in the socket's queue), so it shuts a descriptor down only
while it still holds the socket it held when the notice was read (``socket_id``: its inode, which
no other open socket has); else the connection is gone already and nothing is shut down. A
greeting that cannot be written at a connect notice means the connection is gone before its
notice was read: it is forgotten, not shut down. What is left: a notice read only after its
connection ended and its number went to another would remember the other's socket.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import resource
import socket
import struct
import threading

import zmq
from zmq.utils.monitor import recv_monitor_message

from .ratelog import RateLimitedLog

log = logging.getLogger("memory_server")

DEFAULT_MAX_CONNECTIONS = 1024
FD_RESERVE = 256
"""Descriptors kept for everything but connections: snapshot files, logs, ZeroMQ's own sockets
and pipes, the metrics port, and connections accepted past the cap before they are shut down."""
HANDSHAKE_MS = 5000
"""A connection must complete its ZeroMQ handshake (CURVE included) within this, or is closed;
loopback handshakes take about a millisecond, across the world a few round trips."""
_POLL_MS = 200  # how often the watcher looks whether it should stop


def reserve_descriptors(max_connections: int | None) -> int:
    """The connection cap to use, after making sure the process may open that many descriptors
    plus ``FD_RESERVE``: raises the soft RLIMIT_NOFILE as far as needed. ``None`` asks for
    ``DEFAULT_MAX_CONNECTIONS``, lowered (with a warning) to what the hard limit allows; an
    explicit cap the hard limit cannot allow raises ``ValueError``."""
    wanted = DEFAULT_MAX_CONNECTIONS if max_connections is None else max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = hard if hard != resource.RLIM_INFINITY else 1 << 20
    needed = wanted + FD_RESERVE
    if needed > ceiling:
        if max_connections is not None:
            raise ValueError(
                f"--max-connections {max_connections} needs {needed} open files ({FD_RESERVE} "
                f"more for snapshots, logs and ZeroMQ), but this process may open at most "
                f"{ceiling} (ulimit -Hn): lower --max-connections or raise the limit")
        wanted = max(1, ceiling - FD_RESERVE)
        needed = wanted + FD_RESERVE
        log.warning("the open-file limit (ulimit -Hn %d) allows %d connections, not %d: "
                    "serving at most %d (--max-connections)", ceiling, wanted,
                    DEFAULT_MAX_CONNECTIONS, wanted)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return wanted


class ConnectionGuard:
    """Counts a socket's connections from its monitor and shuts down those past the cap.

    Create it on the thread that owns ``router`` (the monitor is set up on it); ``start`` runs
    the watcher thread, ``stop`` ends it and the monitor.
    """

    def __init__(self, router: zmq.Socket, max_connections: int, rejections: RateLimitedLog,
                 max_per_host: int | None = None):
        self.max_connections = max_connections
        self.max_per_host = max_per_host
        self._router = router
        address = f"inproc://memory-server-connections-{id(self):x}"
        router.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._monitor = router.context.socket(zmq.PAIR)
        # No high-water mark: at one, ZeroMQ's I/O thread would block sending the next event.
        self._monitor.setsockopt(zmq.RCVHWM, 0)
        self._monitor.connect(address)
        self._rejections = rejections
        self._open: dict[int, str | None] = {}  # descriptor -> its peer's host
        self._per_host: dict[str, int] = {}
        self._lock = threading.Lock()
        self.refused = 0
        self.refused_per_host = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="memory-server-connections",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the watcher and the monitor (before the router is closed)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self._router.disable_monitor()
        self._monitor.close(linger=0)

    def stats(self) -> dict:
        with self._lock:
            return {"open": len(self._open), "max": self.max_connections,
                    "refused": self.refused, "hosts": len(self._per_host),
                    "max_per_host": self.max_per_host,
                    "refused_per_host": self.refused_per_host}

    def _watch(self) -> None:
        while not self._stopping.is_set():
            if not self._monitor.poll(_POLL_MS):
                continue
            events = []
            while True:  # every event already there, so an accept is judged by what followed it
                try:
                    message = recv_monitor_message(self._monitor, zmq.NOBLOCK)
                except zmq.Again:
                    break
                events.append((message["event"], message["value"]))
            self._apply(events)

    def _apply(self, events: list[tuple[int, int]]) -> None:
        last = {fd: i for i, (_, fd) in enumerate(events)}
        for i, (event, fd) in enumerate(events):
            if event == zmq.EVENT_DISCONNECTED:
                with self._lock:
                    self._forget(fd)
                continue
            gone = last[fd] != i  # its disconnect follows: nothing to shut down
            host = None if gone or self.max_per_host is None else peer_host(fd)
            with self._lock:
                full = len(self._open) >= self.max_connections
                crowded = not full and host is not None \
                    and self._per_host.get(host, 0) >= self.max_per_host
                if full:
                    self.refused += 1
                elif crowded:
                    self.refused_per_host += 1
                else:
                    self._forget(fd)  # a number reused before its disconnect was seen
                    self._open[fd] = host
                    if host is not None:
                        self._per_host[host] = self._per_host.get(host, 0) + 1
            if gone or not (full or crowded):
                continue
            shut_down(fd)
            if full:
                self._rejections("refused a connection: %d are open, the most this server takes "
                                 "(--max-connections)", self.max_connections)
            else:
                self._rejections("refused a connection from %s: it has %d open, the most one "
                                 "host may have (--max-connections-per-host)", host,
                                 self.max_per_host)

    def _forget(self, fd: int) -> None:
        if fd not in self._open:
            return
        host = self._open.pop(fd)
        if host is not None:
            left = self._per_host[host] - 1
            if left:
                self._per_host[host] = left
            else:
                del self._per_host[host]


def peer_host(fd: int) -> str | None:
    """The host a connection's descriptor leads to, as the per-host cap counts it: an IPv4
    address, an IPv6 /64, or ``uid N`` for a Unix socket; None when it cannot be read."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket (any more)
        return None
    try:
        if sock.family == socket.AF_UNIX:
            _, uid, _ = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            return f"uid {uid}"
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        address = sock.getpeername()[0]
    except OSError:  # gone meanwhile
        return None
    finally:
        sock.detach()
    return host_of(address)


def host_of(address: str) -> str:
    """The per-host cap's host of an IP address: itself for IPv4 (also when IPv4-mapped), its
    /64 for IPv6."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def socket_id(fd: int) -> tuple[int, int] | None:
    """What tells the socket on ``fd`` from one given the same number later (its device and
    inode); None when ``fd`` is not open."""
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def shut_down(fd: int, expected: tuple[int, int] | None = None) -> bool:
    """End the connection on ``fd`` without closing the descriptor, which ZeroMQ owns; with
    ``expected`` (its ``socket_id`` when it was that connection's), only if ``fd`` still holds
    that socket. Returns whether it was shut down."""
    if expected is not None and socket_id(fd) != expected:
        return False  # closed by ZeroMQ and the number reused: not ours to end
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket (any more)
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    finally:
        sock.detach()
    return True
