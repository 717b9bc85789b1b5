"""The memory-server daemon as a real process: bad input, limits, shutdown, ordering, faults and
the command line."""

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
import zmq

from memory_server import (ConfigMismatch, InvalidRequest, LimitExceeded, NamespaceConfig,
                           ServerRestarted, ServerUnavailable, UnknownNamespace)
from memory_server.cli import main, parse_bytes
from memory_server.client import MemoryClient
from memory_server.protocol import PROTOCOL_VERSION, Reply, decode_reply, encode_request
from memory_server.server import ServerConfig, is_loopback
from servers import free_port, launch, start_servers, wait_ready

pytestmark = pytest.mark.timeout(90)

NS = "bad-input"
CONFIG = NamespaceConfig(dim=4, max_memories=16, num_layers=2, num_rows=4)
QUERIES = np.random.default_rng(1).standard_normal((4, 3, 4), dtype=np.float32)


@pytest.fixture(scope="module")
def server():
    (proc,) = start_servers(1, "--max-message-bytes", "1M")
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def client(server):
    rng = np.random.default_rng(0)
    with MemoryClient(server.endpoint, timeout=10) as client:
        client.open(NS, CONFIG)
        for layer, rows in ((0, [0, 1, 2, 3]), (1, [2, 0])):
            keys = rng.standard_normal((len(rows), 5, 4), dtype=np.float32)
            client.add(NS, layer, rows, keys, -keys)
        yield client


def raw_call(endpoint: str, frames: list, timeout: float = 10.0) -> Reply:
    """Send raw frames from a fresh DEALER and decode the one reply."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        assert sock.poll(timeout * 1000), f"no reply from {endpoint} within {timeout} s"
        return decode_reply(sock.recv_multipart())
    finally:
        sock.close()


def snapshot(client: MemoryClient):
    """What a bad request must not change: the namespace's stats and what a search returns."""
    stats = client.stats()[0]["per_namespace"][NS]
    kv, mask = client.search(NS, 0, np.arange(4), QUERIES, 3).dense()
    kv1, mask1 = client.search(NS, 1, np.arange(4), QUERIES, 3).dense()
    return stats, kv.tobytes(), mask.tobytes(), kv1.tobytes(), mask1.tobytes()


def _header(**changes) -> dict:
    header = {"v": PROTOCOL_VERSION, "id": 5, "op": "search",
              "args": {"namespace": NS, "layer": 0, "k": 2},
              "arrays": [["rows", "int64", [1]], ["queries", "float32", [1, 1, 4]]]}
    header.update(changes)
    return {k: v for k, v in header.items() if v is not ...}


ROW, QUERY = np.zeros(1, np.int64).tobytes(), np.ones(4, np.float32).tobytes()

WIRE_CASES = {
    "header is not msgpack": ([b"\xc1not msgpack"], None),
    "wrong version": ([msgpack.packb(_header(v=PROTOCOL_VERSION + 1)), ROW, QUERY], 5),
    "missing version": ([msgpack.packb(_header(v=...)), ROW, QUERY], 5),
    "unknown op": ([msgpack.packb(_header(op="explode")), ROW, QUERY], 5),
    "missing array frame": ([msgpack.packb(_header()), ROW], 5),
    "extra array frame": ([msgpack.packb(_header()), ROW, QUERY, QUERY], 5),
    "frame size mismatch": ([msgpack.packb(_header()), ROW, QUERY[:-1]], 5),
    "unsupported dtype": ([msgpack.packb(_header(arrays=[["rows", "int64", [1]],
                                                          ["queries", "float64", [1, 1, 2]]])),
                           ROW, QUERY], 5),
}


@pytest.mark.parametrize("case", list(WIRE_CASES))
def test_malformed_frames_get_an_error_reply_and_change_nothing(server, client, case):
    before = snapshot(client)
    frames, request_id = WIRE_CASES[case]
    reply = raw_call(server.endpoint, frames)
    assert not reply.ok and reply.code == "protocol_error" and reply.id == request_id
    assert reply.message
    assert snapshot(client) == before


def _add(keys=None, rows=(0, 1), layer=0, namespace=NS):
    keys = np.ones((len(rows), 2, 4), np.float32) if keys is None else keys
    return lambda c: c.add(namespace, layer, list(rows), keys, keys)


