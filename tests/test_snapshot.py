"""Snapshots through real servers: exact round trips, restore at start, and files that must be
refused (one flipped byte, truncated, foreign, renamed) or survive a server killed mid-write."""

import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from memory_server import (ConfigMismatch, InvalidRequest, LimitExceeded, MemoryClient,
                           NamespaceConfig, SnapshotError)
from memory_server.client import shard_tag
from memory_server.snapshot import read_snapshot, snapshot_path
from servers import free_port
from snapshots import forge_snapshot

pytestmark = pytest.mark.timeout(120)

CONFIG = NamespaceConfig(dim=16, max_memories=40, num_layers=2, num_rows=4)


def fill(client: MemoryClient, namespace: str, config: NamespaceConfig = CONFIG, *, adds: int = 5,
         n: int = 13, seed: int = 0) -> None:
    """Adds that wrap the rings of some memories (5 x 13 > 40) and leave others empty."""
    rng = np.random.default_rng(seed)
    client.open(namespace, config)
    for _ in range(adds):
        for layer in range(config.num_layers):
            rows = [0, 1, 3]
            client.add_async(namespace, layer, rows,
                             rng.standard_normal((3, n, config.dim), dtype=np.float32),
                             rng.standard_normal((3, n, config.dim), dtype=np.float32))


def searches(client: MemoryClient, namespace: str, config: NamespaceConfig = CONFIG) -> list:
    queries = np.random.default_rng(1).standard_normal((4, 7, config.dim), dtype=np.float32)
    return [client.search(namespace, layer, [0, 1, 2, 3], queries, 5).dense()
            for layer in range(config.num_layers)]


def assert_same(a: list, b: list) -> None:
    for (kv_a, mask_a), (kv_b, mask_b) in zip(a, b):
        np.testing.assert_array_equal(kv_a, kv_b)
        np.testing.assert_array_equal(mask_a, mask_b)


def test_ivf_round_trip_keeps_the_centroids(memory_server, tmp_path):
    """A trained ivf memory comes back with the same centroids and lists: identical searches."""
    config = NamespaceConfig(dim=16, max_memories=256, num_layers=2, num_rows=4, index="ivf",
                             nlist=4, nprobe=1)
    servers = [s.endpoint for s in memory_server(2, "--data-dir", str(tmp_path))]
    with MemoryClient(servers, timeout=10) as client:
        fill(client, "ivf", config, adds=25)  # 325 entries: trained at 130 and 260, wrapped
        before = searches(client, "ivf", config)
        client.snapshot("ivf", "t1")
        fill(client, "ivf", config, adds=25, seed=2)  # retrained at 520 on other keys
        client.restore("ivf", "t1")
        assert_same(searches(client, "ivf", config), before)
    state = read_snapshot(tmp_path, "ivf", shard_tag("t1", 0, 2))
    assert [(m["trained_at"], m["centroids"].shape) for m in state["memories"]] == \
        [(260, (4, 16))] * 2  # server 0 holds row 0 of both layers


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_float16_keys_round_trip_exactly(memory_server, tmp_path, index):
    """Compressed keys are written and read as float16, slot for slot, with an ivf memory's
    8-bit ranges after its centroids: identical searches after the restore."""
    config = NamespaceConfig(dim=16, max_memories=256, num_layers=2, num_rows=4, index=index,
                             key_dtype="float16", **(dict(nlist=4, nprobe=1) if index == "ivf"
                                                     else {}))
    (server,) = memory_server(1, "--data-dir", str(tmp_path))
    with MemoryClient(server.endpoint, timeout=10) as client:
        fill(client, "half", config, adds=25)  # 325 entries: wrapped (ivf: trained at 260)
        before = searches(client, "half", config)
        client.snapshot("half", "t1")
        fill(client, "half", config, adds=25, seed=2)
        client.restore("half", "t1")
        assert_same(searches(client, "half", config), before)
    state = read_snapshot(tmp_path, "half", shard_tag("t1", 0, 1))
    assert state["config"]["key_dtype"] == "float16"
    memory = state["memories"][0]
    assert memory["keys"].dtype == np.float16 and memory["keys"].shape == (256, 16)
    assert memory.get("centroids", np.empty((0, 16))).shape == ((4 + 2, 16) if index == "ivf"
                                                                else (0, 16))


def test_round_trip_gives_identical_searches(memory_server, tmp_path):
    servers = [s.endpoint for s in memory_server(2, "--data-dir", str(tmp_path))]
    with MemoryClient(servers, timeout=10) as client:
        fill(client, "run")
        before = searches(client, "run")
        written = client.snapshot("run", "t1")
        assert [r["memories"] for r in written] == [2, 4]  # server 0: row 0; 1: rows 1, 3
        fill(client, "run", seed=2)  # change everything, then go back
        client.restore("run", "t1")
        assert_same(searches(client, "run"), before)
        client.drop("run")
        client.restore("run", "t1")  # into a server that no longer has the namespace
        assert_same(searches(client, "run"), before)
        assert client.restore("run", "t1", if_missing=True) == [{"restored": False}] * 2
        listed = client.snapshots()
        assert [[(s["namespace"], s["tag"]) for s in one] for one in listed] == \
            [[("run", shard_tag("t1", 0, 2)), ("run", shard_tag("t1", 1, 2))]] * 2


