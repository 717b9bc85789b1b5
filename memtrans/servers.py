"""The trainer's own `memory-server` processes: started on free loopback ports when no servers are
named, supervised, and stopped at exit (also on Ctrl-C, SIGTERM or an error).

Each server writes its snapshots to ``<out>/memory`` (its shard's file names differ, see
``memory_server.client.shard_tag``) and its log to ``<out>/memory-server-<i>.log``. With
``supervise``, a thread restarts a server that dies, on the same port, with ``--restore`` of the
newest snapshot the trainer reported (``snapshot_taken``), so a run under ``--on-memory-failure
wait`` or ``skip`` finds its memories again as of its last checkpoint.

The servers admit only the trainer: each start makes a random token for tenant ``trainer``, in a
private temporary file (``token_file``, mode 0600, removed at exit) that the servers read
(``--token-file``) and the trainer's clients too (``$MEMTRANS_TOKEN_FILE``). Other local users
get ``Unauthorized``. Snapshots are named by the tenant, not the token, so a resumed run's new
token still reaches the snapshots of the last one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from memory_server import local, tenants
from memory_server.client import shard_tag
from memory_server.snapshot import snapshot_path

START_TIMEOUT = 30.0
"""Seconds a server has to answer its first ping."""
STOP_TIMEOUT = 10.0
"""Seconds a server has to exit after SIGTERM before it is killed."""
SUPERVISE_INTERVAL = 0.2
"""Seconds between the supervisor's looks at its servers."""

TENANT = "trainer"
"""The tenant name of the trainer on its own servers: its namespaces are ``trainer.*`` there."""

log = logging.getLogger("memtrans.servers")


class ServerStartError(Exception):
    """A local memory server exited or stayed silent at start; the message says which and why."""


class LocalServers:
    """``count`` local memory servers; a context manager whose ``endpoints`` answer pings."""

    def __init__(self, count: int, out: Path, *, supervise: bool = False):
        self.count = count
        self.out = out
        self.data_dir = out / "memory"
        self.supervise = supervise
        self.ports = [local.free_port() for _ in range(count)]
        self.endpoints = [f"tcp://127.0.0.1:{port}" for port in self.ports]
        self.restarts = 0
        self._threads = max(1, (os.cpu_count() or 1) // count)
        self._servers: list[local.ServerProcess | None] = [None] * count
        self._snapshot: tuple[str, str] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._token_dir = Path(tempfile.mkdtemp(prefix="memtrans-token-"))  # mode 0700
        self.token_file = self._token_dir / f"{TENANT}.token"
        """The token of the trainer (tenant ``TENANT``), for its clients."""
        self.token = tenants.write_token_file(self.token_file, TENANT)

    def __enter__(self) -> LocalServers:
        try:
            for i in range(self.count):
                self._servers[i] = self._launch(i)
            for i in range(self.count):
                self._wait_ready(i)
        except BaseException:
            self._stop_all()
            raise
        if self.supervise:
            self._supervisor = threading.Thread(target=self._watch, name="memory-supervisor",
                                                daemon=True)
            self._supervisor.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_all()

    def snapshot_taken(self, namespace: str, tag: str) -> None:
        """The snapshot a restarted server loads (``tag`` as given to ``MemoryClient.snapshot``)."""
        with self._lock:
            self._snapshot = (namespace, tag)

    def _launch(self, i: int) -> local.ServerProcess:
        flags = ["--threads", str(self._threads), "--log-level", "WARNING",
                 "--data-dir", str(self.data_dir), "--token-file", str(self.token_file)]
        if self._snapshot is not None:
            namespace, tag = self._snapshot
            namespace, tag = tenants.qualify(TENANT, namespace), shard_tag(tag, i, self.count)
            if snapshot_path(self.data_dir, namespace, tag).exists():
                flags += ["--restore", f"{namespace}:{tag}"]
        # Its own session (local.launch): a Ctrl-C reaches the trainer only, which drops its
        # memories first and then stops the servers.
        return local.launch(*flags, port=self.ports[i], log_path=self._log_path(i))

    def _log_path(self, i: int) -> Path:
        return self.out / f"memory-server-{i}.log"

    def _wait_ready(self, i: int) -> None:
        try:
            self._servers[i].wait_ready(START_TIMEOUT, token=self.token)
        except (RuntimeError, TimeoutError) as exc:
            first_line = str(exc).splitlines()[0]
            raise ServerStartError(f"the local {first_line} (log: {self._log_path(i)})") from None

    def _watch(self) -> None:
        while not self._stopping.wait(SUPERVISE_INTERVAL):
            for i, server in enumerate(self._servers):
                if server.proc.poll() is None:
                    continue
                with self._lock:
                    if self._stopping.is_set():
                        return
                    log.warning("memory server %s exited with code %s; restarting it%s",
                                self.endpoints[i], server.proc.returncode,
                                f" from snapshot {self._snapshot[1]}" if self._snapshot else "")
                    server.log.close()
                    self._servers[i] = self._launch(i)
                    self.restarts += 1
                try:
                    self._wait_ready(i)
                except ServerStartError as exc:  # tried again at the next look
                    log.error("%s", exc)

    def _stop_all(self) -> None:
        with self._lock:
            self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        for server in self._servers:
            if server is not None:
                server.stop(STOP_TIMEOUT)
                server.log.close()
        shutil.rmtree(self._token_dir, ignore_errors=True)
