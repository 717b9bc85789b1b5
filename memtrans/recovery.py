"""What the trainer does when a memory server fails mid-run (``--on-memory-failure``).

A failure is a ``ServerUnavailable`` (no answer within ``--memory-timeout``) or an
``UnknownNamespace`` (the server came back without the run's memories). The policies:

- ``stop``: end the run with one message naming the endpoint; the last checkpoint is kept.
- ``skip``: redo the failed part (a segment, an evaluation) without memory: from empty memories
  that nothing is added to, the same as ``--memory off`` for that part. It is logged and counted.
  The servers are tried again right away and at every later step, so memory comes back as soon
  as a server answers again (restored from the last snapshot, or empty if there is none yet).
- ``wait``: wait up to ``--memory-wait-timeout`` for every server to answer, restore the last
  snapshot (the last checkpoint's) on each server that lost the run's namespace, and redo the
  failed part with memory.

Either way a recovered server holds the memories of the last checkpoint, not those of the moment
it died: what was added since is gone, and rows that started a new document since are cleared
again so they do not see their previous document. The adds of a failed segment that reached
servers still alive are not taken back, so a redone segment may add some keys twice there.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from memory_server import ServerUnavailable, UnknownNamespace
from memory_server.client import MemoryClient

from .memory import KNNMemoryList

POLICIES = ("stop", "skip", "wait")
FAILURES = (ServerUnavailable, UnknownNamespace)
PING_TIMEOUT = 1.0
"""Seconds one ping may take while looking for servers that came back."""


class MemoryFailure(Exception):
    """The run must end: the policy is ``stop``, or a server did not come back in time."""


@dataclass(slots=True)
class MemoryRecovery:
    """Applies the policy for one rank; ``memories`` are the remote memories the rank uses."""

    policy: str
    wait_timeout: float
    memories: list[KNNMemoryList]
    rank: int = 0
    snapshot: tuple[str, str] | None = None
    """(namespace, tag) of the last checkpoint's snapshot, restored into servers that lost it."""
    skipped: int = 0
    """Failures this rank went on from without memory (segments, evaluations, lost adds)."""
    on_failure: Callable[[dict], None] = lambda record: None
    """Receives a log record for each failure."""
    _reset_rows: set[int] = field(default_factory=set)

    def note_resets(self, rows: list[int]) -> None:
        """Rows that started a new document since the last snapshot (cleared after a restore)."""
        self._reset_rows.update(rows)

    def snapshot_taken(self, namespace: str, tag: str) -> None:
        self.snapshot = (namespace, tag)
        self._reset_rows.clear()

    def run(self, step: int, what: str, attempt: Callable[[bool], object]):
        """``attempt(True)`` with memory; on a failure, per the policy: raise ``MemoryFailure``,
        ``attempt(False)`` without memory (skip), or recover and ``attempt(True)`` again (wait)."""
        while True:
            try:
                return attempt(True)
            except FAILURES as exc:
                if not self.handle(exc, step, what):
                    return attempt(False)

    def handle(self, exc: Exception, step: int, what: str) -> bool:
        """Apply the policy to a failure; True when memory is back (wait), False to go on
        without it (skip); raises ``MemoryFailure`` for stop or a server that stays away."""
        self._drop_pending_adds()
        message = str(exc)
        if self.policy == "stop":
            raise MemoryFailure(f"memory server failure at step {step} ({what}): {message}. "
                                f"--on-memory-failure stop ends the run; the last checkpoint is "
                                f"kept (continue it with --resume), or pass --on-memory-failure "
                                f"skip or wait")
        print(f"memtrans-train: rank {self.rank}: memory server failure at step {step} ({what}): "
              f"{message}; policy {self.policy}", file=sys.stderr, flush=True)
        self.on_failure({"kind": "memory_failure", "step": step, "rank": self.rank, "what": what,
                         "policy": self.policy, "error": message})
        if self.policy == "skip":
            self.skipped += 1
            self.reattach(wait=False)
            return False
        self.reattach(wait=True)
        return True

    def reattach(self, *, wait: bool) -> bool:
        """Restore the snapshot on servers that lost the namespace and reopen every namespace;
        with ``wait``, until every server answers or ``wait_timeout`` passes."""
        servers = self.memories[0].backend.client.servers
        deadline = time.monotonic() + (self.wait_timeout if wait else 0)
        while True:
            silent = _silent(servers)
            if not silent:
                break
            if time.monotonic() >= deadline:
                if wait:
                    raise MemoryFailure(
                        f"memory server {', '.join(silent)} did not come back within "
                        f"{self.wait_timeout:g} s (--memory-wait-timeout); the last checkpoint "
                        f"is kept (continue it with --resume)")
                return False
            time.sleep(PING_TIMEOUT)
        try:
            for memories in self.memories:
                backend = memories.backend
                if self.snapshot is not None and backend.namespace == self.snapshot[0]:
                    backend.client.restore(*self.snapshot, if_missing=True)
                backend.client.open(backend.namespace, backend.config)
            if self._reset_rows:
                self.memories[0].clear_memory(sorted(self._reset_rows))
        except FAILURES as exc:
            if wait:
                raise MemoryFailure(f"memory servers answered but could not be restored: "
                                    f"{exc}") from None
            return False
        logging.getLogger("memtrans.train").info("memory servers reattached")
        return True

    def _drop_pending_adds(self) -> None:
        """Collect the adds under way (some failed with the server) so they raise no more."""
        for memories in self.memories:
            for memory in memories:
                try:
                    memory.collect_adds()
                except FAILURES:
                    pass


def _silent(servers: tuple[str, ...]) -> list[str]:
    """The servers that do not answer a ping within ``PING_TIMEOUT`` (asked all at once)."""
    client_log = logging.getLogger("memory_server.client")
    level = client_log.level
    client_log.setLevel(logging.ERROR)  # no reconnect warning per silent ping
    clients = [MemoryClient(server, timeout=PING_TIMEOUT) for server in servers]
    try:
        pings = [client.ping_async() for client in clients]
        return [server for server, ping in zip(servers, pings) if ping.exception() is not None]
    finally:
        for client in clients:
            client.close()
        client_log.setLevel(level)
