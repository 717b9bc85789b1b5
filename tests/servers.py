"""Real `memory-server` processes for tests, on top of ``memory_server.local``: two threads each
unless told otherwise, and a stop that fails the test when SIGTERM is ignored."""

from __future__ import annotations

from pathlib import Path

from memory_server import local
from memory_server.local import ServerProcess, free_port

__all__ = ["ServerProcess", "free_port", "launch", "launch_tenants", "peak_over", "start_servers",
           "wait_ready"]

TEST_FLAGS = ("--threads", "2")


def _flags(flags: tuple[str, ...]) -> tuple[str, ...]:
    return flags if "--threads" in flags else (*TEST_FLAGS, *flags)


def launch(*flags: str, port: int | None = None, host: str = "127.0.0.1") -> ServerProcess:
    """Start a server without waiting for it (see ``wait_ready``)."""
    return local.launch(*_flags(flags), port=port, host=host)


def launch_tenants(token_dir: Path, root_token: str, *flags: str) -> ServerProcess:
    """Start a server with the tenants file and admin token in ``token_dir`` and wait until it
    answers the admin; stop it if it does not."""
    server = launch("--token-file", str(token_dir / "tenants"), "--admin-token-file",
                    str(token_dir / "root.token"), *flags)
    try:
        server.wait_ready(token=root_token)
    except BaseException:
        server.kill()
        raise
    return server


def wait_ready(server: ServerProcess, timeout: float = local.READY_TIMEOUT) -> None:
    server.wait_ready(timeout)


def start_servers(count: int = 1, *flags: str, port: int | None = None) -> list[ServerProcess]:
    """Start ``count`` servers at once and wait until all are ready."""
    if port is None:
        return local.start_servers(count, *_flags(flags))
    if count != 1:
        raise ValueError("a fixed port needs count=1")
    server = launch(*flags, port=port)
    try:
        server.wait_ready()
    except BaseException:
        server.kill()
        raise
    return [server]


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_over(pid: int, step) -> int:
    """How far above its resident memory before ``step()`` process ``pid``'s peak went during
    it (the kernel's high-water mark, reset first)."""
    before = _status(pid, "VmRSS")
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    step()
    return _status(pid, "VmHWM") - before
