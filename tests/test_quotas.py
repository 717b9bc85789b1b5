"""Per-tenant quotas on real servers: a tenant holds at most its quota of bytes, all its
namespaces together, so it cannot fill --max-bytes and starve the others; over it, an add or a
restore is refused with ``quota_exceeded`` and changes nothing. Also the store's books alone."""

import subprocess
import sys

import numpy as np
import pytest

from memory_server import LimitExceeded, MemoryClient, MemoryStore, NamespaceConfig, QuotaExceeded
from memory_server.client import shard_tag
from memory_server.tenants import TOKEN_ENV, write_token_file
from servers import free_port, launch_tenants, peak_over

pytestmark = pytest.mark.timeout(90)

# 1,024 entries of dim 64 are 512 KiB of keys and values: two adds pass a 1 MiB quota.
CONFIG = NamespaceConfig(dim=64, max_memories=8192, num_layers=1, num_rows=1)
KEYS = np.random.default_rng(0).standard_normal((1, 1024, 64), dtype=np.float32)


@pytest.fixture(autouse=True)
def no_token_from_the_environment(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture
def tokens(tmp_path):
    """Tenants alice (quota 1M on her line), bob (--tenant-max-bytes, when given) and admin
    root; name -> token, and the files under ``dir``."""
    out = {name: write_token_file(tmp_path / f"{name}.token", name)
           for name in ("alice", "bob", "root")}
    tenants = tmp_path / "tenants"
    tenants.write_text(f"alice {out['alice']} max_bytes=1M\nbob {out['bob']}\n")
    tenants.chmod(0o600)
    return {**out, "dir": tmp_path}


def _start(tokens, *flags):
    return launch_tenants(tokens["dir"], tokens["root"], "--max-bytes", "8M", *flags)


def _fill(client, namespace: str, most: int = 16) -> int:
    """Adds KEYS to ``namespace`` until its tenant's quota refuses one (at most ``most``);
    returns how many were taken."""
    client.open(namespace, CONFIG)
    for taken in range(most):
        try:
            client.add(namespace, 0, [0], KEYS, KEYS)
        except QuotaExceeded:
            return taken
    raise AssertionError(f"{most} adds of {KEYS.nbytes * 2} bytes were all taken")


def test_a_tenant_over_its_quota_is_refused_and_others_are_served(tokens, tmp_path):
    server = _start(tokens, "--data-dir", str(tmp_path / "data"))
    try:
        with MemoryClient(server.endpoint, timeout=10, token=tokens["alice"]) as alice, \
                MemoryClient(server.endpoint, timeout=10, token=tokens["bob"]) as bob:
            assert _fill(alice, "a") == 1  # 512 KiB plus a memory's overhead; a second passes 1M
            entries = alice.stats()[0]["per_namespace"]["a"]["entries"]
            with pytest.raises(QuotaExceeded) as info:  # a second namespace shares the quota
                alice.open("b", CONFIG)
                alice.add("b", 0, [0], KEYS, KEYS)
            assert isinstance(info.value, LimitExceeded)
            assert "tenant 'alice' holds" in info.value.message
            assert "of its quota max_bytes=1048576" in info.value.message
            stats = alice.stats()[0]
            assert stats["per_namespace"]["a"]["entries"] == entries
            assert stats["per_namespace"]["b"]["memories"] == 0  # the refused add left nothing
            assert stats["quota"]["max_bytes"] == 1 << 20
            assert stats["quota"]["bytes"] == stats["bytes"] <= 1 << 20
            # bob, without a quota, takes more than alice may, up to --max-bytes
            bob.open("run", CONFIG)
            for _ in range(6):
                bob.add("run", 0, [0], KEYS, KEYS)
            assert bob.stats()[0]["bytes"] > 2 << 20 and bob.stats()[0]["quota"] is None
            # what alice drops is hers again
            alice.snapshot("a", "t")
            alice.drop("a")
            assert alice.stats()[0]["quota"]["bytes"] == 0
            alice.add("b", 0, [0], KEYS, KEYS)
            # a restore counts against the quota too, an admin's into her namespace included
            with pytest.raises(QuotaExceeded, match="restore of namespace 'a'"):
                alice.restore("a", "t")
            with MemoryClient(server.endpoint, timeout=10, token=tokens["root"]) as admin:
                with pytest.raises(QuotaExceeded, match="tenant 'alice'"):
                    admin.restore("alice.a", "t")
                quotas = admin.stats()[0]["quotas"]
            assert set(quotas) == {"alice"} and quotas["alice"]["bytes"] <= 1 << 20
            assert "a" not in alice.stats()[0]["per_namespace"]
            alice.drop("b")
            assert alice.restore("a", "t")[0]["restored"]
    finally:
        assert server.stop() == 0, server.output()[-3000:]
    assert "quotas for 1 tenants: 1048576 bytes in all" in server.output()


@pytest.mark.timeout(600)
def test_a_snapshot_too_large_is_refused_before_it_is_read(tokens, tmp_path):
    """A 32 MiB snapshot restored where --max-bytes or the tenant's quota is 16M is refused as
    an add would be, from its header and records, and the server's peak grows by far less than
    the snapshot (it used to read the whole snapshot, then refuse it); at start, --restore of it
    exits 2 saying so; where it fits, it restores."""
    data = str(tmp_path / "data")
    config = NamespaceConfig(dim=64, max_memories=8192, num_layers=1, num_rows=8)
    size = 8 * 8192 * 64 * 8  # keys and values, float32
    rng = np.random.default_rng(0)
    big = launch_tenants(tokens["dir"], tokens["root"], "--max-bytes", "1G", "--data-dir", data)
    try:
        with MemoryClient(big.endpoint, timeout=120, token=tokens["bob"]) as bob:
            bob.open("big", config)
            for _ in range(2):
                keys = rng.standard_normal((8, 4096, 64), dtype=np.float32)
                bob.add("big", 0, list(range(8)), keys, keys)
            bob.snapshot("big", "t")
            held = bob.stats()[0]["per_namespace"]["big"]
            assert held["bytes"] >= size
            for flags, error, match in (
                    (("--max-bytes", "16M"), LimitExceeded, "needs [0-9]+ more bytes but the "
                     "server holds 0 of max_bytes=16777216; raise --max-bytes"),
                    (("--max-bytes", "1G", "--tenant-max-bytes", "16M"), QuotaExceeded,
                     "needs [0-9]+ more bytes but tenant 'bob' holds 0 of its quota "
                     "max_bytes=16777216")):
                small = launch_tenants(tokens["dir"], tokens["root"], "--data-dir", data, *flags)
                try:
                    with MemoryClient(small.endpoint, timeout=120, token=tokens["bob"]) as client:
                        client.ping()

                        def refused():
                            with pytest.raises(error, match=match):
                                client.restore("big", "t")

                        grown = peak_over(small.proc.pid, refused)
                        stats = client.stats()[0]
                    assert stats["namespaces"] == 0 and stats["bytes"] == 0
                    assert grown < size // 8, grown >> 20
                finally:
                    assert small.stop() == 0, small.output()[-3000:]
            bob.drop("big")
            assert bob.restore("big", "t")[0]["restored"]
            assert bob.stats()[0]["per_namespace"]["big"] == held
    finally:
        assert big.stop() == 0, big.output()[-3000:]
    result = subprocess.run([sys.executable, "-m", "memory_server", "--bind",
                             f"tcp://127.0.0.1:{free_port()}", "--max-bytes", "16M",
                             "--data-dir", data, "--restore", f"bob.big:{shard_tag('t', 0, 1)}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "restore of namespace 'bob.big' needs" in result.stderr
    assert "raise --max-bytes" in result.stderr and "Traceback" not in result.stderr


def test_the_default_quota_applies_to_every_tenant_without_its_own(tokens):
    server = _start(tokens, "--tenant-max-bytes", "2M")
    try:
        with MemoryClient(server.endpoint, timeout=10, token=tokens["alice"]) as alice, \
                MemoryClient(server.endpoint, timeout=10, token=tokens["bob"]) as bob:
            assert _fill(alice, "run") == 1  # her own line: 1M
            assert _fill(bob, "run") == 2  # the default, 2M: a third grows the ring to 2 MiB
            assert bob.stats()[0]["quota"]["max_bytes"] == 2 << 20
        status = subprocess.run([sys.executable, "-m", "memory_server", "status",
                                 server.endpoint, "--token-file",
                                 str(tokens["dir"] / "alice.token")],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "quota: 514.0 KiB of 1.0 MiB held" in status.stdout, \
            status.stdout + status.stderr
    finally:
        assert server.stop() == 0, server.output()[-3000:]


@pytest.mark.parametrize("line, error", [
    ("alice {token} max_bytes=lots", "line 1: max_bytes: expected a positive byte count"),
    ("alice {token} quota=1M", "the third field must be max_bytes=SIZE"),
    ("alice {token} max_bytes=1M extra", "got 4 fields"),
])
def test_a_bad_quota_in_the_token_file_is_refused_at_start(tokens, line, error):
    path = tokens["dir"] / "tenants"
    path.write_text(line.format(token=tokens["alice"]) + "\n")
    result = subprocess.run([sys.executable, "-m", "memory_server", "--token-file", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and error in result.stderr, result.stderr


def test_an_admin_has_no_quota(tokens):
    path = tokens["dir"] / "root.token"
    path.write_text(f"root {tokens['root']} max_bytes=1M\n")
    result = subprocess.run([sys.executable, "-m", "memory_server", "--admin-token-file",
                             str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "an admin has no quota" in result.stderr, result.stderr


def test_a_quota_needs_tenants():
    result = subprocess.run([sys.executable, "-m", "memory_server", "--tenant-max-bytes", "1M"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--tenant-max-bytes needs tenants" in result.stderr


def test_the_store_books_each_group_apart():
    """Drop, restore over and expiry give a group's bytes back; other names have no quota."""
    store = MemoryStore(quotas={"alice": 1 << 20})
    try:
        for name in ("alice.a", "alice.b", "bob.a", "alice"):
            store.open(name, CONFIG)
        store.add("alice.a", 0, [0], KEYS, KEYS)
        with pytest.raises(QuotaExceeded):
            store.add("alice.b", 0, [0], KEYS, KEYS)
        for _ in range(4):  # neither bob's nor an unprefixed name count against alice
            store.add("bob.a", 0, [0], KEYS, KEYS)
            store.add("alice", 0, [0], KEYS, KEYS)
        held = store.quota("alice")["bytes"]
        assert held == store.stats()["per_namespace"]["alice.a"]["bytes"]
        state = store.export_namespace("alice.a")
        store.import_namespace("alice.a", state)  # over itself: frees what it replaces
        assert store.quota("alice")["bytes"] == held
        store.drop("alice.a")
        assert store.quota("alice")["bytes"] == 0
        store.add("alice.b", 0, [0], KEYS, KEYS)
        assert store.expire(0.0) and store.quota("alice")["bytes"] == 0
        assert store.quota("bob") is None
    finally:
        store.close()