def _search(queries=QUERIES[:2], rows=(0, 1), layer=0, k=2, namespace=NS):
    return lambda c: c.search(namespace, layer, list(rows), queries, k)


def _nan(shape, value):
    array = np.ones(shape, np.float32)
    array[0, 0, 1] = value
    return array


STORE_CASES = {
    "key dimension differs": (_add(np.ones((2, 2, 5), np.float32)), InvalidRequest, "shape"),
    "query dimension differs": (_search(np.ones((2, 2, 3), np.float32)), InvalidRequest, "shape"),
    "NaN in keys": (_add(_nan((2, 2, 4), np.nan)), InvalidRequest, "NaN or Inf"),
    "Inf in keys": (_add(_nan((2, 2, 4), np.inf)), InvalidRequest, "NaN or Inf"),
    "NaN in queries": (_search(_nan((2, 2, 4), np.nan)), InvalidRequest, "NaN or Inf"),
    "Inf in queries": (_search(_nan((2, 2, 4), -np.inf)), InvalidRequest, "NaN or Inf"),
    "row out of range in add": (_add(rows=(0, 4)), InvalidRequest, "rows must be in"),
    "row out of range in search": (_search(rows=(-1, 0)), InvalidRequest, "rows must be in"),
    "layer out of range in add": (_add(layer=2), InvalidRequest, "layer"),
    "layer out of range in search": (_search(layer=-1), InvalidRequest, "layer"),
    "k < 1": (_search(k=0), InvalidRequest, "k must be"),
    "k > max_memories": (_search(k=17), InvalidRequest, "k must be"),
    "a bad layer among good ones in clear": (lambda c: c.clear(NS, [0, 1], layers=[0, 2]),
                                             InvalidRequest, "layers"),
    "unknown namespace in add": (_add(namespace="nope"), UnknownNamespace, "nope"),
    "unknown namespace in search": (_search(namespace="nope"), UnknownNamespace, "nope"),
    "unknown namespace in clear": (lambda c: c.clear("nope", [0]), UnknownNamespace, "nope"),
    "unknown namespace in drop": (lambda c: c.drop("nope"), UnknownNamespace, "nope"),
    "reopen with another config": (lambda c: c.open(NS, NamespaceConfig(dim=8, max_memories=16,
                                                                        num_layers=2, num_rows=4)),
                                   ConfigMismatch, "already open"),
    "message over --max-message-bytes": (_add(np.ones((2, 40_000, 4), np.float32)),
                                         LimitExceeded, "max_message_bytes=1048576"),
}


@pytest.mark.parametrize("case", list(STORE_CASES))
def test_bad_arguments_get_an_error_reply_and_change_nothing(server, client, case):
    call, error, words = STORE_CASES[case]
    before = snapshot(client)
    with pytest.raises(error, match=re.escape(words)) as info:
        call(client)
    assert str(info.value).startswith(server.endpoint)  # names the server that refused it
    assert snapshot(client) == before


def test_bad_namespace_config_is_refused(server):
    reply = raw_call(server.endpoint, encode_request(
        9, "open", {"namespace": "x", "config": {"dim": 0, "max_memories": 4, "num_layers": 1,
                                                 "num_rows": 1}}))
    assert (reply.ok, reply.code, reply.id) == (False, "invalid_request", 9)
    assert "dim must be an integer in [1, 4096], got 0" in reply.message


@pytest.mark.parametrize("changes, words", [
    ({"index": "hnsw", "hnsw_m": 1}, "hnsw_m must be an integer in [2, 256], got 1"),
    ({"num_layers": 10**15}, "num_layers must be an integer in [1, 1024]"),
    ({"num_rows": 2**40}, "num_rows must be an integer in [1, 1048576]"),
    ({"dim": 2048, "max_memories": 2**20}, "max_memories x dim = 2147483648 is over 268435456"),
])
def test_config_out_of_range_is_refused_and_the_server_lives(server, client, changes, words):
    """hnsw_m=1 used to be accepted, and the next add killed the server (SIGSEGV in faiss);
    num_layers=10**15 made a clear of every layer hold a worker forever."""
    config = {"dim": 4, "max_memories": 8, "num_layers": 1, "num_rows": 1, **changes}
    reply = raw_call(server.endpoint, encode_request(9, "open", {"namespace": "x",
                                                                 "config": config}))
    assert (reply.ok, reply.code, reply.id) == (False, "invalid_request", 9), reply
    assert words in reply.message
    assert client.ping()


