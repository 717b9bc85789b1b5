"""Hostile peers against real servers: more connections than allowed, strangers sending large
frames to a CURVE server before their handshake, floods of rejected requests in the log, and
messages that cost the I/O thread (a header of empty lists, a million frames) while another
client pings."""

import signal
import socket
import struct
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from memory_server import MemoryClient, NamespaceConfig
from memory_server.cli import main
from memory_server.connections import FD_RESERVE, host_of
from memory_server.local import launch as local_launch
from memory_server.protocol import PROTOCOL_VERSION, encode_request
from memory_server.zmtp import greeting
from servers import free_port, launch

pytestmark = pytest.mark.timeout(120)


def _connect_raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def _closed_by_server(sock: socket.socket, wait: float = 30.0) -> bool:
    """Read (the server's greeting, then nothing) until the server closes or ``wait`` passes."""
    sock.settimeout(wait)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_connections_past_the_cap_are_closed_before_their_handshake(memory_server):
    (server,) = memory_server(1, "--max-connections", "4")
    with MemoryClient(server.endpoint, timeout=10) as client:
        assert client.ping()  # one of the four
        socks = [_connect_raw(server.port) for _ in range(10)]
        try:
            deadline = time.monotonic() + 30
            while client.stats()[0]["connections"]["refused"] < 7:
                assert time.monotonic() < deadline, client.stats()[0]["connections"]
                time.sleep(0.05)
            assert all(_closed_by_server(s) for s in socks[3:])  # the ones past the cap
            stats = client.stats()[0]["connections"]
            assert stats["open"] <= 4 and stats["max"] == 4, stats
            assert client.ping()
        finally:
            for s in socks:
                s.close()
        # Once the idle ones are gone, a new client gets in.
        with MemoryClient(server.endpoint, timeout=20) as other:
            assert other.ping()
    assert "refused a connection: 4 are open" in server.output()


def _connect_from(host: str, port: int) -> socket.socket:
    """A raw TCP connection to the server on 127.0.0.1 from ``host``, another loopback address
    (all of 127/8 is this machine): another client host, as the server sees it."""
    return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(host, 0))


def test_one_host_cannot_take_every_connection(memory_server):
    """Under --max-connections 12 and --max-connections-per-host 3, a host opening 10
    connections keeps 3; the others are closed before their handshake, and clients of other
    hosts still get in. Without the per-host cap the one host took 10 of the 12."""
    (server,) = memory_server(1, "--max-connections", "12", "--max-connections-per-host", "3")
    with MemoryClient(server.endpoint, timeout=10) as client:  # from 127.0.0.1
        assert client.ping()
        hostile = [_connect_from("127.0.0.2", server.port) for _ in range(10)]
        others = [_connect_from("127.0.0.3", server.port) for _ in range(3)]
        try:
            deadline = time.monotonic() + 30
            while client.stats()[0]["connections"]["refused_per_host"] < 7:
                assert time.monotonic() < deadline, client.stats()[0]["connections"]
                time.sleep(0.05)
            assert all(_closed_by_server(s) for s in hostile[3:])
            assert not any(_closed_by_server(s, wait=0.5) for s in (*hostile[:3], *others))
            stats = client.stats()[0]["connections"]
            assert stats["refused_per_host"] == 7 and stats["refused"] == 0, stats
            assert stats["open"] == 7 and stats["hosts"] == 3, stats  # 1 + 3 + 3
            assert client.ping()
        finally:
            for s in (*hostile, *others):
                s.close()
        with MemoryClient(server.endpoint, timeout=20) as other:
            assert other.ping()
    assert ("refused a connection from 127.0.0.2: it has 3 open, the most one host may have "
            "(--max-connections-per-host)") in server.output()


