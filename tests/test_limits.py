"""Server limits (each refused with an error naming its flag), namespace expiry, and health:
`memory-server status` and the Prometheus metrics port."""

import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from bench.attack import raw_socket
from memory_server import (InvalidRequest, LimitExceeded, MemoryClient, NamespaceConfig,
                           UnknownNamespace)
from memory_server.protocol import decode_reply, encode_request
from servers import free_port

pytestmark = pytest.mark.timeout(90)

SMALL = NamespaceConfig(dim=4, max_memories=8, num_layers=1, num_rows=2)


def test_each_limit_names_its_flag(memory_server):
    (server,) = memory_server(1, "--max-namespaces", "2", "--max-memories-per-namespace", "4",
                              "--max-bytes", "1M", "--max-message-bytes", "256K")
    with MemoryClient(server.endpoint, timeout=10) as client:
        client.open("a", SMALL)
        client.open("b", SMALL)
        with pytest.raises(LimitExceeded, match="--max-namespaces"):
            client.open("c", SMALL)
        client.drop("b")
        with pytest.raises(LimitExceeded, match="--max-memories-per-namespace"):
            client.open("b", NamespaceConfig(dim=4, max_memories=8, num_layers=3, num_rows=2))
        wide = NamespaceConfig(dim=256, max_memories=1024, num_layers=1, num_rows=4)
        client.open("wide", wide)
        keys = np.ones((4, 15, 256), np.float32)  # one row would fit in 1M, four do not
        with pytest.raises(LimitExceeded, match="--max-bytes"):
            client.add("wide", 0, np.arange(4), keys, keys)
        with pytest.raises(LimitExceeded, match="--max-message-bytes"):
            big = np.ones((1, 200, 256), np.float32)
            client.add("wide", 0, [0], big, big)
        stats = client.stats()[0]
        assert (stats["namespaces"], stats["entries"], stats["bytes"]) == (2, 0, 0)


def test_search_k_and_reply_size_are_bounded_before_any_work(memory_server):
    """k is capped at 2048 whatever max_memories, and a search of more rows x queries x k than
    --max-message-bytes holds at 16 bytes each is refused up front (a 117-byte search with
    k = 2**26 once made a 256 MiB reply)."""
    (server,) = memory_server(1, "--max-message-bytes", "1M")
    config = NamespaceConfig(dim=4, max_memories=2**22, num_layers=1, num_rows=1)
    keys = np.random.default_rng(0).standard_normal((1, 300, 4), dtype=np.float32)
    with MemoryClient(server.endpoint, timeout=10) as client:
        client.open("ns", config)
        client.add("ns", 0, [0], keys, keys)
        with pytest.raises(InvalidRequest, match=re.escape("k must be an integer in [1, 2048]")):
            client.search("ns", 0, [0], keys[:, :1], 2**22)
        # 300 queries x 2048 neighbours x 16 bytes are 9.8 MB: over the 1 MiB allowed.
        with pytest.raises(LimitExceeded, match=r"max_search_bytes=1048576.*"
                                                r"--max-message-bytes"):
            client.search("ns", 0, [0], keys, 2048)
        assert client.search("ns", 0, [0], keys[:, :100], 64).mask.all()
        assert client.stats()[0]["requests"]["search"]["errors"] == 2


def test_idle_namespace_expires_and_says_so(memory_server):
    (server,) = memory_server(1, "--namespace-ttl", "0.5")
    keys = np.ones((1, 2, 4), np.float32)
    with MemoryClient(server.endpoint, timeout=10) as client:
        client.open("busy", SMALL)
        client.open("idle", SMALL)
        client.add("idle", 0, [0], keys, keys)
        deadline = time.monotonic() + 10
        while "idle" in client.stats()[0]["per_namespace"]:
            client.search("busy", 0, [0], keys, 1)  # keeps "busy" in use
            assert time.monotonic() < deadline, "idle namespace never expired"
            time.sleep(0.1)
        assert "busy" in client.stats()[0]["per_namespace"]
        with pytest.raises(UnknownNamespace, match="expired after 0.5 s.*--namespace-ttl"):
            client.search("idle", 0, [0], keys, 1)
        client.open("idle", SMALL)  # opening it again starts afresh
        assert not client.search("idle", 0, [0], keys, 1).mask.any()
    assert "expired" in server.output()