def test_clear_with_repeated_layers_is_refused_at_once(server, client):
    before = snapshot(client)
    start = time.monotonic()
    reply = raw_call(server.endpoint, encode_request(
        3, "clear", {"namespace": NS, "layers": [0] * 4000}, {"rows": np.arange(4)}))
    assert (reply.ok, reply.code) == (False, "invalid_request")
    assert "layers must be distinct" in reply.message
    assert time.monotonic() - start < 5
    assert snapshot(client) == before


def test_a_frame_over_the_message_limit_is_refused_as_it_arrives(server, client):
    big = np.zeros(4 << 20, np.uint8)  # over max_message_bytes: refused before it is all in
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(server.endpoint)
        sock.send_multipart([msgpack.packb(_header()), big])
        assert sock.poll(10_000)
        reply = decode_reply(sock.recv_multipart())
    finally:
        sock.close()
    assert (reply.ok, reply.code) == (False, "limit_exceeded")
    assert "--max-message-bytes" in reply.message and reply.id == _header()["id"]
    assert client.ping()


def test_start_is_logged_and_stats_report_requests(server, client):
    assert f"listening on {server.endpoint}" in server.output()
    stats = client.stats()[0]
    assert stats["requests"]["add"]["count"] >= 2 and stats["requests"]["add"]["p99_ms"] >= 0
    assert stats["requests"]["search"]["p50_ms"] > 0
    assert stats["uptime_s"] > 0 and stats["version"] and stats["protocol"] == PROTOCOL_VERSION
    assert stats["per_namespace"][NS]["entries"] == 4 * 5 + 2 * 5


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_a_float16_key_namespace_on_a_server(memory_server, index):
    """Keys stored and sent back as float16 (the reply's keys are in key_dtype), searched as
    in-process, and keys float16 cannot hold refused."""
    from memory_server import MemoryStore

    config = NamespaceConfig(dim=8, max_memories=1024, num_layers=1, num_rows=2, index=index,
                             key_dtype="float16", value_dtype="float16")
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((2, 1200, 8), dtype=np.float32)  # wraps; ivf trains (nlist 32)
    queries = rng.standard_normal((2, 30, 8), dtype=np.float32)
    local = MemoryStore()
    local.open("half", config)
    (proc,) = memory_server(1)
    with MemoryClient(proc.endpoint, timeout=30) as client:
        client.open("half", config)
        for start in range(0, 1200, 300):
            for target in (client, local):
                target.add("half", 0, [0, 1], keys[:, start : start + 300],
                           keys[:, start : start + 300])
        got = client.search("half", 0, [0, 1], queries, 16)
        want = local.search("half", 0, np.arange(2), queries, 16)
        assert got.keys.dtype == got.values.dtype == np.float16
        np.testing.assert_array_equal(got.keys, want.keys)
        np.testing.assert_array_equal(got.positions, want.positions)
        stats = client.stats()[0]["per_namespace"]["half"]
        with pytest.raises(InvalidRequest, match="keys overflow key_dtype float16"):
            client.add("half", 0, [0], np.full((1, 1, 8), 1e6, np.float32),
                       np.zeros((1, 1, 8), np.float32))
        assert client.stats()[0]["per_namespace"]["half"] == stats
        assert stats["config"]["key_dtype"] == "float16"


def test_max_bytes_refuses_an_add_and_changes_nothing(memory_server):
    (server,) = memory_server(1, "--max-bytes", "256K")
    with MemoryClient(server.endpoint, timeout=10) as client:
        client.open("ns", NamespaceConfig(dim=64, max_memories=4096, num_layers=1, num_rows=1))
        keys = np.ones((1, 1000, 64), np.float32)
        with pytest.raises(LimitExceeded, match="max_bytes=262144"):
            client.add("ns", 0, [0], keys, keys)
        assert client.stats()[0]["bytes"] == 0
        client.add("ns", 0, [0], keys[:, :10], keys[:, :10])
        assert client.stats()[0]["entries"] == 10


