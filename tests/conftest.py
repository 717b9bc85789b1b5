import pytest

from servers import ServerProcess, start_servers


@pytest.fixture
def memory_server():
    """Factory: ``memory_server(count=1, *flags, port=None)`` starts real servers and returns them;
    at teardown every one still running is stopped with SIGTERM and must exit 0."""
    started: list[ServerProcess] = []

    def start(count: int = 1, *flags: str, port: int | None = None) -> list[ServerProcess]:
        servers = start_servers(count, *flags, port=port)
        started.extend(servers)
        return servers

    yield start
    codes = {s.endpoint: s.stop() for s in started if s.proc.poll() is None}
    for s in started:
        s.log.close()
    assert all(code == 0 for code in codes.values()), f"servers exited uncleanly: {codes}"