def _status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memory_server", "status", *args],
                          capture_output=True, text=True, timeout=30)


def test_status_and_metrics_report_the_same_server(memory_server):
    pytest.importorskip("prometheus_client", reason="the metrics extra is not installed")
    port = free_port()
    (server,) = memory_server(1, "--metrics-port", str(port))
    keys = np.ones((2, 3, 4), np.float32)
    with MemoryClient(server.endpoint, timeout=10) as client:
        client.open("ns", SMALL)
        client.add("ns", 0, [0, 1], keys, keys)
        client.search("ns", 0, [0, 1], keys, 2)
    result = _status(server.endpoint)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for words in ("namespaces 1", "memories 2", "entries 6", "bytes", "up 00:00:"):
        assert words in out, out
    assert any(line.split()[:3] == ["search", "1", "0"] for line in out.splitlines()), out
    assert "p50 ms" in out and "p99 ms" in out

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "memtrans_entries 6.0" in text and "memtrans_namespaces 1.0" in text
    assert 'memtrans_requests_total{op="add"} 1.0' in text
    assert 'memtrans_request_latency_seconds{op="search",quantile="0.99"}' in text
    assert "memtrans_uptime_seconds" in text
    assert "memtrans_connections " in text and "memtrans_connections_refused_total 0.0" in text
    assert re.search(r"connections \d+ of \d+ open, 0 refused", out), out


def test_status_of_a_silent_endpoint_fails_clearly():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = _status(endpoint, "--timeout", "0.5")
    assert result.returncode == 1 and time.monotonic() - start < 20
    assert f"{endpoint} did not answer within 0.5 s" in result.stderr
    assert "Traceback" not in result.stderr