def test_snapshot_sees_the_adds_sent_before_it(memory_server, tmp_path):
    (server,) = memory_server(1, "--data-dir", str(tmp_path))
    with MemoryClient(server.endpoint, timeout=10) as client:
        fill(client, "run")  # sent without waiting
        client.snapshot("run", "t")
        state = read_snapshot(tmp_path, "run", shard_tag("t", 0, 1))
    assert sorted(m["total"] for m in state["memories"]) == [65] * 6


def test_restore_at_start(memory_server, tmp_path):
    (first,) = memory_server(1, "--data-dir", str(tmp_path))
    with MemoryClient(first.endpoint, timeout=10) as client:
        fill(client, "run")
        before = searches(client, "run")
        client.snapshot("run", "t")
    assert first.stop() == 0
    tag = shard_tag("t", 0, 1)
    (second,) = memory_server(1, "--data-dir", str(tmp_path), "--restore", f"run:{tag}")
    with MemoryClient(second.endpoint, timeout=10) as client:
        assert_same(searches(client, "run"), before)


def test_without_data_dir_snapshot_is_refused(memory_server):
    (server,) = memory_server(1)
    with MemoryClient(server.endpoint, timeout=10) as client:
        fill(client, "run")
        with pytest.raises(InvalidRequest, match="--data-dir"):
            client.snapshot("run", "t")


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "x" * 200, "a@b", ""])
def test_bad_names_are_refused(memory_server, tmp_path, name):
    (server,) = memory_server(1, "--data-dir", str(tmp_path / "data"))
    with MemoryClient(server.endpoint, timeout=10) as client:
        fill(client, "run")
        with pytest.raises(InvalidRequest, match="snapshot tag"):
            client.snapshot("run", name)
    assert list(tmp_path.rglob("*")) in ([], [tmp_path / "data"])


def _written(tmp_path, memory_server) -> tuple:
    (server,) = memory_server(1, "--data-dir", str(tmp_path))
    client = MemoryClient(server.endpoint, timeout=10)
    fill(client, "run")
    client.snapshot("run", "t")
    return server, client, snapshot_path(tmp_path, "run", shard_tag("t", 0, 1))


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "empty"])
def test_damaged_snapshot_is_refused_and_nothing_loaded(memory_server, tmp_path, damage):
    server, client, path = _written(tmp_path, memory_server)
    with client:
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0x01
        elif damage == "truncate":
            data = data[: len(data) - 100]
        elif damage == "foreign":
            data = bytearray(b"PK\x03\x04" + bytes(len(data)))
        else:
            data = bytearray()
        path.write_bytes(bytes(data))
        client.clear("run", [0, 1, 2, 3])
        with pytest.raises(SnapshotError, match=str(path)):
            client.restore("run", "t")
        # The namespace is as it was before the refused restore: still open, still empty.
        assert all(not mask.any() for _, mask in searches(client, "run"))


def test_renamed_snapshot_is_refused(memory_server, tmp_path):
    server, client, path = _written(tmp_path, memory_server)
    with client:
        path.rename(snapshot_path(tmp_path, "other", shard_tag("t", 0, 1)))
        client.open("other", CONFIG)
        with pytest.raises(SnapshotError, match="renamed"):
            client.restore("other", "t")


