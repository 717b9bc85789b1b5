"""MemoryClient against real servers: sharding gives the in-process store's results bit for bit,
futures, thread safety, error mapping, timeouts and close."""

import re
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from memory_server import (InvalidRequest, MemoryServerError, MemoryStore, NamespaceConfig,
                           ServerUnavailable, UnknownNamespace)
from memory_server.client import MemoryClient
from servers import free_port, start_servers

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def servers():
    started = start_servers(3)
    yield [s.endpoint for s in started]
    codes = [s.stop() for s in started]
    assert codes == [0, 0, 0], [s.output() for s in started]


def _replay(client_or_store, namespace: str, config: NamespaceConfig, seed: int):
    """The same random adds, clears and searches on a MemoryClient or a MemoryStore."""
    rng = np.random.default_rng(seed)
    client_or_store.open(namespace, config)
    results = []
    for step in range(12):
        layer = int(rng.integers(config.num_layers))
        rows = rng.permutation(config.num_rows)[: rng.integers(1, config.num_rows + 1)]
        n = int(rng.integers(1, 9))
        keys = rng.standard_normal((len(rows), n, config.dim), dtype=np.float32)
        values = rng.standard_normal((len(rows), n, config.dim), dtype=np.float32)
        client_or_store.add(namespace, layer, rows, keys, values)
        if step % 5 == 4:
            client_or_store.clear(namespace, rows[:2], [layer] if step % 2 else None)
        search_rows = rng.permutation(config.num_rows)[: rng.integers(1, config.num_rows + 1)]
        queries = rng.standard_normal((len(search_rows), 3, config.dim), dtype=np.float32)
        k = int(rng.integers(1, config.max_memories + 1))
        results.append(client_or_store.search(namespace, layer, search_rows, queries, k))
    return results


@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
@pytest.mark.parametrize("num_servers", [1, 2, 3])
def test_sharded_results_are_bit_identical_to_the_in_process_store(servers, num_servers,
                                                                   value_dtype):
    config = NamespaceConfig(dim=8, max_memories=24, num_layers=2, num_rows=5,
                             value_dtype=value_dtype)
    namespace = f"parity-{num_servers}-{value_dtype}"
    store = MemoryStore()
    expected = _replay(store, namespace, config, seed=num_servers)
    with MemoryClient(servers[:num_servers], timeout=20) as client:
        got = _replay(client, namespace, config, seed=num_servers)
        client.drop(namespace)
    for want, have in zip(expected, got):
        assert have.positions.dtype == np.int32 and have.values.dtype == want.values.dtype
        want_kv, want_mask = want.dense()
        have_kv, have_mask = have.dense()
        assert np.array_equal(have_mask, want_mask)
        assert np.array_equal(have_kv, want_kv)


def test_ivf_namespace_travels_and_matches_the_in_process_store(servers):
    """The nlist/nprobe settings go through open; the servers train the same centroids as the
    in-process store (deterministic k-means), so results are identical once trained and wrapped."""
    config = NamespaceConfig(dim=8, max_memories=256, num_layers=1, num_rows=3, index="ivf",
                             nlist=4, nprobe=1)
    rng = np.random.default_rng(5)
    adds = [rng.standard_normal((3, 60, 8), dtype=np.float32) for _ in range(6)]
    queries = rng.standard_normal((3, 20, 8), dtype=np.float32)
    results = []
    store = MemoryStore(threads=2)  # as the servers of these tests: one OpenMP thread per row
    with MemoryClient(servers[:2], timeout=20) as client:
        for target in (store, client):
            target.open("ivf", config)
            for keys in adds:  # trains at 128 entries, wraps at 256
                target.add("ivf", 0, [0, 1, 2], keys, -keys)
            results.append(target.search("ivf", 0, [2, 0, 1], queries, 16))
        assert client.stats()[0]["per_namespace"]["ivf"]["config"] == config.to_dict()
        client.drop("ivf")
    store.close()
    for want, have in zip(*(r.dense() for r in results)):
        np.testing.assert_array_equal(want, have)
    exact = MemoryStore()  # nprobe 1 of 4 lists: the servers did search approximately
    exact.open("flat", NamespaceConfig(dim=8, max_memories=256, num_layers=1, num_rows=3))
    for keys in adds:
        exact.add("flat", 0, [0, 1, 2], keys, -keys)
    assert not np.array_equal(exact.search("flat", 0, [2, 0, 1], queries, 16).dense()[0],
                              results[1].dense()[0])


