"""CURVE: keygen, a server that admits only the client keys it allows, each key a tenant of its
own, and the refusal to expose a server without CURVE (no traffic leaves this host: 0.0.0.0 binds
are reached on 127.0.0.1)."""

import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from memory_server import (MemoryClient, NamespaceConfig, ServerUnavailable, Unauthorized,
                           UnknownNamespace)
from memory_server.cli import main
from memory_server.protocol import encode_request
from servers import free_port, launch

pytestmark = pytest.mark.timeout(90)

CONFIG = NamespaceConfig(dim=4, max_memories=8, num_layers=1, num_rows=2)
KEYS = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """server.key(_secret), allowed/client.key(_secret), allowed/other.key(_secret) (a second
    tenant), admin/root.key(_secret) and stranger.key(_secret)."""
    root = tmp_path_factory.mktemp("keys")
    for out, name in ((root, "server"), (root / "allowed", "client"), (root / "allowed", "other"),
                      (root / "admin", "root"), (root, "stranger")):
        assert main(["keygen", "--out", str(out), "--name", name]) == 0
    return root


def _client(keys, endpoint, timeout=10.0, secret="allowed/client.key_secret"):
    return MemoryClient(endpoint, timeout=timeout, server_public_key=keys / "server.key",
                        secret_key=keys / secret)


@pytest.fixture(scope="module")
def curve_server(keys):
    """A CURVE server bound to 0.0.0.0 (non-loopback: allowed because CURVE is on)."""
    port = free_port()
    server = launch("--bind", f"tcp://0.0.0.0:{port}", "--curve-secret-key",
                    str(keys / "server.key_secret"), "--curve-allow", str(keys / "allowed"),
                    "--curve-admin", str(keys / "admin"), port=port)
    try:
        server.wait_ready(server_public_key=keys / "server.key",
                          secret_key=keys / "allowed/client.key_secret")
        with _client(keys, server.endpoint) as client:
            client.open("secret", CONFIG)
            client.add("secret", 0, [0, 1], KEYS, KEYS)
        yield server
    finally:
        assert server.stop() == 0, server.output()