def test_damaged_snapshot_at_start_exits_with_a_clear_error(tmp_path, memory_server):
    server, client, path = _written(tmp_path, memory_server)
    client.close()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    result = subprocess.run(
        [sys.executable, "-m", "memory_server", "--bind", f"tcp://127.0.0.1:{free_port()}",
         "--data-dir", str(tmp_path), "--restore", f"run:{shard_tag('t', 0, 1)}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and "checksum" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_kill_during_snapshot_keeps_the_previous_one(memory_server, tmp_path):
    """SIGKILL while the server writes a ~200 MB snapshot over an older one of the same name: the
    older one still restores, identical, and the dead write left at most a temporary file."""
    big = NamespaceConfig(dim=64, max_memories=100_000, num_layers=2, num_rows=4)
    (server,) = memory_server(1, "--data-dir", str(tmp_path))
    with MemoryClient(server.endpoint, timeout=60) as client:
        fill(client, "big", big, adds=1, n=2_000)
        before = searches(client, "big", big)
        client.snapshot("big", "t")
        path = snapshot_path(tmp_path, "big", shard_tag("t", 0, 1))
        old = path.read_bytes()
        fill(client, "big", big, adds=4, n=20_000, seed=3)  # ~4x the bytes: a slow write
        client.snapshot_async("big", "t")
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob(".*.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.001)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
    assert list(tmp_path.glob(".*.tmp-*")), "the kill came before the write began"
    assert path.read_bytes() == old
    (again,) = memory_server(1, "--data-dir", str(tmp_path), "--restore",
                             f"big:{shard_tag('t', 0, 1)}")
    with MemoryClient(again.endpoint, timeout=60) as client:
        assert_same(searches(client, "big", big), before)


CRASHING = {"dim": 4, "max_memories": 8, "num_layers": 1, "num_rows": 1, "index": "hnsw",
            "hnsw_m": 1}  # faiss segfaults on the first add to an HNSW graph with M=1
ONE_MEMORY = [(0, 0, 3, np.ones((3, 4), np.float32), np.ones((3, 4), np.float32))]
BASE_CONFIG = {"dim": 4, "max_memories": 8, "num_layers": 1, "num_rows": 1}


def test_restore_of_a_config_out_of_range_is_refused_and_the_server_lives(memory_server,
                                                                          tmp_path):
    forge_snapshot(tmp_path, "bad", shard_tag("t", 0, 1), CRASHING, ONE_MEMORY)
    (server,) = memory_server(1, "--data-dir", str(tmp_path))
    with MemoryClient(server.endpoint, timeout=10) as client:
        with pytest.raises(SnapshotError, match=re.escape("hnsw_m must be an integer in [2, 256], "
                                                          "got 1")):
            client.restore("bad", "t")
        assert client.ping() and client.stats()[0]["namespaces"] == 0


def test_a_version_1_snapshot_still_restores(memory_server, tmp_path):
    """Files written before ivf (format 1: no centroid fields) load as they were."""
    keys = np.eye(4, dtype=np.float32)[:3]
    forge_snapshot(tmp_path, "old", shard_tag("t", 0, 1), BASE_CONFIG, [(0, 0, 3, keys, -keys)],
                   version=1)
    (server,) = memory_server(1, "--data-dir", str(tmp_path))
    with MemoryClient(server.endpoint, timeout=10) as client:
        client.restore("old", "t")
        kv, mask = client.search("old", 0, [0], keys[None], 1).dense()
    np.testing.assert_array_equal(kv[0, :, 0, 1], -keys)
    assert mask.all()


def test_restore_at_start_of_a_config_out_of_range_exits_2(tmp_path):
    forge_snapshot(tmp_path, "bad", "t", CRASHING, ONE_MEMORY)
    result = subprocess.run(
        [sys.executable, "-m", "memory_server", "--bind", f"tcp://127.0.0.1:{free_port()}",
         "--data-dir", str(tmp_path), "--restore", "bad:t"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "hnsw_m must be an integer in [2, 256]" in result.stderr
    assert "Traceback" not in result.stderr


def test_restore_counts_against_max_namespaces_and_keeps_an_open_namespace_s_dim(memory_server,
                                                                                 tmp_path):
    """A restore used to pass --max-namespaces, and to change the dim of a namespace its clients
    had open, silently."""
    (server,) = memory_server(1, "--data-dir", str(tmp_path), "--max-namespaces", "2")
    small = NamespaceConfig(dim=4, max_memories=8, num_layers=1, num_rows=1)
    wide = NamespaceConfig(dim=8, max_memories=8, num_layers=1, num_rows=1)
    with MemoryClient(server.endpoint, timeout=10) as client:
        for name, config in (("a", small), ("b", wide)):
            client.open(name, config)
            client.snapshot(name, "t")
        tag = shard_tag("t", 0, 1)
        client.drop("a")
        client.open("c", small)  # two open: b and c
        with pytest.raises(LimitExceeded, match="restore of snapshot .* into namespace 'a' "
                                                ".*--max-namespaces"):
            client.restore("a", "t")
        client.drop("c")
        client.restore("a", "t")  # room for it now
        with pytest.raises(ConfigMismatch, match=rf"snapshot '{tag}' refused: namespace 'b' is "
                                                 "open with dim=8 and the snapshot's keys have "
                                                 "dim=4"):
            _restore_into(tmp_path, client, source="a", target="b")
        assert client.stats()[0]["per_namespace"].keys() == {"a", "b"}


def _restore_into(tmp_path, client: MemoryClient, source: str, target: str) -> None:
    """Restore ``source``'s snapshot "t" into namespace ``target`` (a copy of the file under
    ``target``'s name, as a mistaken restore would find)."""
    tag = shard_tag("t", 0, 1)
    state = read_snapshot(tmp_path, source, tag)
    forge_snapshot(tmp_path, target, tag, state["config"],
                   [(m["layer"], m["row"], m["total"], m["keys"], m["values"])
                    for m in state["memories"]])
    client.restore(target, "t")