def test_hnsw_namespace_is_served(servers):
    config = NamespaceConfig(dim=8, max_memories=64, num_layers=1, num_rows=3, index="hnsw")
    keys = np.random.default_rng(0).standard_normal((3, 40, 8), dtype=np.float32)
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)  # so each key's best match is itself
    with MemoryClient(servers, timeout=20) as client:
        client.open("hnsw", config)
        client.add("hnsw", 0, [0, 1, 2], keys, keys)
        found = client.search("hnsw", 0, [2, 0], keys[[2, 0], :5], 4)
        client.drop("hnsw")
    assert found.mask.all()
    assert np.array_equal(found.dense()[0][:, :, 0, 0], keys[[2, 0], :5])


def test_futures_in_flight_together_give_the_blocking_results(servers):
    config = NamespaceConfig(dim=4, max_memories=16, num_layers=3, num_rows=6)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((6, 10, 4), dtype=np.float32)
    queries = rng.standard_normal((6, 2, 4), dtype=np.float32)
    with MemoryClient(servers, timeout=20) as client:
        client.open("futures", config)
        adds = [client.add_async("futures", layer, np.arange(6), keys * (layer + 1), keys)
                for layer in range(3)]
        searches = [client.search_async("futures", layer, np.arange(6), queries, 3)
                    for layer in range(3)]
        assert all(isinstance(f, Future) for f in adds + searches)
        assert [f.result(timeout=20) for f in adds] == [None] * 3
        for layer, future in enumerate(searches):
            blocking = client.search("futures", layer, np.arange(6), queries, 3)
            assert np.array_equal(future.result(timeout=20).dense()[0], blocking.dense()[0])
        client.drop("futures")


def test_one_client_is_safe_to_share_between_threads(servers):
    threads, rounds, dim = 8, 10, 4
    config = NamespaceConfig(dim=dim, max_memories=4, num_layers=1, num_rows=threads)
    query = np.ones((1, 1, dim), np.float32)
    with MemoryClient(servers, timeout=20) as client:
        client.open("shared", config)

        def run(row: int) -> None:
            for i in range(rounds):
                keys = np.full((1, 1, dim), i + 1, np.float32)
                client.add("shared", 0, [row], keys, keys)
                kv, mask = client.search("shared", 0, [row], query, 1).dense()
                assert mask.all() and kv[0, 0, 0, 0, 0] == i + 1, (row, i)

        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(run, row) for row in range(threads)]:
                future.result(timeout=60)
        assert sum(s["entries"] for s in client.stats()) == threads * config.max_memories
        client.drop("shared")


def test_server_errors_come_back_as_their_class_naming_the_server(servers):
    config = NamespaceConfig(dim=4, max_memories=8, num_layers=1, num_rows=3)
    queries = np.ones((3, 1, 4), np.float32)
    with MemoryClient(servers, timeout=20) as client:
        with pytest.raises(UnknownNamespace, match=re.escape(servers[0])):
            client.search("never-opened", 0, [0, 1, 2], queries, 1)
        client.open("errors", config)
        with pytest.raises(InvalidRequest, match="k must be"):
            client.search("errors", 0, [0, 1, 2], queries, 9)
        assert client.search("errors", 0, [0, 1, 2], queries, 1).positions.shape == (3, 1, 1)
        client.drop("errors")


def test_arguments_that_cannot_be_sent_fail_at_once(servers):
    with MemoryClient(servers, timeout=20) as client:
        with pytest.raises(InvalidRequest, match="rows"):
            client.add_async("ns", 0, [[0, 1]], np.ones((2, 1, 4), np.float32),
                             np.ones((2, 1, 4), np.float32))
        with pytest.raises(InvalidRequest, match="non-empty"):
            client.clear_async("ns", np.zeros(0, np.int64))
        with pytest.raises(InvalidRequest, match=r"keys must have shape \(2, n, dim\)"):
            client.add_async("ns", 0, [0, 1], np.ones((3, 1, 4), np.float32),
                             np.ones((3, 1, 4), np.float32))
        with pytest.raises(InvalidRequest, match="float64"):
            client.search_async("ns", 0, [0], np.ones((1, 1, 4)), 1)
        assert len(client.ping()) == 3


