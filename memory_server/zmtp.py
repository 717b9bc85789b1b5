"""ZMTP 3.1 spoken by the server itself over a ZMQ_STREAM socket, so that it reads a message's
frames as they arrive, where libzmq hands a message over only when all of it is in.

libzmq delivers a multipart message whole: its frames pile up in the connection's pipe until
the last one (a message still arriving never fills the pipe, so TCP never pushes back), and the
reader must then take every frame before another client's request (README, "What ZeroMQ does
not let the server bound"). A STREAM socket hands over each connection's bytes as they are read,
in chunks of at most 8 KiB; a connection's pipe holds at most ``RCVHWM`` chunks, then TCP pushes
back on its sender; and the fair queue moves to the next connection after each chunk. Parsing
the frames here therefore lets the server

- refuse a message as soon as its bytes pass ``max_message_bytes`` or its frames ``MAX_FRAMES``
  and skip the rest of it as it comes, keeping none of it;
- make a message of many frames cost its sender's turns, chunk by chunk, not everyone's time.

Clients are unchanged libzmq DEALER sockets. This end does the NULL security handshake (greeting
and READY), answers PINGs, pings every peer each ``HEARTBEAT_IVL_MS`` and closes one silent for
``HEARTBEAT_TIMEOUT_MS`` (while the server reads) or still in its handshake after
``HANDSHAKE_MS``. A peer that breaks ZMTP has its connection closed. CURVE needs libzmq's engine
(its cryptography), so a CURVE server keeps a ROUTER socket; it admits only the clients given
keys, and the README says what that bounds.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from .connections import HANDSHAKE_MS, shut_down, socket_id
from .protocol import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, MAX_FRAMES


def greeting(mechanism: bytes = b"NULL") -> bytes:
    """A ZMTP 3.1 greeting: signature, version, mechanism, as-server flag (unused by NULL),
    filler."""
    return b"\xff" + bytes(8) + b"\x7f" + b"\x03\x01" + mechanism.ljust(20, b"\0") + bytes(32)


GREETING = greeting()
PEER_TYPES = (b"DEALER", b"REQ", b"ROUTER")
"""The socket types a ROUTER talks to (ZMTP 3.1, RFC 23)."""
MAX_COMMAND_BYTES = 4096
"""Longest command accepted: a READY with its properties, a PING with its context."""
RCVHWM = 64
"""Chunks of up to 8 KiB a connection's pipe holds while the server does not read it."""
SMALL_FRAME = 64 << 10
"""Frames below this are copied into one send with their headers; larger ones go zero-copy."""
CLOSED_REMEMBERED = 4096
"""Connections closed here whose disconnect notices are still told from new connections."""

_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
_GREETING, _READY, _OPEN = range(3)  # handshake stages


def command(name: bytes, body: bytes = b"") -> bytes:
    """A ZMTP command frame."""
    data = bytes([len(name)]) + name + body
    if len(data) < 256:
        return bytes([_COMMAND, len(data)]) + data
    return bytes([_COMMAND | _LONG]) + struct.pack(">Q", len(data)) + data


def ready(socket_type: bytes) -> bytes:
    """The READY command of a NULL handshake naming ``socket_type``."""
    name = b"Socket-Type"
    return command(b"READY", bytes([len(name)]) + name + struct.pack(">I", len(socket_type))
                   + socket_type)


def frame_header(size: int, more: bool) -> bytes:
    flags = _MORE if more else 0
    if size < 256:
        return bytes([flags, size])
    return bytes([flags | _LONG]) + struct.pack(">Q", size)


