"""Real `memory-server` processes for tests: start on a free loopback port, wait until they answer
a ping, stop with SIGTERM (asserting a clean exit) or kill."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field

from memory_server import ServerUnavailable
from memory_server.client import MemoryClient

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


@dataclass
class ServerProcess:
    port: int
    proc: subprocess.Popen
    log: typing.IO[bytes] = field(repr=False)

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the SIGTERM exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{self.endpoint} ignored SIGTERM for {STOP_TIMEOUT} s; "
                                     f"killed. Log:\n{self.output()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*flags: str, port: int | None = None, host: str = "127.0.0.1") -> ServerProcess:
    """Start a server without waiting for it (see ``wait_ready``); ``--threads 2`` unless given.
    It binds ``host`` (which must include loopback) and is reached on 127.0.0.1."""
    port = port or free_port()
    if "--threads" not in flags:
        flags = ("--threads", "2", *flags)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "memory_server", "--bind", f"tcp://{host}:{port}", *flags],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return ServerProcess(port, proc, log)


def wait_ready(server: ServerProcess, timeout: float = READY_TIMEOUT) -> None:
    """Ping until the server answers; raise with its log if it exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    with MemoryClient(server.endpoint, timeout=0.5) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"memory-server on {server.endpoint} exited with "
                                   f"{server.proc.returncode}:\n{server.output()}")
            try:
                client.ping()
                return
            except ServerUnavailable:
                continue
    server.kill()
    raise TimeoutError(f"memory-server on {server.endpoint} did not answer a ping within "
                       f"{timeout} s:\n{server.output()}")


def start_servers(count: int = 1, *flags: str, port: int | None = None) -> list[ServerProcess]:
    """Start ``count`` servers at once and wait until all are ready."""
    if port is not None and count != 1:
        raise ValueError("a fixed port needs count=1")
    servers = [launch(*flags, port=port) for _ in range(count)]
    try:
        for server in servers:
            wait_ready(server)
    except BaseException:
        for server in servers:
            server.kill()
        raise
    return servers