def test_silent_server_times_out_naming_it_and_fails_its_other_requests():
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens here
    with MemoryClient(endpoint, timeout=0.3) as client:
        start = time.monotonic()
        first, second = client.ping_async(), client.stats_async()
        for future, op in ((first, "ping"), (second, "stats")):
            with pytest.raises(ServerUnavailable, match=re.escape(endpoint)) as info:
                future.result(timeout=5)
            assert op in str(info.value)
        assert time.monotonic() - start < 0.3 + 1.0
        with pytest.raises(ServerUnavailable):  # still failing, still bounded
            client.ping()


def test_requests_unanswered_past_retry_after_are_sent_again_and_run_once(memory_server):
    """A slow search holds the session's layer, so the two adds pipelined behind it go unanswered
    past retry_after: the client reconnects and sends all three again with their session and seq.
    The server answers each from its original, which runs once; what the client sends on the new
    connection still runs after them."""
    (server,) = memory_server(1)
    config = NamespaceConfig(dim=64, max_memories=65536, num_layers=1, num_rows=2)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, 65536, 64), dtype=np.float32)
    queries = rng.standard_normal((1, 8192, 64), dtype=np.float32)  # a search of ~2 s here
    with MemoryClient(server.endpoint, timeout=30) as setup:
        setup.open("retry", config)
        setup.add("retry", 0, [0], keys, keys)
    tagged = [np.full((1, 1, 64), tag, np.float32) for tag in (1, 2)]
    with MemoryClient(server.endpoint, timeout=60, retry_after=0.3) as client:
        slow = client.search_async("retry", 0, [0], queries, 1)
        adds = [client.add_async("retry", 0, [1], t, t) for t in tagged]
        time.sleep(0.6)  # past retry_after: sent again
        cleared = client.clear_async("retry", [1], [0])  # on the new connection
        after = client.add_async("retry", 0, [1], tagged[1], tagged[1])
        assert slow.result(timeout=60).positions.shape == (1, 8192, 1)
        for future in (*adds, cleared, after):
            future.result(timeout=60)
        kv, mask = client.search("retry", 0, [1], tagged[0], 2).dense()
        stats = client.stats()[0]
    assert mask.sum() == 1 and kv[0, 0, 0, 1, 0] == 2  # the clear and add ran after the adds
    assert stats["sessions"]["retries_answered"] >= 3
    assert stats["requests"]["add"]["count"] == 1 + 3  # the setup's, the two and the last


def test_a_dead_server_does_not_block_requests_for_rows_of_the_live_ones(servers):
    dead = f"tcp://127.0.0.1:{free_port()}"
    config = NamespaceConfig(dim=4, max_memories=8, num_layers=1, num_rows=4)
    keys = np.ones((2, 1, 4), np.float32)
    with MemoryClient([servers[0], dead], timeout=0.5) as client:
        with pytest.raises(ServerUnavailable, match=re.escape(dead)):
            client.open("half", config)
        client.add("half", 0, [0, 2], keys, keys)  # even rows live on the first server
        assert client.search("half", 0, [2, 0], keys, 1).mask.all()
    with MemoryClient(servers[0], timeout=5) as client:
        client.drop("half")


def test_close_fails_outstanding_requests_and_refuses_new_ones():
    client = MemoryClient(f"tcp://127.0.0.1:{free_port()}", timeout=30)
    pending = client.ping_async()
    client.close()
    with pytest.raises(MemoryServerError, match="closed"):
        pending.result(timeout=5)
    with pytest.raises(MemoryServerError, match="closed"):
        client.ping()
    client.close()  # idempotent


def test_constructor_validates():
    with pytest.raises(ValueError, match="endpoints"):
        MemoryClient([])
    with pytest.raises(ValueError, match="timeout"):
        MemoryClient("tcp://127.0.0.1:1", timeout=0)
