"""Start and stop `memory-server` processes on this host (for the trainer, benchmarks and tests).

Each server binds a free loopback port, is ready once it answers ``ping`` (never a fixed sleep), and
is stopped with SIGTERM (a clean shutdown), then SIGKILL if it does not exit in time.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .client import MemoryClient
from .errors import ServerUnavailable

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """One `memory-server` child process and its captured output."""

    endpoint: str
    proc: subprocess.Popen
    log: tempfile.SpooledTemporaryFile = field(repr=False)

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code of the
        SIGTERM shutdown, or None when it had to be killed."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)

    def wait_ready(self, timeout: float = READY_TIMEOUT, **client_options) -> None:
        """Ping until the server answers; raise with its output if it exits or time runs out.

        ``client_options`` go to the pinging ``MemoryClient`` (CURVE keys for a CURVE server).
        """
        deadline = time.monotonic() + timeout
        # Unanswered pings are expected while the server starts: keep the client's reconnect
        # warnings out of the user's log meanwhile.
        client_log = logging.getLogger("memory_server.client")
        level = client_log.level
        client_log.setLevel(logging.ERROR)
        try:
            self._ping_until(deadline, timeout, client_options)
        finally:
            client_log.setLevel(level)

    def _ping_until(self, deadline: float, timeout: float, client_options: dict) -> None:
        with MemoryClient(self.endpoint, timeout=0.5, **client_options) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"memory-server on {self.endpoint} exited with code "
                                       f"{self.proc.returncode}:\n{self.output()}")
                try:
                    client.ping()
                    return
                except ServerUnavailable:
                    continue
        self.kill()
        raise TimeoutError(f"memory-server on {self.endpoint} did not answer a ping within "
                           f"{timeout} s:\n{self.output()}")


def launch(*flags: str, port: int | None = None, host: str = "127.0.0.1",
           prefix: tuple[str, ...] = (), log_path=None) -> ServerProcess:
    """Start a server on ``host:port`` (a free port by default) without waiting for it.

    ``host`` must include loopback (it is reached on 127.0.0.1). ``prefix`` goes before the
    command, e.g. ``("taskset", "-c", "0")`` to pin it to a core. Its output goes to
    ``log_path`` (appended) or to a temporary file.
    """
    port = port or free_port()
    log = open(log_path, "a+b") if log_path is not None else tempfile.TemporaryFile()
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "memory_server", "--bind",
                             f"tcp://{host}:{port}", *flags],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return ServerProcess(f"tcp://127.0.0.1:{port}", proc, log)


def start_servers(count: int, *flags: str, prefix: tuple[str, ...] = (),
                  timeout: float = READY_TIMEOUT) -> list[ServerProcess]:
    """Start ``count`` servers at once and wait until all answer; on failure none is left running."""
    servers = [launch(*flags, prefix=prefix) for _ in range(count)]
    try:
        for server in servers:
            server.wait_ready(timeout)
    except BaseException:
        for server in servers:
            server.kill()
        raise
    return servers