def _status_bytes(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory figure (VmRSS: resident now; VmHWM: its peak), in bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


REFUSED_ADD_OVERHEAD = 48 << 20
"""What six refused adds naming 100K rows may still cost the server, resident or at its peak:
the 3.2 MB requests, their checks' temporaries (a Python tuple per row) and allocator slack;
measured +22 MB resident, +27 MB peak. When the 100K empty memories were made before the
reservation: +57 MB resident, +112 MB peak."""


def test_an_add_naming_100k_rows_is_refused_before_it_allocates(memory_server):
    """--max-bytes counts each new memory's overhead and is checked before any memory is made:
    adds naming 100K new rows under 16M are refused, and the server grows by less than
    REFUSED_ADD_OVERHEAD (it used to make the 100K memories first)."""
    (server,) = memory_server(1, "--max-bytes", "16M")
    rows = 100_000
    keys = np.ones((rows, 1, 4), np.float32)
    with MemoryClient(server.endpoint, timeout=60) as client:
        client.open("wide", NamespaceConfig(dim=4, max_memories=8, num_layers=1, num_rows=rows))
        client.add("wide", 0, np.arange(1000), keys[:1000], keys[:1000])  # fits: 1000 memories
        pid = server.proc.pid
        before = {field: _status_bytes(pid, field) for field in ("VmRSS", "VmHWM")}
        for _ in range(6):
            with pytest.raises(LimitExceeded, match="--max-bytes"):
                client.add("wide", 0, np.arange(rows), keys, keys)
        grown = {field: _status_bytes(pid, field) - before[field] for field in before}
        stats = client.stats()[0]
    assert (stats["memories"], stats["entries"]) == (1000, 1000)  # the refused adds left nothing
    assert all(growth < REFUSED_ADD_OVERHEAD for growth in grown.values()), grown
    assert stats["bytes"] <= 16 << 20


def test_a_message_of_too_many_frames_is_refused_and_the_server_lives(memory_server):
    (server,) = memory_server(1)
    sock = raw_socket(server.endpoint)
    try:
        frames = [encode_request(7, "ping")[0], *([b""] * 100_000)]
        sock.send_multipart(frames)
        assert sock.poll(30_000)
        reply = decode_reply(sock.recv_multipart())
    finally:
        sock.close()
    assert (reply.ok, reply.code, reply.id) == (False, "protocol_error", 7)
    assert "message of 100001 frames: a request is a header and at most 16 array frames" \
        in reply.message
    with MemoryClient(server.endpoint, timeout=10) as client:
        assert client.ping()


def _big_search(request_id: int, queries: np.ndarray) -> list[bytes]:
    """A search of namespace ``big``'s row 0 for k=2048: a reply of about 2 MB per 16 queries."""
    return encode_request(request_id, "search", {"namespace": "big", "layer": 0, "k": 2048},
                          {"rows": np.zeros(1, np.int64), "queries": queries})


def test_a_client_that_does_not_read_its_replies_is_cut_off(memory_server):
    """Its replies pile up in the server until they pass --max-client-inflight-bytes; from then
    on its requests (of 4 KiB each) are refused, while another client is served as usual."""
    (server,) = memory_server(1, "--max-client-inflight-bytes", "4M")
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, 4096, 64), dtype=np.float32)
    queries = rng.standard_normal((1, 16, 64), dtype=np.float32)
    sends = 20  # each reply is about 2 MB: up to 4096 distinct keys and values, and positions
    with MemoryClient(server.endpoint, timeout=30) as client:
        client.open("big", NamespaceConfig(dim=64, max_memories=4096, num_layers=1, num_rows=1))
        client.add("big", 0, [0], keys, keys)
        # A reader that takes one reply into its queue and a few KiB into its socket, then stops.
        sock = raw_socket(server.endpoint, RCVHWM=1, RCVBUF=4096)
        try:
            for i in range(sends):  # one at a time: only unread replies are in flight
                sock.send_multipart(_big_search(i + 1, queries))
                deadline = time.monotonic() + 60
                while client.stats()[0]["requests"].get("search", {}).get("count", 0) <= i:
                    assert client.ping()  # the others are served meanwhile
                    assert time.monotonic() < deadline, "the server did not get to the search"
            replies = []
            while len(replies) < sends and sock.poll(30_000):
                replies.append(decode_reply(sock.recv_multipart()))
        finally:
            sock.close()
    refused = [r for r in replies if not r.ok]
    assert len(replies) == sends and 0 < len(refused) < sends
    assert all(r.code == "limit_exceeded" and "replies it has not read" in r.message
               and "--max-client-inflight-bytes" in r.message for r in refused), refused[0]


def test_pipelined_reads_whose_replies_are_not_read_are_withheld(memory_server):
    """40 searches sent at once all pass the check at receipt (nothing is in flight yet); their
    replies of about 2 MB each used to pile up in the server (200 held +400 MB). Once the
    connection's unread replies pass --max-client-inflight-bytes, a read's reply is replaced by
    a limit_exceeded error."""
    (server,) = memory_server(1, "--max-client-inflight-bytes", "4M")
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, 4096, 64), dtype=np.float32)
    queries = rng.standard_normal((1, 16, 64), dtype=np.float32)
    sends = 40
    with MemoryClient(server.endpoint, timeout=30) as client:
        client.open("big", NamespaceConfig(dim=64, max_memories=4096, num_layers=1, num_rows=1))
        client.add("big", 0, [0], keys, keys)
        sock = raw_socket(server.endpoint, RCVHWM=1, RCVBUF=4096)
        try:
            for i in range(sends):
                sock.send_multipart(_big_search(i + 1, queries))
            deadline = time.monotonic() + 60
            while client.stats()[0]["requests"].get("search", {}).get("count", 0) < sends:
                assert time.monotonic() < deadline, "the server did not get to the searches"
                time.sleep(0.05)
            replies = []
            while len(replies) < sends and sock.poll(30_000):
                replies.append(decode_reply(sock.recv_multipart()))
        finally:
            sock.close()
    withheld = [r for r in replies if not r.ok]
    assert len(replies) == sends and sends - 5 <= len(withheld) < sends, len(withheld)
    assert all(r.code == "limit_exceeded" and "replies it has not read" in r.message
               for r in withheld), withheld[0]
