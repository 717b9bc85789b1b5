"""Keyed snapshots and what a snapshot costs, through real servers: with --snapshot-key-file a
snapshot changed by someone without the key, written under another key or without one is
refused at restore, saying which; a snapshot is streamed, so it does not double the server's
resident memory."""

import os
import subprocess
import sys

import numpy as np
import pytest

from memory_server import MemoryClient, NamespaceConfig, SnapshotError
from memory_server.client import shard_tag
from memory_server.snapshot import SnapshotKey, read_key_file, read_snapshot, snapshot_path
from servers import free_port, peak_over
from snapshots import forge_snapshot

pytestmark = pytest.mark.timeout(120)

CONFIG = NamespaceConfig(dim=8, max_memories=32, num_layers=1, num_rows=2)
KEYS = np.random.default_rng(0).standard_normal((2, 5, 8), dtype=np.float32)
TAG = shard_tag("t", 0, 1)


def _key_file(path, material: bytes = os.urandom(32)):
    path.write_bytes(material)
    path.chmod(0o600)
    return path


@pytest.fixture
def keyed(memory_server, tmp_path):
    """A server with a snapshot key whose namespace ``run`` holds KEYS, snapshotted as "t";
    (server, client, data dir, the key)."""
    key_file = _key_file(tmp_path / "snapshot.key")
    data = tmp_path / "data"
    (server,) = memory_server(1, "--data-dir", str(data), "--snapshot-key-file", str(key_file))
    with MemoryClient(server.endpoint, timeout=10) as client:
        client.open("run", CONFIG)
        client.add("run", 0, [0, 1], KEYS, -KEYS)
        client.snapshot("run", "t")
        yield server, client, data, read_key_file(key_file)


def _memories(state: dict) -> list:
    return [(m["layer"], m["row"], m["total"], m["keys"], m["values"]) for m in state["memories"]]


def _values(client) -> np.ndarray:
    kv, _ = client.search("run", 0, [0, 1], KEYS, 1).dense()
    return kv[..., 0, 1, :]


def test_a_keyed_snapshot_round_trips(keyed):
    server, client, data, key = keyed
    client.clear("run", [0, 1])
    assert client.restore("run", "t")[0]["restored"]
    np.testing.assert_array_equal(_values(client), -KEYS)
    assert client.stats()[0]["config"]["snapshot_key"] == key.id


def test_a_changed_byte_fails_the_mac(keyed):
    server, client, data, key = keyed
    path = snapshot_path(data, "run", TAG)
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x01  # in the values of the last memory
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="its MAC does not match its contents under this "
                                            "server's snapshot key"):
        client.restore("run", "t")
    np.testing.assert_array_equal(_values(client), -KEYS)  # nothing was loaded


@pytest.mark.parametrize("forger", ["no key", "another key", "another key, our key's id"])
def test_a_snapshot_forged_without_the_key_is_refused(keyed, forger):
    """Someone who can write to the data directory but has not the key replaces the snapshot
    with one of their own values, checksummed as well as they can."""
    server, client, data, key = keyed
    state = read_snapshot(data, "run", TAG, key)
    forged = [(layer, row, total, keys, np.zeros_like(values))
              for layer, row, total, keys, values in _memories(state)]
    other = SnapshotKey.from_bytes(b"not the server's key at all")
    with_key = {"no key": None, "another key": other,
                "another key, our key's id": SnapshotKey(other.secret, key.id)}[forger]
    forge_snapshot(data, "run", TAG, state["config"], forged, key=with_key)
    words = {"no key": "written without a snapshot key, and this server",
             "another key": f"written with snapshot key '{other.id}', not with this server's",
             "another key, our key's id": "its MAC does not match"}[forger]
    with pytest.raises(SnapshotError, match=words):
        client.restore("run", "t")
    np.testing.assert_array_equal(_values(client), -KEYS)


def test_an_old_format_is_refused_by_a_keyed_server(keyed):
    server, client, data, key = keyed
    state = read_snapshot(data, "run", TAG, key)
    forge_snapshot(data, "run", TAG, state["config"], _memories(state), version=2)
    with pytest.raises(SnapshotError, match="format version 2 carries no MAC"):
        client.restore("run", "t")
    assert read_snapshot(data, "run", TAG)["config"] == state["config"]  # unkeyed, it reads


