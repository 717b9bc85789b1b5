"""The server's own ZMTP (``memory_server/zmtp.py``): messages are refused while they arrive and
none of what is refused is kept, peers that break ZMTP or fall silent are closed, messages
still arriving are bounded by ``--max-inflight-bytes``, and the frames of any byte stream cut
anywhere are the frames sent."""

import os
import socket
import struct
import threading
import time

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from memory_server import MemoryClient, zmtp
from memory_server.protocol import HEARTBEAT_IVL_MS, decode_reply, encode_request
from memory_server.zmtp import (_OPEN, GREETING, SMALL_FRAME, ZmtpStream, _Peer, command,
                                 frame_header, greeting, ready)
from servers import peak_over

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def _zmtp_peer(port: int, greeting: bytes = GREETING) -> socket.socket:
    """A raw TCP peer through the NULL handshake as a DEALER (when ``greeting`` is ZMTP's)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(greeting + ready(b"DEALER"))
    return sock


def _closed_by_server(sock: socket.socket, wait: float = 30.0) -> bytes | None:
    """What the server sent until it closed the connection, or None if it did not in ``wait``."""
    sock.settimeout(wait)
    seen = b""
    try:
        while data := sock.recv(65536):
            seen += data
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return seen


def _is_closed(sock: socket.socket) -> bool:
    """Whether the server closed a non-blocking ``sock`` (reading what it had sent)."""
    try:
        while sock.recv(1 << 20):
            pass
    except BlockingIOError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_a_message_of_many_large_frames_is_refused_as_it_arrives_and_not_kept(memory_server):
    (server,) = memory_server(1, "--max-message-bytes", "4M")
    frames = [encode_request(9, "ping")[0], *([np.ones(8 * MiB, np.uint8)] * 10)]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    replies = []

    def step():
        sock.send_multipart(frames, copy=False)
        assert sock.poll(60_000)
        replies.append(decode_reply(sock.recv_multipart()))
    try:
        grown = peak_over(server.proc.pid, step)
    finally:
        sock.close()
    reply = replies[0]
    assert (reply.ok, reply.code, reply.id) == (False, "limit_exceeded", 9)
    assert "--max-message-bytes" in reply.message
    assert grown < 24 * MiB, grown  # ZeroMQ's ROUTER held all 80 MiB before the first was read
    with MemoryClient(server.endpoint, timeout=10) as client:
        assert client.ping()


def test_clients_are_served_while_a_message_that_never_ends_arrives(memory_server):
    (server,) = memory_server(1, "--max-message-bytes", "4M")
    sock = _zmtp_peer(server.port)
    stop = threading.Event()
    sent = [0]

    def flood():  # frames of 1 MiB, each with MORE set: the message never ends
        frame = frame_header(MiB, more=True) + bytes(MiB)
        try:
            while not stop.is_set() and sent[0] < 400 * MiB:
                sock.sendall(frame)
                sent[0] += MiB
        except OSError:
            pass
    thread = threading.Thread(target=flood)
    try:
        with MemoryClient(server.endpoint, timeout=10) as client:
            assert client.ping()

            def step():
                thread.start()
                while sent[0] < 200 * MiB:
                    assert client.ping()
            grown = peak_over(server.proc.pid, step)
            assert client.ping()
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        sock.close()
    assert grown < 24 * MiB, grown


@pytest.mark.parametrize("stream", {
    "not ZMTP": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64),
    "CURVE asked of a NULL server": greeting(b"CURVE"),
    "ZMTP 2": GREETING[:10] + b"\x01\x00" + GREETING[12:],
    "a message before READY": GREETING + frame_header(3, more=False) + b"abc",
    "reserved flag bits": GREETING + ready(b"DEALER") + b"\x10\x01x",
    "a PUB socket": GREETING + ready(b"PUB"),
    "an oversized command": GREETING + ready(b"DEALER") + command(b"PING", bytes(5000)),
}.items(), ids=lambda item: item[0])
def test_a_peer_that_breaks_zmtp_is_closed_and_the_server_serves_on(memory_server, stream):
    (server,) = memory_server(1)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        sock.sendall(stream[1])
        assert _closed_by_server(sock) is not None
    finally:
        sock.close()
    with MemoryClient(server.endpoint, timeout=10) as client:
        assert client.ping()
    assert "broke ZMTP" in server.output()


def test_a_silent_peer_is_pinged_then_closed_and_a_stalled_handshake_too(memory_server):
    (server,) = memory_server(1)
    silent = _zmtp_peer(server.port)
    stalled = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        start = time.monotonic()
        seen = _closed_by_server(silent, wait=10)
        assert seen is not None and time.monotonic() - start < 5
        assert seen.startswith(GREETING + ready(b"ROUTER")) and b"\x04PING" in seen
        assert _closed_by_server(stalled, wait=15) is not None  # never sent its greeting
    finally:
        silent.close()
        stalled.close()
    with MemoryClient(server.endpoint, timeout=10) as client:
        deadline = time.monotonic() + 10  # closed here, and counted gone by the caps
        while client.stats()[0]["connections"]["open"] != 1:
            assert time.monotonic() < deadline, client.stats()[0]["connections"]
            time.sleep(0.1)


def test_messages_still_arriving_count_against_the_inflight_budget(memory_server):
    (server,) = memory_server(1, "--max-message-bytes", "4M", "--max-inflight-bytes", "8M")
    peers = [_zmtp_peer(server.port) for _ in range(3)]
    for sock in peers:
        sock.setblocking(False)
    stop = threading.Event()

    def trickle():  # a byte each 0.2 s keeps a peer from counting as silent mid-frame
        while not stop.wait(0.2):
            for sock in peers:
                try:
                    sock.send(b"\0")
                except OSError:
                    pass  # closed by the server
    try:
        for sock in peers:  # 3 MiB of a 3.5 MiB frame each: 9 MiB still arriving, over 8 MiB
            sock.setblocking(True)
            sock.sendall(frame_header(7 * MiB // 2, more=False) + bytes(3 * MiB))
            sock.setblocking(False)
        thread = threading.Thread(target=trickle)
        thread.start()
        time.sleep(3)
        closed = [_is_closed(sock) for sock in peers]
        stop.set()
        thread.join()
        assert closed.count(True) == 1, closed
        with MemoryClient(server.endpoint, timeout=10) as client:
            assert client.ping()
    finally:
        stop.set()
        for sock in peers:
            sock.close()
    assert "--max-inflight-bytes" in server.output()


def _sockets_held() -> dict[int, str]:
    """This process's socket descriptors, and the socket each holds (``socket:[inode]``)."""
    held = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:"):
            held[int(name)] = link
    return held


