"""Tenants on real servers: with --token-file each client sees, reads and changes only its own
namespaces, a client without the right token gets nothing, an admin may act on every namespace;
ipc socket files are 0700; the trainer's own servers get a token of their own."""

import os
import signal
import stat
import subprocess
import sys

import msgpack
import numpy as np
import pytest

from memory_server import (MemoryClient, NamespaceConfig, SnapshotError, Unauthorized,
                           UnknownNamespace)
from memory_server.tenants import TOKEN_ENV, read_client_token, write_token_file
from servers import launch_tenants

pytestmark = pytest.mark.timeout(90)

CONFIG = NamespaceConfig(dim=4, max_memories=8, num_layers=1, num_rows=2)
KEYS = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)


@pytest.fixture(autouse=True)
def no_token_from_the_environment(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """name -> token of tenants alice and bob (in the server's file ``tenants``) and of the
    admin root (``root.token``), all under ``tokens["dir"]``."""
    root = tmp_path_factory.mktemp("tokens")
    out = {name: write_token_file(root / f"{name}.token", name)
           for name in ("alice", "bob", "root")}
    tenants = root / "tenants"
    tenants.write_text("# the tenants of the test server\n"
                       + "".join((root / f"{n}.token").read_text() for n in ("alice", "bob")))
    tenants.chmod(0o600)
    return {**out, "dir": root}


def _start(tokens, *flags):
    return launch_tenants(tokens["dir"], tokens["root"], *flags)


@pytest.fixture(scope="module")
def server(tokens, tmp_path_factory):
    """A token server on which alice has opened ``run``, added KEYS and snapshotted it as
    ``ckpt``."""
    proc = _start(tokens, "--data-dir", str(tmp_path_factory.mktemp("data")))
    with MemoryClient(proc.endpoint, timeout=10, token=tokens["alice"]) as alice:
        alice.open("run", CONFIG)
        alice.add("run", 0, [0, 1], KEYS, -KEYS)
        alice.snapshot("run", "ckpt")
    yield proc
    assert proc.stop() == 0, proc.output()


def _client(server, token, timeout=10.0):
    return MemoryClient(server.endpoint, timeout=timeout, token=token)


def _alice_view(server, tokens):
    """What nobody but alice (and the admin) may change: her stats and what she retrieves."""
    with _client(server, tokens["alice"]) as alice:
        stats = alice.stats()[0]
        kv, mask = alice.search("run", 0, [0, 1], KEYS, 3).dense()
    return stats["per_namespace"], kv.tobytes(), mask.tobytes()


@pytest.mark.parametrize("who", ["no token", "an unknown token"])
def test_a_client_without_the_right_token_gets_nothing(server, tokens, who):
    before = _alice_view(server, tokens)
    token = None if who == "no token" else "x" * 43
    words = "needs a token" if who == "no token" else "not one this memory server accepts"
    with _client(server, token) as stranger:
        for call in (stranger.ping, stranger.stats, stranger.snapshots,
                     lambda: stranger.open("run", CONFIG),
                     lambda: stranger.search("alice.run", 0, [0, 1], KEYS, 3),
                     lambda: stranger.drop("alice.run"),
                     lambda: stranger.shutdown_server(server.endpoint)):
            with pytest.raises(Unauthorized, match=words):
                call()
    assert _alice_view(server, tokens) == before
    with _client(server, tokens["root"]) as admin:
        assert admin.stats()[0]["requests"]["unauthorized"]["count"] >= 7


def test_an_old_client_is_told_it_cannot_carry_a_token(server):
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(server.endpoint)
        sock.send_multipart([msgpack.packb({"v": 2, "id": 4, "op": "stats", "args": {},
                                            "arrays": []})])
        assert sock.poll(10_000)
        reply = msgpack.unpackb(sock.recv_multipart()[0])
    finally:
        sock.close()
    assert (reply["ok"], reply["code"], reply["id"]) == (False, "unauthorized", 4)
    assert "protocol version 2, which cannot carry a token: upgrade" in reply["message"]


def test_a_second_tenant_sees_reads_and_changes_nothing_of_the_first(server, tokens):
    before = _alice_view(server, tokens)
    with _client(server, tokens["bob"]) as bob:
        stats = bob.stats()[0]
        assert (stats["tenant"], stats["admin"], stats["namespaces"], stats["per_namespace"]) \
            == ("bob", False, 0, {})
        assert "requests" not in stats and "sessions" not in stats  # server-wide: admin only
        assert bob.snapshots() == [[]]
        for name in ("run", "alice.run"):  # neither her name nor the store's reaches hers
            for call in (lambda: bob.search(name, 0, [0, 1], KEYS, 3),
                         lambda: bob.add(name, 0, [0, 1], KEYS, KEYS),
                         lambda: bob.clear(name, [0, 1]),
                         lambda: bob.snapshot(name, "ckpt"),
                         lambda: bob.drop(name)):
                with pytest.raises(UnknownNamespace, match=f"namespace '{name}'.* not open"):
                    call()
        with pytest.raises(SnapshotError):  # her snapshot file is not his to read
            bob.restore("run", "ckpt")
        with pytest.raises(Unauthorized, match="shutdown needs an admin credential"):
            bob.shutdown_server(server.endpoint)
        # His own "run" is another namespace, config and snapshot file included.
        bob.open("run", NamespaceConfig(dim=8, max_memories=4, num_layers=1, num_rows=1))
        ones = np.ones((1, 2, 8), np.float32)
        bob.add("run", 0, [0], ones, ones)
        bob.snapshot("run", "ckpt")
        assert bob.stats()[0]["per_namespace"]["run"]["entries"] == 2
        assert [s["namespace"] for s in bob.snapshots()[0]] == ["run"]
        bob.drop("run")
    assert _alice_view(server, tokens) == before
    with _client(server, tokens["alice"]) as alice:
        assert alice.restore("run", "ckpt")[0]["restored"]  # still her own snapshot
    assert _alice_view(server, tokens) == before


def test_an_admin_sees_every_namespace_and_may_restore_into_one(server, tokens):
    before = _alice_view(server, tokens)
    with _client(server, tokens["alice"]) as alice:
        alice.clear("run", [0, 1])
        assert alice.stats()[0]["entries"] == 0
    with _client(server, tokens["root"]) as admin:
        stats = admin.stats()[0]
        assert stats["admin"] and "alice.run" in stats["per_namespace"]
        assert "requests" in stats and stats["config"]["tenants"]
        assert "alice.run" in {s["namespace"] for s in admin.snapshots()[0]}
        admin.restore("alice.run", "ckpt")
    assert _alice_view(server, tokens) == before


def test_only_an_admin_may_shut_the_server_down(tokens):
    server = _start(tokens)
    try:
        with _client(server, tokens["alice"]) as alice:
            with pytest.raises(Unauthorized):
                alice.shutdown_server(server.endpoint)
            assert alice.ping()
        with _client(server, tokens["root"]) as admin:
            admin.shutdown_server(server.endpoint)
        assert server.proc.wait(15) == 0
        assert "shutdown requested by client 'root'" in server.output()
    finally:
        server.kill()


def test_a_token_file_others_can_read_is_refused(tokens, tmp_path):
    loose = tmp_path / "tenants"
    loose.write_text((tokens["dir"] / "alice.token").read_text())
    loose.chmod(0o644)
    result = subprocess.run([sys.executable, "-m", "memory_server", "--token-file", str(loose)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "can be read by other users (mode 0644): run chmod 600" in result.stderr


def test_the_client_reads_its_token_from_the_environment(server, tokens, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, str(tokens["dir"] / "alice.token"))
    assert read_client_token(tokens["dir"] / "alice.token") == tokens["alice"]
    with MemoryClient(server.endpoint, timeout=10) as alice:
        assert "run" in alice.stats()[0]["per_namespace"]


def test_an_ipc_socket_is_created_for_its_owner_only(tmp_path):
    """Even under umask 000, which would leave the socket file open to every local user."""
    path = tmp_path / "memory.sock"
    proc = subprocess.Popen([sys.executable, "-m", "memory_server", "--bind", f"ipc://{path}",
                             "--threads", "1"], umask=0, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        with MemoryClient(f"ipc://{path}", timeout=30) as client:
            assert client.ping()
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_the_trainers_own_servers_have_a_token(tmp_path):
    from memtrans.servers import LocalServers

    with LocalServers(1, tmp_path) as local:
        with MemoryClient(local.endpoints[0], timeout=10) as stranger:
            with pytest.raises(Unauthorized, match="needs a token"):
                stranger.ping()
        token = read_client_token(local.token_file)
        with MemoryClient(local.endpoints[0], timeout=10, token=token) as trainer:
            trainer.open("run", CONFIG)
            assert trainer.stats()[0]["tenant"] == "trainer"
        token_file = local.token_file
    assert not token_file.exists()  # the token lives as long as its servers


def test_status_shows_a_tenant_its_own_namespaces(server, tokens):
    def status(*flags):
        return subprocess.run([sys.executable, "-m", "memory_server", "status", server.endpoint,
                               *flags], capture_output=True, text=True, timeout=30)

    mine = status("--token-file", str(tokens["dir"] / "alice.token"))
    assert mine.returncode == 0, mine.stderr
    assert "namespaces 1" in mine.stdout and "run:" in mine.stdout
    assert "the namespaces of tenant 'alice'" in mine.stdout
    admin = status("--token-file", str(tokens["dir"] / "root.token"))
    assert admin.returncode == 0 and "alice.run:" in admin.stdout and "p99 ms" in admin.stdout
    refused = status()
    assert refused.returncode == 1 and "needs a token" in refused.stderr