def test_a_host_gets_its_connections_back_when_it_closes_them(memory_server):
    (server,) = memory_server(1, "--max-connections-per-host", "2")
    with MemoryClient(server.endpoint, timeout=10) as client:
        assert client.ping()
        first = _connect_from("127.0.0.2", server.port)
        second = _connect_from("127.0.0.2", server.port)
        first.close()
        deadline = time.monotonic() + 30
        while client.stats()[0]["connections"]["open"] != 2:  # the client's and the second
            assert time.monotonic() < deadline, client.stats()[0]["connections"]
            time.sleep(0.05)
        third = _connect_from("127.0.0.2", server.port)
        try:
            assert not _closed_by_server(third, wait=0.5)
            assert client.stats()[0]["connections"]["refused_per_host"] == 0
        finally:
            second.close()
            third.close()


def test_on_ipc_the_per_host_cap_counts_connections_per_user(tmp_path):
    """On an ipc socket every peer is on this machine: the cap counts the peer's user id."""
    path = tmp_path / "memory.sock"
    proc = subprocess.Popen([sys.executable, "-m", "memory_server", "--bind", f"ipc://{path}",
                             "--threads", "1", "--max-connections-per-host", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socks = []
    try:
        with MemoryClient(f"ipc://{path}", timeout=30) as client:
            assert client.ping()  # one of this user's two
            for _ in range(3):
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(str(path))
                socks.append(sock)
            assert all(_closed_by_server(s) for s in socks[1:])
            stats = client.stats()[0]["connections"]
            assert stats["refused_per_host"] == 2 and stats["hosts"] == 1, stats
    finally:
        for s in socks:
            s.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


@pytest.mark.parametrize("address, host", [
    ("192.0.2.7", "192.0.2.7"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
])
def test_the_per_host_cap_counts_ipv6_by_its_64(address, host):
    assert host_of(address) == host


def _launch_with_fd_limit(limit: int, *flags: str):
    return local_launch("--threads", "2", *flags, prefix=("prlimit", f"--nofile={limit}:{limit}"))


@pytest.mark.skipif(subprocess.run(["which", "prlimit"], capture_output=True).returncode != 0,
                    reason="needs prlimit (util-linux)")
def test_snapshot_works_while_strangers_hold_more_connections_than_descriptors(tmp_path):
    """With 400 descriptors, 450 idle connections used to take them all ('Too many open
    files' in snapshot); at --max-connections 100 the rest are closed as they come."""
    server = _launch_with_fd_limit(400, "--max-connections", "100", "--data-dir", str(tmp_path))
    socks = []
    try:
        server.wait_ready()
        with MemoryClient(server.endpoint, timeout=30) as client:
            client.open("ns", NamespaceConfig(dim=4, max_memories=8, num_layers=1, num_rows=1))
            socks = [_connect_raw(server.port) for _ in range(450)]
            deadline = time.monotonic() + 60
            while client.stats()[0]["connections"]["refused"] < 350:
                assert time.monotonic() < deadline, client.stats()[0]["connections"]
                time.sleep(0.05)
            assert client.snapshot("ns", "t")[0]["memories"] == 0
    finally:
        for s in socks:
            s.close()
        assert server.stop() == 0, server.output()[-3000:]
    assert "Too many open files" not in server.output()


def test_a_cap_the_open_file_limit_cannot_hold_is_refused_at_start():
    result = subprocess.run(["prlimit", "--nofile=400:400", sys.executable, "-m",
                             "memory_server", "--bind", f"tcp://127.0.0.1:{free_port()}",
                             "--max-connections", "1000"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert (f"--max-connections 1000 needs {1000 + FD_RESERVE} open files" in result.stderr
            and "at most 400 (ulimit -Hn)" in result.stderr), result.stderr


def test_the_default_cap_follows_a_low_open_file_limit():
    server = _launch_with_fd_limit(400)
    try:
        server.wait_ready()
        with MemoryClient(server.endpoint, timeout=10) as client:
            assert client.stats()[0]["connections"]["max"] == 400 - FD_RESERVE
    finally:
        assert server.stop() == 0
    assert f"allows {400 - FD_RESERVE} connections, not 1024" in server.output()


def test_a_stranger_cannot_send_a_curve_server_a_large_frame_before_its_handshake(tmp_path):
    """ZeroMQ's frame cap applies before the handshake: on a CURVE server it is
    --max-message-bytes (plus CURVE's framing), so a stranger announcing a 30 MiB frame is cut
    off at its header. It used to be 2 x --max-message-bytes + 1 MiB, so the 30 MiB were read."""
    assert main(["keygen", "--out", str(tmp_path), "--name", "server"]) == 0
    assert main(["keygen", "--out", str(tmp_path / "allowed"), "--name", "client"]) == 0
    server = launch("--curve-secret-key", str(tmp_path / "server.key_secret"), "--curve-allow",
                    str(tmp_path / "allowed"), "--max-message-bytes", "16M")
    try:
        server.wait_ready(server_public_key=tmp_path / "server.key",
                          secret_key=tmp_path / "allowed/client.key_secret")
        frame = 30 << 20
        sock = _connect_raw(server.port)
        try:
            # A command frame (flags 0x06: command, 8-byte size) in place of HELLO.
            with pytest.raises(OSError):  # reset or broken pipe: the server closed it
                sock.sendall(greeting(b"CURVE") + b"\x06" + struct.pack(">Q", frame)
                             + b"\0" * frame)
        finally:
            sock.close()
        with MemoryClient(server.endpoint, timeout=10, server_public_key=tmp_path / "server.key",
                          secret_key=tmp_path / "allowed/client.key_secret") as client:
            assert client.ping()
    finally:
        assert server.stop() == 0, server.output()[-3000:]


def test_rejected_requests_are_logged_at_a_bounded_rate_and_clipped(memory_server):
    """200 requests naming a 15,000-character op: at most 10 lines a second, none repeating
    more than 200 characters of it, and a count of those not logged (50 such requests once
    wrote 26 MB of log)."""
    (server,) = memory_server(1)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    header = msgpack.packb({"v": PROTOCOL_VERSION, "id": 1, "op": "x" * 15_000, "args": {},
                            "arrays": []})
    start = time.monotonic()
    try:
        for _ in range(200):
            sock.send(header)
        for _ in range(200):
            assert sock.poll(30_000)
            sock.recv_multipart()
    finally:
        sock.close()
    seconds = time.monotonic() - start
    assert server.stop() == 0
    lines = [line for line in server.output().splitlines() if "malformed" in line]
    assert 1 <= len(lines) <= 10 * (seconds + 2), len(lines)
    assert max(len(line) for line in lines) < 600
    assert lines[0].endswith("characters)")  # says how much it left out
    assert "not logged" in server.output() and len(server.output()) < 20_000


def _pinger(endpoint: str):
    """Pings until told to stop, in a thread; returns (stop, latencies)."""
    import threading

    stop, latencies = threading.Event(), []

    def run():
        with MemoryClient(endpoint, timeout=60) as client:
            while not stop.is_set():
                start = time.perf_counter()
                client.ping()
                latencies.append(time.perf_counter() - start)

    thread = threading.Thread(target=run)
    thread.start()
    return stop, latencies, thread


def hostile_messages() -> dict[str, list[bytes]]:
    """Malformed messages that once cost the server's I/O thread seconds."""
    lists = b"\xdc\xff\xff" + b"\x90" * 65535  # a list of 65,535 empty lists
    return {
        "1 MiB header of empty lists": [b"\xdc\x00\x10" + lists * 16],
        "64 KiB map of empty lists": [msgpack.packb({"v": PROTOCOL_VERSION, "id": 1,
                                                     "op": "ping", "args": {},
                                                     "arrays": [[]] * 65_000})],
        "a million frames": [encode_request(7, "ping")[0], *([b""] * 1_000_000)],
    }


@pytest.mark.parametrize("attack", list(hostile_messages()))
def test_expensive_malformed_messages_are_refused_and_others_are_served(memory_server, attack):
    (server,) = memory_server(1)
    frames = hostile_messages()[attack]
    stop, latencies, thread = _pinger(server.endpoint)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        while not latencies:
            time.sleep(0.01)
        for _ in range(3):
            sock.send_multipart(frames)
        for _ in range(3):
            assert sock.poll(60_000)
            assert not msgpack.unpackb(sock.recv_multipart()[0])["ok"]
        seen = len(latencies)
        while len(latencies) < seen + 3:  # the pinger goes on being answered
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
        sock.close()
