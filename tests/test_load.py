"""A bounded load run (the small version of ``bench/load.py``): concurrent clients sending mixed
add/search/clear to two servers lose no request and leave exactly the expected entries."""

import pytest

from bench.load import LAYERS, run_load
from memory_server import MemoryClient

pytestmark = pytest.mark.timeout(180)

CLIENTS, REQUESTS = 8, 150


def test_concurrent_mixed_load_loses_nothing(memory_server):
    servers = memory_server(2)
    endpoints = [s.endpoint for s in servers]
    result = run_load(endpoints, CLIENTS, REQUESTS, seed=3, timeout=60)
    assert result.answered == CLIENTS * REQUESTS
    assert len(result.expected) == CLIENTS * 2 * LAYERS
    assert result.found == result.expected
    assert any(result.expected.values())  # not everything was cleared at the end

    # Each client's two rows live on different servers: every request reached both, once.
    with MemoryClient(endpoints, timeout=10) as client:
        stats = client.stats()
    for op, sent in (("add", len(result.latencies["add"])),
                     ("clear", len(result.latencies["clear"])),
                     ("search", len(result.latencies["search"]) + CLIENTS * LAYERS)):
        assert [s["requests"][op]["count"] for s in stats] == [sent, sent], op
        assert [s["requests"][op]["errors"] for s in stats] == [0, 0], op
    assert sum(s["entries"] for s in stats) == sum(result.expected.values())