def properties(data: bytes) -> dict[bytes, bytes]:
    """The metadata of a READY command's body; raises ValueError when it is malformed."""
    found, pos = {}, 0
    while pos < len(data):
        size = data[pos]
        name = data[pos + 1:pos + 1 + size]
        pos += 1 + size
        if len(name) != size or pos + 4 > len(data):
            raise ValueError("truncated property name")
        (length,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + length > len(data):
            raise ValueError("truncated property value")
        found[name.lower()] = data[pos:pos + length]
        pos += length
    return found


@dataclass
class Message:
    """A message read whole, or a refused one: then ``frames`` holds its first frame (the
    request's header, for the error's id) when that fitted, and nothing else."""
    identity: bytes
    frames: list
    count: int  # its frames
    size: int  # its bytes
    refused: bool


class ProtocolViolation(Exception):
    """A peer broke ZMTP; its connection is closed."""


class _Peer:
    __slots__ = ("fd", "socket_id", "stage", "head", "header_size", "flags", "body", "need",
                 "frames", "count", "size", "refused", "heard", "since")

    def __init__(self, now: float, fd: int = -1):
        self.fd = fd  # the connection's descriptor (ZeroMQ's), -1 if unknown
        self.socket_id = socket_id(fd) if fd >= 0 else None  # the socket fd holds for it
        self.stage = _GREETING
        self.head = bytearray()  # the greeting or a frame header being read
        self.header_size = len(GREETING)  # bytes head must reach
        self.flags = 0
        self.body: bytearray | None = None  # the frame being filled; None while skipping one
        self.need = 0  # bytes of the frame's body still to come; 0 while reading a header
        self.frames: list[bytearray] = []  # of the message under way
        self.count = 0
        self.size = 0
        self.refused = False
        self.heard = now
        self.since = now

    def kept(self) -> int:
        """Bytes held of the message under way."""
        filling = self.body is not None and not self.flags & _COMMAND
        return sum(len(frame) for frame in self.frames) + (len(self.body) if filling else 0)


class ZmtpStream:
    """A ROUTER's half of ZMTP over ``sock`` (a bound ZMQ_STREAM socket), for the I/O thread.

    ``receive`` reads chunks and returns the messages they completed; ``send`` writes one;
    ``tick`` keeps the heartbeats and deadlines. ``buffered`` is the bytes held of messages
    still arriving (at most ``max_message_bytes`` a connection), which the server counts as in
    flight. ``on_violation(text, *args)`` hears of connections closed for breaking ZMTP.
    """

    def __init__(self, sock: zmq.Socket, max_message_bytes: int,
                 on_violation: Callable[..., None]):
        self.sock = sock
        self.max_message_bytes = max_message_bytes
        self._on_violation = on_violation
        self._peers: dict[bytes, _Peer] = {}
        self._closed: OrderedDict[bytes, None] = OrderedDict()
        self.buffered = 0
        self._last_tick = time.monotonic()
        self._reading = True

    def receive(self, max_messages: int, budget_s: float = 0.005) -> list[Message]:
        """Messages completed by the chunks read within about ``budget_s`` (at most
        ``max_messages`` of them; raises nothing when there is no chunk)."""
        done: list[Message] = []
        deadline = time.monotonic() + budget_s
        while len(done) < max_messages:
            try:
                identity, chunk = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            identity = identity.bytes
            now = time.monotonic()
            peer = self._peers.get(identity)
            if not len(chunk):  # a connection made or lost
                if peer is not None:
                    self._forget(identity)
                elif identity in self._closed:  # the end of one closed here
                    del self._closed[identity]
                else:
                    self._connect(identity, now, chunk.get(zmq.SRCFD))
                continue
            if peer is None:  # the tail of a connection closed here
                continue
            peer.heard = now
            try:
                self._feed(identity, peer, memoryview(chunk.buffer), done)
            except ProtocolViolation as exc:
                self.close(identity)
                self._on_violation("closed a connection that broke ZMTP: %s", exc)
            if now >= deadline:
                break
        return done

    def send(self, identity: bytes, frames: list) -> list[zmq.MessageTracker]:
        """Queue one message; returns the trackers of the frames sent without a copy.

        Raises zmq.ZMQError when the peer is gone (EHOSTUNREACH) or not reading (EAGAIN: its
        queue is full, and the connection is closed, since a message cut short would break the
        stream for all that follows)."""
        parts: list = []
        small = bytearray()
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            view = memoryview(frame).cast("B")
            small += frame_header(view.nbytes, i < last)
            if view.nbytes < SMALL_FRAME:
                small += view
            else:
                parts.append(bytes(small))
                small = bytearray()
                parts.append(view)
        if small:
            parts.append(bytes(small))
        return self._write(identity, parts)

    def tick(self, reading: bool) -> None:
        """Ping the peers and close the silent ones, once per HEARTBEAT_IVL_MS; ``reading``
        says whether the server reads now (a peer is not silent while it is not read)."""
        now = time.monotonic()
        if reading and not self._reading:  # what was not read while paused was not silence
            for peer in self._peers.values():
                peer.heard = max(peer.heard, now)
        self._reading = reading
        if now - self._last_tick < HEARTBEAT_IVL_MS / 1000:
            return
        self._last_tick = now
        ping = command(b"PING", b"\0\0")
        for identity, peer in list(self._peers.items()):
            if peer.stage != _OPEN:
                if now - peer.since > HANDSHAKE_MS / 1000:
                    self.close(identity)
                    self._on_violation("closed a connection still in its handshake after %d ms",
                                       HANDSHAKE_MS)
                continue
            if reading and now - peer.heard > HEARTBEAT_TIMEOUT_MS / 1000:
                self.close(identity)
                continue
            try:
                self._write(identity, [ping])
            except zmq.ZMQError:
                pass  # closed by _write, or gone: its disconnect is on its way

    def close(self, identity: bytes) -> None:
        """Close a connection. Its descriptor is shut down, so that ZeroMQ sees it end as if
        the peer had closed it and the connection caps (``connections.py``, from the socket
        monitor, which a close asked of the STREAM socket does not reach) count it gone; when
        that descriptor holds another socket by now, the connection is gone already."""
        peer = self._peers.get(identity)
        self._forget(identity)
        self._closed[identity] = None
        if len(self._closed) > CLOSED_REMEMBERED:
            self._closed.popitem(last=False)
        if peer is not None and peer.socket_id is not None \
                and shut_down(peer.fd, peer.socket_id):
            return
        try:
            self.sock.send_multipart([identity, b""], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # gone already

    def close_largest(self) -> int:
        """Close the connection holding the most bytes of a message under way (as Redis drops
        the client with the largest buffer); returns those bytes."""
        identity, peer = max(self._peers.items(), key=lambda item: item[1].kept())
        kept = peer.kept()
        self.close(identity)
        return kept

    def _connect(self, identity: bytes, now: float, fd: int) -> None:
        self._peers[identity] = _Peer(now, fd)
        try:
            self.sock.send_multipart([identity, GREETING + ready(b"ROUTER")], zmq.NOBLOCK)
        except zmq.ZMQError:  # gone before its notice was read: its descriptor may be another's
            self._forget(identity)

    def _forget(self, identity: bytes) -> None:
        peer = self._peers.pop(identity, None)
        if peer is not None:
            self.buffered -= peer.kept()

    def _write(self, identity: bytes, parts: list) -> list[zmq.MessageTracker]:
        trackers = []
        for i, part in enumerate(parts):
            try:
                self.sock.send(identity, zmq.NOBLOCK | zmq.SNDMORE)
                tracker = self.sock.send(part, zmq.NOBLOCK, copy=False, track=True)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EAGAIN or i:
                    self.close(identity)
                raise
            if not tracker.done:
                trackers.append(tracker)
        return trackers

    def _feed(self, identity: bytes, peer: _Peer, data: memoryview, done: list) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if peer.need:  # inside a frame's body
                take = min(peer.need, end - pos)
                if peer.body is not None:  # grown as bytes come: announcing a size costs nothing
                    peer.body += data[pos:pos + take]
                    if not peer.flags & _COMMAND:
                        self.buffered += take
                peer.need -= take
                pos += take
                if not peer.need:
                    self._end_frame(identity, peer, done)
                continue
            if not peer.head and peer.stage != _GREETING and end - pos >= 9:  # a whole header
                flags = data[pos]
                if flags & _LONG:
                    size = int.from_bytes(data[pos + 1:pos + 9], "big")
                    pos += 9
                else:
                    size = data[pos + 1]
                    pos += 2
                self._begin_frame(identity, peer, flags, size, done)
                continue
            peer.head.append(data[pos])
            pos += 1
            if len(peer.head) == 1 and peer.stage != _GREETING:
                peer.header_size = 9 if peer.head[0] & _LONG else 2
            if len(peer.head) < peer.header_size:
                continue
            head = bytes(peer.head)
            peer.head.clear()
            if peer.stage == _GREETING:
                self._greeted(peer, head)
            else:
                size = int.from_bytes(head[1:], "big")
                self._begin_frame(identity, peer, head[0], size, done)

    def _greeted(self, peer: _Peer, greeting: bytes) -> None:
        if greeting[0] != 0xFF or not greeting[9] & 0x01:
            raise ProtocolViolation("not a ZMTP greeting")
        if greeting[10] < 3:
            raise ProtocolViolation(f"ZMTP {greeting[10]}.{greeting[11]}; this server speaks 3.x")
        mechanism = greeting[12:32].rstrip(b"\0")
        if mechanism != b"NULL":
            raise ProtocolViolation(f"security mechanism {mechanism[:20]!r}; this server (no "
                                    f"CURVE) takes NULL")
        peer.stage = _READY

    def _begin_frame(self, identity: bytes, peer: _Peer, flags: int, size: int,
                     done: list) -> None:
        if flags & ~(_MORE | _LONG | _COMMAND):
            raise ProtocolViolation(f"frame flags {flags:#04x} set reserved bits")
        peer.flags = flags
        peer.need = size
        if flags & _COMMAND:
            if flags & _MORE or size > MAX_COMMAND_BYTES:
                raise ProtocolViolation(f"a command of {size} bytes{' with MORE' * (flags & 1)}")
            peer.body = bytearray()
        elif peer.stage != _OPEN:
            raise ProtocolViolation("a message before the handshake's READY")
        else:
            peer.count += 1
            peer.size += size
            if not peer.refused and (peer.count > MAX_FRAMES
                                     or peer.size > self.max_message_bytes):
                peer.refused = True
                dropped = peer.frames[1:]
                del peer.frames[1:]
                self.buffered -= sum(len(frame) for frame in dropped)
            peer.body = None if peer.refused else bytearray()
        if not size:
            self._end_frame(identity, peer, done)

    def _end_frame(self, identity: bytes, peer: _Peer, done: list) -> None:
        body, peer.body = peer.body, None
        if peer.flags & _COMMAND:
            self._command(identity, peer, bytes(body))
            return
        if body is not None:
            peer.frames.append(body)
        if peer.flags & _MORE:
            return
        self.buffered -= sum(len(frame) for frame in peer.frames)
        done.append(Message(identity, peer.frames, peer.count, peer.size, peer.refused))
        peer.frames, peer.count, peer.size, peer.refused = [], 0, 0, False

    def _command(self, identity: bytes, peer: _Peer, body: bytes) -> None:
        name = body[1:1 + body[0]] if body else b""
        data = body[1 + len(name):]
        if peer.stage == _READY:
            if name != b"READY":
                raise ProtocolViolation(f"expected READY, got the command {name[:20]!r}")
            try:
                socket_type = properties(data).get(b"socket-type")
            except ValueError as exc:
                raise ProtocolViolation(f"READY: {exc}") from None
            if socket_type not in PEER_TYPES:
                raise ProtocolViolation(f"a {socket_type!r} socket cannot talk to a ROUTER")
            peer.stage = _OPEN
        elif name == b"PING":  # TTL (2 bytes) and context (up to 16), echoed in the PONG
            try:
                self._write(identity, [command(b"PONG", data[2:18])])
            except zmq.ZMQError:  # closed by _write, or gone
                raise ProtocolViolation("it does not read what it is sent") from None
        elif name == b"ERROR":
            raise ProtocolViolation(f"the peer reported an error: {data[1:1 + 64]!r}")
        elif name != b"PONG":
            raise ProtocolViolation(f"unexpected command {name[:20]!r}")