def test_sigterm_finishes_in_flight_requests_and_exits_0(memory_server):
    (server,) = memory_server(1)
    rng = np.random.default_rng(0)
    with MemoryClient(server.endpoint, timeout=30) as client:
        client.open("slow", NamespaceConfig(dim=64, max_memories=20_000, num_layers=1,
                                            num_rows=2))
        keys = rng.standard_normal((2, 20_000, 64), dtype=np.float32)
        client.add("slow", 0, [0, 1], keys, keys)
        search = client.search_async("slow", 0, [0, 1],
                                     rng.standard_normal((2, 2000, 64), dtype=np.float32), 32)
        client.ping()  # same connection, in order: the server has accepted the search
        server.proc.send_signal(signal.SIGTERM)
        assert search.result(timeout=30).positions.shape == (2, 2000, 32)
    assert server.proc.wait(15) == 0


def test_sigterm_abandons_what_passes_the_drain_deadline_and_exits_3(memory_server):
    """An add that takes far longer than --drain-timeout is in flight at SIGTERM: the server
    exits soon after the deadline, non-zero, and tells the waiting client why."""
    (server,) = memory_server(1, "--drain-timeout", "1")
    keys = np.random.default_rng(0).standard_normal((1, 20_000, 64), dtype=np.float32)
    with MemoryClient(server.endpoint, timeout=60) as client:
        client.open("slow", NamespaceConfig(dim=64, max_memories=20_000, num_layers=1,
                                            num_rows=1, index="hnsw", hnsw_m=64, hnsw_segments=1,
                                            ef_construction=2048))  # 20,000 adds: ~20 s here
        add = client.add_async("slow", 0, [0], keys, keys)
        client.ping()  # same connection, in order: the server has accepted the add
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ServerUnavailable, match=r"stopped before finishing this add.*"
                                                    r"--drain-timeout"):
            add.result(timeout=30)
        assert server.proc.wait(15) == 3
        assert time.monotonic() - start < 1 + 4
    assert "abandoning 1 unfinished request" in server.output()


def test_sigint_and_the_shutdown_op_exit_0(memory_server):
    first, second = memory_server(2)
    first.proc.send_signal(signal.SIGINT)
    assert first.proc.wait(15) == 0
    with MemoryClient(second.endpoint, timeout=10) as client:
        client.shutdown_server(second.endpoint)
    assert second.proc.wait(15) == 0
    assert "stopped" in second.output()


def test_each_client_reads_its_writes_under_concurrency(memory_server):
    """8 clients pipeline add, search, clear, search on their own rows without waiting in
    between; every search must see exactly what its client sent before it."""
    servers = memory_server(2)
    endpoints = [s.endpoint for s in servers]
    dim, clients, rounds = 8, 8, 20
    config = NamespaceConfig(dim=dim, max_memories=8, num_layers=2, num_rows=2 * clients)
    query = np.zeros((2, 1, dim), np.float32)
    query[..., 0] = 1

    def run(t: int) -> None:
        rows = [2 * t, 2 * t + 1]  # one row on each server
        with MemoryClient(endpoints, timeout=20) as client:
            client.open("order", config)
            for i in range(rounds):
                layer = i % 2
                keys = np.zeros((2, 1, dim), np.float32)
                keys[..., 0], keys[..., 1] = i + 1, t
                added = client.add_async("order", layer, rows, keys, keys)
                found = client.search_async("order", layer, rows, query, 1)
                cleared = client.clear_async("order", rows, [layer] if i % 3 else None)
                empty = client.search_async("order", layer, rows, query, 1)
                added.result(), cleared.result()
                kv, mask = found.result().dense()
                assert mask.all() and (kv[:, 0, 0, 0, :2] == [i + 1, t]).all(), (t, i, kv)
                assert not empty.result().mask.any(), (t, i)

    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(run, t) for t in range(clients)]:
            future.result(timeout=60)