def _until(condition, what: str, wait: float = 10.0):
    deadline = time.monotonic() + wait
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


def test_a_close_spares_the_connection_that_took_the_descriptor_since(monkeypatch):
    """A connection gone while its end waits unread may have had its descriptor given to a new
    one; closing the old one must not end the new (shut down by number, it did: a connection of
    another host was dropped now and then)."""
    monkeypatch.setattr(zmtp, "HANDSHAKE_MS", 100)
    sock = zmq.Context.instance().socket(zmq.STREAM)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    stream = ZmtpStream(sock, MiB, on_violation=lambda *args: None)
    first, *others = peers = [socket.socket() for _ in range(8)]  # numbered now, not later
    zmq.Frame(bytes(SMALL_FRAME), copy=False, track=True)  # pyzmq's own sockets made now too
    try:
        before = _sockets_held()
        first.connect(("127.0.0.1", port))
        ((fd, old),) = _until(lambda: set(_sockets_held().items()) - set(before.items()),
                              "the server's accept")
        first.settimeout(0.05)

        def greeted() -> bool:
            stream.receive(10)  # reads the connect notice, remembering fd
            try:
                return bool(first.recv(len(GREETING)))
            except TimeoutError:
                return False
        _until(greeted, "the server's greeting")
        first.shutdown(socket.SHUT_RDWR)  # ZeroMQ closes fd; the end of this waits unread
        _until(lambda: _sockets_held().get(fd) != old, "ZeroMQ to close the descriptor")
        for second in others:  # until the server's accept takes fd (it may take a lower one)
            second.connect(("127.0.0.1", port))
            time.sleep(0.2)  # not reading /proc meanwhile: its own descriptor could take fd
            if _sockets_held().get(fd) not in (None, old):
                break
        else:
            pytest.fail(f"no new connection was given descriptor {fd}")
        time.sleep(HEARTBEAT_IVL_MS / 1000 + 0.1)
        stream.tick(reading=True)  # closes the first: its handshake is overdue
        second.settimeout(0.5)
        with pytest.raises(TimeoutError):  # open, and silent (its notice is unread)
            second.recv(1)
    finally:
        for peer in peers:
            peer.close()
        sock.close()


def _encoded(messages: list[list[bytes]]) -> bytes:
    out = b""
    for frames in messages:
        for i, frame in enumerate(frames):  # libzmq puts its heartbeats between any two frames
            out += command(b"PONG") + frame_header(len(frame), more=i < len(frames) - 1) + frame
    return out


_frames = st.lists(st.binary(max_size=300) | st.integers(250, 300).map(bytes), min_size=1,
                   max_size=5)


@settings(max_examples=200, deadline=None)
@given(messages=st.lists(_frames, min_size=1, max_size=6), data=st.data())
def test_frames_are_read_back_whatever_the_chunks(messages, data):
    stream = _encoded(messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    limit = data.draw(st.sampled_from([1 << 20, 500]))
    zmtp = ZmtpStream(None, limit, on_violation=lambda *args: None)
    peer = _Peer(0.0)
    peer.stage = _OPEN
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        zmtp._feed(b"id", peer, memoryview(stream)[start:end], got)
    assert len(got) == len(messages)
    for message, frames in zip(got, messages):
        assert (message.count, message.size) == (len(frames), sum(map(len, frames)))
        if message.size > limit:
            assert message.refused and len(message.frames) <= 1
        else:
            assert not message.refused and [bytes(f) for f in message.frames] == frames
    assert zmtp.buffered == 0 and peer.kept() == 0


def test_frame_headers_switch_to_eight_bytes_past_255():
    assert frame_header(255, more=True) == b"\x01\xff"
    assert frame_header(256, more=False) == b"\x02" + struct.pack(">Q", 256)