def test_a_server_without_the_key_names_the_key_a_snapshot_needs(keyed, memory_server):
    server, client, data, key = keyed
    (plain,) = memory_server(1, "--data-dir", str(data))
    with MemoryClient(plain.endpoint, timeout=10) as other:
        with pytest.raises(SnapshotError, match=f"written with snapshot key '{key.id}': start "
                                                f"this server with that key"):
            other.restore("run", "t")


def test_a_tampered_snapshot_at_start_exits_2(keyed):
    server, client, data, key = keyed
    path = snapshot_path(data, "run", TAG)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    key_file = data.parent / "snapshot.key"
    result = subprocess.run(
        [sys.executable, "-m", "memory_server", "--bind", f"tcp://127.0.0.1:{free_port()}",
         "--data-dir", str(data), "--snapshot-key-file", str(key_file), "--restore",
         f"run:{TAG}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and "MAC does not match" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("problem, error", [
    ("readable", "can be read by other users (mode 0644): run chmod 600"),
    ("short", "holds 5 bytes; a key needs at least 16"),
    ("missing", "cannot read it"),
    ("no data dir", "--snapshot-key-file needs --data-dir"),
])
def test_a_bad_key_file_is_refused_at_start(tmp_path, problem, error):
    key_file = _key_file(tmp_path / "k", b"short" if problem == "short" else os.urandom(32))
    if problem == "readable":
        key_file.chmod(0o644)
    elif problem == "missing":
        key_file.unlink()
    flags = [] if problem == "no data dir" else ["--data-dir", str(tmp_path / "data")]
    result = subprocess.run([sys.executable, "-m", "memory_server", "--bind",
                             f"tcp://127.0.0.1:{free_port()}", "--snapshot-key-file",
                             str(key_file), *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and error in result.stderr, result.stderr


@pytest.mark.timeout(600)
def test_a_snapshot_does_not_copy_the_namespace_in_memory(memory_server, tmp_path):
    """64 MiB in 16 memories of 4 MiB: writing the snapshot used to copy all of them first
    (+64 MiB at its peak); streamed, it holds about one memory. A restore allocates the
    namespace it loads, once (the file is read into the memories' own arrays)."""
    config = NamespaceConfig(dim=64, max_memories=8192, num_layers=1, num_rows=16)
    (server,) = memory_server(1, "--data-dir", str(tmp_path))
    namespace = 16 * 8192 * 64 * 8
    rng = np.random.default_rng(0)
    with MemoryClient(server.endpoint, timeout=300) as client:
        client.open("big", config)
        for _ in range(2):
            keys = rng.standard_normal((16, 4096, 64), dtype=np.float32)
            client.add("big", 0, list(range(16)), keys, keys)
        assert client.stats()[0]["bytes"] >= namespace
        written = peak_over(server.proc.pid, lambda: client.snapshot("big", "t"))
        assert written < namespace // 4, written >> 20
        client.drop("big")
        restored = peak_over(server.proc.pid, lambda: client.restore("big", "t"))
        assert restored < namespace * 5 // 4, restored >> 20
        assert client.stats()[0]["bytes"] >= namespace


def test_a_restore_refused_after_it_was_booked_gives_its_bytes_back(memory_server, tmp_path):
    """A restore books its bytes from the snapshot's records before reading the arrays; one then
    refused (a corrupt array) gives them back: after three such restores of 400 KiB under
    --max-bytes 1M an add of 700 KiB fits (one restore's bytes kept on the books would refuse it)."""
    (server,) = memory_server(1, "--data-dir", str(tmp_path), "--max-bytes", "1M")
    config = NamespaceConfig(dim=64, max_memories=800, num_layers=1, num_rows=1)
    keys = np.random.default_rng(1).standard_normal((1, 800, 64), dtype=np.float32)
    with MemoryClient(server.endpoint, timeout=30) as client:
        client.open("run", config)
        client.add("run", 0, [0], keys, keys)
        client.snapshot("run", "t")
        client.drop("run")
        path = snapshot_path(tmp_path, "run", TAG)
        raw = bytearray(path.read_bytes())
        raw[-100] ^= 0x01  # in the values of the memory
        path.write_bytes(bytes(raw))
        for _ in range(3):
            with pytest.raises(SnapshotError, match="checksum does not match"):
                client.restore("run", "t")
        client.open("other", NamespaceConfig(dim=64, max_memories=1400, num_layers=1,
                                             num_rows=1))
        more = np.ones((1, 1400, 64), np.float32)
        client.add("other", 0, [0], more, more)
        assert client.stats()[0]["namespaces"] == 1