def test_a_request_sent_again_with_its_session_and_seq_is_answered_once(memory_server):
    """What a client sends after a reconnect: the same request, session and seq on another
    connection. A finished add is answered with its kept reply and not run again; a finished
    search, and a failed add (which changed nothing), run again; a seq reused by another request
    is refused, and so is a retry older than the session's window of 64 finished requests."""
    (server,) = memory_server(1)
    session = os.urandom(16)
    keys = np.ones((1, 3, 4), np.float32)
    rows = np.array([0])

    def call(request_id: int, op: str, args: dict, arrays=None, seq=None) -> Reply:
        return raw_call(server.endpoint, encode_request(request_id, op, args, arrays,
                                                        session=session, seq=seq or request_id))

    config = {"namespace": "once", "config": CONFIG.to_dict()}
    add = (2, "add", {"namespace": "once", "layer": 0}, {"rows": rows, "keys": keys,
                                                         "values": keys})
    search = (3, "search", {"namespace": "once", "layer": 0, "k": 1},
              {"rows": rows, "queries": keys[:, :1]})
    replies = [call(1, "open", config), call(*add), call(*add), call(*search), call(*search)]
    assert all(r.ok for r in replies) and len({r.instance for r in replies}) == 1
    nan = np.full_like(keys, np.nan)
    failed = (4, "add", add[2], {"rows": rows, "keys": nan, "values": nan})
    assert [call(*failed).code for _ in range(2)] == ["invalid_request"] * 2
    with MemoryClient(server.endpoint, timeout=10) as client:
        stats = client.stats()[0]
    assert stats["per_namespace"]["once"]["entries"] == 3
    assert stats["requests"]["add"]["count"] == 1 + 2 and stats["requests"]["add"]["errors"] == 2
    assert stats["requests"]["search"]["count"] == 2
    assert stats["sessions"]["retries_answered"] == 1

    reused = call(5, "clear", {"namespace": "once"}, {"rows": rows}, seq=2)
    assert reused.code == "invalid_request" and "a retry must repeat its request" in reused.message
    for seq in range(6, 6 + 64):  # pushes seqs 1 to 4 out of the window
        assert call(seq, "open", config).ok
    old = call(*add)
    assert old.code == "unavailable" and "whether it ran is unknown" in old.message, old.message


def test_version_1_requests_are_still_served_in_version_1(server):
    header = {"v": 1, "id": 9, "op": "ping", "args": {}, "arrays": []}
    reply = raw_call(server.endpoint, [msgpack.packb(header)])
    assert reply.ok and reply.id == 9 and reply.instance is None  # a version 1 reply has none
    refused = raw_call(server.endpoint, [msgpack.packb({**header, "session": b"s" * 16,
                                                        "seq": 1})])
    assert refused.code == "protocol_error" and "unexpected ['seq', 'session']" in refused.message


def test_killed_server_fails_fast_naming_it_then_the_client_recovers(memory_server):
    (server,) = memory_server(1)
    config = NamespaceConfig(dim=4, max_memories=8, num_layers=1, num_rows=1)
    keys = np.ones((1, 2, 4), np.float32)
    with MemoryClient(server.endpoint, timeout=1.0) as client:
        client.open("faults", config)
        client.add("faults", 0, [0], keys, keys)
        server.kill()
        start = time.monotonic()
        with pytest.raises(ServerUnavailable, match=re.escape(server.endpoint)) as info:
            client.search("faults", 0, [0], keys, 1)
        assert time.monotonic() - start < 1.0 + 1.0
        assert "search" in str(info.value)
        memory_server(1, port=server.port)
        client.open("faults", config)  # a restarted server starts empty
        client.add("faults", 0, [0], keys, keys)
        assert client.search("faults", 0, [0], keys, 1).mask.all()


def _slow_search(client: MemoryClient):
    """A search of a few seconds here, accepted by the server when this returns."""
    config = NamespaceConfig(dim=64, max_memories=65536, num_layers=1, num_rows=1)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, 65536, 64), dtype=np.float32)
    client.open("slow", config)
    client.add("slow", 0, [0], keys, keys)
    search = client.search_async("slow", 0, [0],
                                 rng.standard_normal((1, 8192, 64), dtype=np.float32), 1)
    client.ping()  # same connection, in order: the server has accepted the search
    return search


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_silent_server_fails_the_request_in_flight_within_seconds(memory_server, how):
    """SIGKILL closes the connection; SIGSTOP leaves it open and silent, which only heartbeats
    notice. Either way the search fails within about 2 s, whatever the 60 s time-out."""
    (server,) = memory_server(1)
    with MemoryClient(server.endpoint, timeout=60) as client:
        search = _slow_search(client)
        start = time.monotonic()
        if how == "SIGKILL":
            server.kill()  # and reaped, so the fixture does not stop it again
        else:
            server.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(ServerUnavailable, match=re.escape(server.endpoint) + r" went away "
                                                        r"while search was in flight"):
                search.result(timeout=10)
            assert time.monotonic() - start < 3.0
        finally:
            if how == "SIGSTOP":
                server.proc.send_signal(signal.SIGCONT)
        if how == "SIGSTOP":  # the server lives on, and the client reconnects to it
            assert client.ping()