def test_keygen_writes_a_private_secret_and_never_overwrites(keys, capsys):
    assert stat.S_IMODE(os.stat(keys / "server.key_secret").st_mode) == 0o600
    public = (keys / "server.key").read_text()
    assert "public-key" in public and "secret-key" not in public
    assert main(["keygen", "--out", str(keys)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (keys / "server.key").read_text() == public


def test_the_allowed_client_works(keys, curve_server):
    assert "CURVE on" in curve_server.output()
    with _client(keys, curve_server.endpoint) as client:
        kv, mask = client.search("secret", 0, [0, 1], KEYS, 3).dense()
        assert mask.all() and kv[0, 0, 0, 0].tolist() in KEYS[0].tolist()


@pytest.mark.parametrize("who", ["no keys", "a stranger's key", "the server's own key"])
def test_other_clients_get_no_reply_and_no_data(keys, curve_server, who):
    kwargs = {"no keys": {},
              "a stranger's key": {"server_public_key": keys / "server.key",
                                   "secret_key": keys / "stranger.key_secret"},
              "the server's own key": {"server_public_key": keys / "server.key",
                                       "secret_key": keys / "server.key_secret"}}[who]
    before = _requests(keys, curve_server)
    with MemoryClient(curve_server.endpoint, timeout=0.5, **kwargs) as client:
        start = time.monotonic()
        # A failed handshake leaves the request unanswered, or (once ZeroMQ has dropped the
        # connection) with no peer to queue it to: either way it is refused at once.
        with pytest.raises(ServerUnavailable, match="did not answer|cannot send"):
            client.search("secret", 0, [0, 1], KEYS, 3)
        assert time.monotonic() - start < 3
        with pytest.raises(ServerUnavailable):
            client.stats()
    assert _requests(keys, curve_server) == before  # not one request got through


def _requests(keys, server) -> dict:
    """Request counts per op, except the stats call that reads them (an admin's)."""
    with _client(keys, server.endpoint, secret="admin/root.key_secret") as client:
        requests = client.stats()[0]["requests"]
    return {op: r["count"] for op, r in requests.items() if op != "stats"}


def test_each_key_is_a_tenant_and_an_admin_key_sees_all(keys, curve_server):
    with _client(keys, curve_server.endpoint, secret="allowed/other.key_secret") as other:
        stats = other.stats()[0]
        assert (stats["tenant"], stats["namespaces"]) == ("other", 0)
        with pytest.raises(UnknownNamespace):
            other.search("secret", 0, [0, 1], KEYS, 3)
        with pytest.raises(Unauthorized):
            other.shutdown_server(curve_server.endpoint)
    with _client(keys, curve_server.endpoint, secret="admin/root.key_secret") as admin:
        stats = admin.stats()[0]
        assert stats["admin"] and stats["per_namespace"]["client.secret"]["entries"] == 6
    assert "3 tenants, 1 of them admins" in curve_server.output()


def test_a_raw_plaintext_socket_gets_nothing(curve_server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(curve_server.endpoint)
        sock.send_multipart(encode_request(1, "stats"))
        assert not sock.poll(500)
    finally:
        sock.close()


def test_status_reaches_a_curve_server_with_keys(keys, curve_server):
    ok = _run_cli("status", curve_server.endpoint, "--server-key", str(keys / "server.key"),
                  "--client-key", str(keys / "allowed/client.key_secret"))
    assert ok.returncode == 0, ok.stderr
    assert "namespaces 1" in ok.stdout and "entries 6" in ok.stdout
    refused = _run_cli("status", curve_server.endpoint, "--timeout", "0.5")
    assert refused.returncode == 1 and "did not answer within 0.5 s" in refused.stderr


def _run_cli(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memory_server", *flags], capture_output=True,
                          text=True, timeout=30)


def test_a_non_loopback_bind_without_curve_or_insecure_refuses_to_start():
    result = _run_cli("--bind", f"tcp://0.0.0.0:{free_port()}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "refusing to bind" in result.stderr
    assert "--curve-secret-key" in result.stderr and "--insecure" in result.stderr


@pytest.mark.parametrize("case", ["secret key without allow list", "missing key file",
                                  "empty allow directory"])
def test_bad_curve_flags_exit_2_with_a_message(keys, tmp_path, case):
    flags = {"secret key without allow list": ["--curve-secret-key",
                                               str(keys / "server.key_secret")],
             "missing key file": ["--curve-secret-key", str(tmp_path / "nope"),
                                  "--curve-allow", str(keys / "allowed")],
             "empty allow directory": ["--curve-secret-key", str(keys / "server.key_secret"),
                                       "--curve-allow", str(tmp_path)]}[case]
    result = _run_cli("--bind", f"tcp://127.0.0.1:{free_port()}", *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("memory-server: error:")


def test_client_key_arguments_are_checked(keys):
    with pytest.raises(ValueError, match="secret_key"):
        MemoryClient("tcp://127.0.0.1:1", server_public_key=keys / "server.key")
    with pytest.raises(ValueError, match="server_public_key"):
        MemoryClient("tcp://127.0.0.1:1", secret_key=keys / "allowed/client.key_secret")
    with pytest.raises(ValueError, match="does not belong"):
        MemoryClient("tcp://127.0.0.1:1", server_public_key=keys / "server.key",
                     secret_key=keys / "allowed/client.key_secret",
                     public_key=keys / "stranger.key")


def test_an_inline_key_needs_its_prefix_so_a_mistyped_path_is_not_taken_for_one(keys):
    """A 40-character string that names no file used to be taken as an inline key, and the
    mistake showed only as a handshake that never completed."""
    from memory_server.auth import load_key

    public = (keys / "server.key").read_text().split('public-key = "')[1][:40]
    assert load_key(f"z85:{public}", "public key") == public.encode()
    assert load_key(public.encode(), "public key") == public.encode()
    mistyped = "keys/server.key" + "x" * 25  # 40 characters, no such file
    with pytest.raises(ValueError, match="cannot read key file.*written z85:KEY"):
        load_key(mistyped, "public key")
