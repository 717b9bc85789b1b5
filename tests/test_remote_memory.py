"""RemoteKNNMemory: the same results as the in-process memory, through real memory servers."""

import pytest
import torch

from memory_server import InvalidRequest, MemoryClient
from memtrans import MemorizingTransformer, RemoteKNNMemory
from memtrans.memory import KNNMemoryList

DIM, ROWS = 16, 5


def steps(seed=0, count=6):
    g = torch.Generator().manual_seed(seed)
    for _ in range(count):
        keys = torch.nn.functional.normalize(torch.randn(ROWS, 40, DIM, generator=g), dim=-1)
        yield torch.stack((keys, torch.randn(ROWS, 40, DIM, generator=g)), dim=-2), \
            torch.randn(ROWS, 3, 7, DIM, generator=g)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_bit_identical_to_in_process(memory_server, count):
    servers = memory_server(count)
    local = KNNMemoryList.create_memories(batch_size=ROWS, num_memory_layers=2)(
        dim=DIM, max_memories=100)
    remote = RemoteKNNMemory.create([s.endpoint for s in servers], dim=DIM, max_memories=100,
                                    batch_size=ROWS, num_layers=2, timeout=20)
    try:
        for i, (kv, queries) in enumerate(steps()):
            for memories in (local, remote):
                memories[i % 2].add(kv)
                if i == 3:
                    memories.clear_memory([1, 4], memory_indices=[0])
            for layer in (0, 1):
                a_kv, a_mask = local[layer].search(queries, 9)
                b_kv, b_mask = remote[layer].search(queries, 9)
                assert torch.equal(a_kv, b_kv) and torch.equal(a_mask, b_mask)
        with local.at_batch_indices([3, 0]), remote.at_batch_indices([3, 0]):
            a_kv, a_mask = local[0].search(queries[:2], 4)
            b_kv, b_mask = remote[0].search(queries[:2], 4)
        assert torch.equal(a_kv, b_kv) and torch.equal(a_mask, b_mask)
    finally:
        local.cleanup()
        remote.cleanup()


def test_model_logits_identical_with_remote_memory(memory_server, monkeypatch):
    servers = memory_server(2)
    torch.manual_seed(0)
    model = MemorizingTransformer(num_tokens=64, dim=32, dim_head=8, heads=2, depth=3,
                                  memorizing_layers=(2, 3), max_knn_memories=48,
                                  num_retrieved_memories=4, xl_max_memories=8).eval()
    local = model.create_knn_memories(batch_size=3)
    monkeypatch.setenv("MEMTRANS_SERVERS", ",".join(s.endpoint for s in servers))
    remote = model.create_knn_memories(batch_size=3)  # selected by the environment variable
    assert isinstance(remote[0], RemoteKNNMemory)
    xl_a = xl_b = None
    try:
        with torch.no_grad():
            for _ in range(5):  # past capacity: eviction on both sides
                x = torch.randint(0, 64, (3, 16))
                a, xl_a = model(x, knn_memories=local, xl_memories=xl_a)
                b, xl_b = model(x, knn_memories=remote, xl_memories=xl_b)
                assert torch.equal(a, b)
    finally:
        local.cleanup()
        remote.cleanup()


def test_ranks_use_global_rows(memory_server):
    (server,) = memory_server(1)
    first = RemoteKNNMemory.create([server.endpoint], dim=DIM, max_memories=10, batch_size=2,
                                   namespace="run", rank=0, world_size=2, timeout=20)
    second = RemoteKNNMemory.create([server.endpoint], dim=DIM, max_memories=10, batch_size=2,
                                    namespace="run", rank=1, world_size=2, timeout=20)
    try:
        second[0].add(torch.randn(2, 3, 2, DIM))
        second.collect_adds()
        with MemoryClient(server.endpoint, timeout=20) as client:
            assert client.stats()[0]["per_namespace"]["run"]["rows"] == [2, 3]
        assert not first[0].search(torch.randn(2, 1, DIM), 2)[1].any()
        assert second[0].search(torch.randn(2, 1, DIM), 2)[1].all()
    finally:
        second.cleanup()
        first.cleanup()


def test_remote_add_error_surfaces_at_next_search(memory_server):
    (server,) = memory_server(1)
    memories = RemoteKNNMemory.create([server.endpoint], dim=4, max_memories=10, batch_size=1,
                                      timeout=20)
    try:
        memories[0].add(torch.full((1, 2, 2, 4), float("inf")))
        with pytest.raises(InvalidRequest, match="NaN or Inf"):
            memories[0].search(torch.randn(1, 2, 4), 2)
    finally:
        memories.cleanup()


def test_remote_memory_is_not_constructed_directly():
    with pytest.raises(TypeError, match="create_knn_memories"):
        RemoteKNNMemory(dim=4)


def test_curve_keys_from_the_environment(tmp_path, monkeypatch):
    from memory_server.cli import main as server_cli
    from servers import launch

    for name in ("server", "client"):
        assert server_cli(["keygen", "--out", str(tmp_path), "--name", name]) == 0
    allow = tmp_path / "allowed"
    allow.mkdir()
    (allow / "client.key").write_bytes((tmp_path / "client.key").read_bytes())
    server = launch("--curve-secret-key", str(tmp_path / "server.key_secret"),
                    "--curve-allow", str(allow))
    try:
        server.wait_ready(server_public_key=tmp_path / "server.key",
                          secret_key=tmp_path / "client.key_secret")
        monkeypatch.setenv("MEMTRANS_SERVER_KEY", str(tmp_path / "server.key"))
        monkeypatch.setenv("MEMTRANS_CLIENT_KEY", str(tmp_path / "client.key_secret"))
        memories = RemoteKNNMemory.create([server.endpoint], dim=4, max_memories=8,
                                          batch_size=1, timeout=10)
        try:
            memories[0].add(torch.randn(1, 3, 2, 4))
            assert memories[0].search(torch.randn(1, 2, 4), 2)[1].all()
        finally:
            memories.cleanup()
    finally:
        assert server.stop() == 0


def test_float16_wire_values_give_the_same_logits_within_tolerance(memory_server):
    exact, half = memory_server(1), memory_server(1, "--wire-dtype", "float16")
    torch.manual_seed(0)
    model = MemorizingTransformer(num_tokens=64, dim=32, dim_head=8, heads=2, depth=2,
                                  memorizing_layers=(2,), max_knn_memories=64,
                                  num_retrieved_memories=4).eval()
    memories = [model.create_knn_memories(batch_size=2, servers=[s[0].endpoint])
                for s in (exact, half)]
    try:
        with torch.no_grad():
            for _ in range(3):
                x = torch.randint(0, 64, (2, 16))
                a, b = (model(x, knn_memories=m) for m in memories)
        retrieval = memories[1][0].retrieved(memories[1][0].search_async(torch.randn(2, 3, 8), 4))
        assert retrieval.values.dtype == torch.float16 and retrieval.keys.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
        assert not torch.equal(a, b)
    finally:
        for m in memories:
            m.cleanup()