def test_a_restarted_server_is_named_as_such_for_a_namespace_it_lost(memory_server):
    (server,) = memory_server(1)
    config = NamespaceConfig(dim=4, max_memories=8, num_layers=1, num_rows=1)
    keys = np.ones((1, 2, 4), np.float32)
    with MemoryClient(server.endpoint, timeout=10) as client:
        client.open("lost", config)
        client.add("lost", 0, [0], keys, keys)
        server.kill()
        memory_server(1, port=server.port)
        with pytest.raises(ServerRestarted, match=re.escape(server.endpoint) + r" restarted, or "
                                                  r"another server took its address, since this "
                                                  r"client opened namespace 'lost' there.*"
                                                  r"memories on that server were lost"):
            client.search("lost", 0, [0], keys, 1)
        assert isinstance(ServerRestarted("x"), UnknownNamespace)  # caught as before
        client.open("lost", config)  # opened again: empty, and no longer "restarted"
        assert not client.search("lost", 0, [0], keys, 1).mask.any()
        with MemoryClient(server.endpoint, timeout=10) as other:
            other.drop("lost")
        with pytest.raises(UnknownNamespace, match="is not open on this server") as info:
            client.search("lost", 0, [0], keys, 1)  # the same server dropped it: not a restart
        assert not isinstance(info.value, ServerRestarted)


def _run_cli(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memory_server", *flags], capture_output=True,
                          text=True, timeout=30)


def test_bind_failure_is_one_line_and_exit_2(server):
    result = _run_cli("--bind", server.endpoint)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "cannot bind" in result.stderr and "in use" in result.stderr


def test_non_loopback_bind_needs_insecure():
    result = _run_cli("--bind", f"tcp://0.0.0.0:{free_port()}")
    assert result.returncode == 2 and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr


def test_insecure_bind_warns_loudly():
    server = launch("--insecure", host="0.0.0.0")
    try:
        wait_ready(server)
        assert "INSECURE" in server.output()
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("flags", [["--threads", "0"], ["--max-bytes", "8X"],
                                   ["--drain-timeout", "0"], ["--log-level", "LOUD"],
                                   ["--no-such-flag"]])
def test_bad_flags_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as info:
        main(flags)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_parse_bytes():
    assert parse_bytes("1048576") == 1 << 20
    assert parse_bytes("512M") == 512 << 20
    assert parse_bytes("8G") == parse_bytes("8gib") == parse_bytes("8GB") == 8 << 30
    for bad in ("", "0", "-1", "1.5G", "8X"):
        with pytest.raises(Exception, match="byte count"):
            parse_bytes(bad)


def test_server_config_validates():
    assert ServerConfig(threads=2).bind == "tcp://127.0.0.1:5555"
    for bad in ({"threads": 0}, {"max_bytes": 0}, {"max_message_bytes": -1}, {"max_connections": 0},
                {"drain_timeout": 0}, {"drain_timeout": float("inf")},
                {"bind": "127.0.0.1:5555"}, {"bind": "tcp://10.0.0.1:5555"}):
        with pytest.raises(ValueError):
            ServerConfig(**bad)
    assert ServerConfig(bind="tcp://*:5555", insecure=True).insecure


def test_is_loopback():
    for endpoint in ("tcp://127.0.0.1:1", "tcp://127.1.2.3:1", "tcp://[::1]:1",
                     "tcp://localhost:1", "ipc:///tmp/x", "inproc://x"):
        assert is_loopback(endpoint), endpoint
    for endpoint in ("tcp://0.0.0.0:1", "tcp://*:1", "tcp://eth0:1", "tcp://example.com:1",
                     "tcp://[::]:1", "tcp://192.168.1.2:1"):
        assert not is_loopback(endpoint), endpoint
