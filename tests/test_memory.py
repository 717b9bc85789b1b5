"""KNNMemory / KNNMemoryList: the seed's API with its memory bugs fixed."""

import pytest
import torch

from memory_server import InvalidRequest
from memtrans import KNNMemory, KNNMemoryList


def tagged(batch, n, dim, start):
    """Unit keys whose values carry (sequence number, a function of the key) to check pairing."""
    keys = torch.nn.functional.normalize(torch.randn(batch, n, dim), dim=-1)
    values = torch.zeros(batch, n, dim)
    values[..., 0] = torch.arange(start, start + n, dtype=torch.float32)
    values[..., 1:] = keys[..., 1:] * 3
    return torch.stack((keys, values), dim=-2)


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivf"])
def test_key_value_pairs_stay_matched_after_wrapping(index):
    # The seed never gave faiss the ids: after the first wrap 0% of its pairs were right.
    torch.manual_seed(0)
    memory = KNNMemory(dim=16, max_memories=1600, num_indices=2, index=index)
    added = [tagged(2, 512, 16, 512 * step) for step in range(7)]
    for chunk in added:
        memory.add(chunk)
    kv, mask = memory.search(torch.randn(2, 64, 16), topk=32)
    assert mask.all()
    keys, values = kv[..., 0, :], kv[..., 1, :]
    torch.testing.assert_close(values[..., 1:], keys[..., 1:] * 3)
    assert (values[..., 0] >= 7 * 512 - 1600).all(), "evicted entries came back"


def test_capacity_keeps_the_newest_not_nothing():
    # The seed dropped its whole index when it reached capacity.
    memory = KNNMemory(dim=8, max_memories=1000, num_indices=1)
    chunks = [tagged(1, 512, 8, 512 * i) for i in range(3)]
    for chunk in chunks:
        memory.add(chunk)
    newest = torch.cat(chunks, dim=1)[:, -1000:, 0]
    kv, mask = memory.search(newest, topk=1)
    assert mask.all()
    torch.testing.assert_close(kv[0, :, 0, 1, 0], torch.arange(536, 1536, dtype=torch.float32))


def test_hnsw_ef_search_is_used():
    # The seed searched at faiss's default efSearch=16; recall here must beat a low setting.
    torch.manual_seed(1)
    keys = torch.nn.functional.normalize(torch.randn(1, 8192, 32), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(1, 256, 32), dim=-1)
    found = {}
    for name, kwargs in [("flat", {}), ("low", dict(index="hnsw", ef_search=1)),
                         ("high", dict(index="hnsw", ef_search=256))]:
        memory = KNNMemory(dim=32, max_memories=8192, num_indices=1, **kwargs)
        memory.add(torch.stack((keys, keys), dim=-2))
        found[name] = memory.search(queries, topk=4)[0][0, :, :, 0]

    def recall(name):
        same = (found[name][:, :, None, :] == found["flat"][:, None, :, :]).all(-1).any(-1)
        return same.float().mean().item()

    assert recall("high") >= 0.95 and recall("high") > recall("low") + 0.02, (recall("high"), recall("low"))


def test_add_error_surfaces_at_the_next_search():
    memory = KNNMemory(dim=4, max_memories=16, num_indices=1)
    memory.add(torch.full((1, 3, 2, 4), float("nan")))
    with pytest.raises(InvalidRequest, match="NaN or Inf"):
        memory.search(torch.randn(1, 2, 4), topk=2)
    _, mask = memory.search(torch.randn(1, 2, 4), topk=2)
    assert not mask.any(), "the failed add must not have written anything"


def test_errors_name_what_was_expected():
    memory = KNNMemory(dim=4, max_memories=16, num_indices=2)
    with pytest.raises(ValueError, match=r"queries must have shape \(2, \.\.\., 4\)"):
        memory.search(torch.randn(3, 2, 4), topk=2)
    with pytest.raises(ValueError, match=r"topk must be an integer in \[1, max_memories=16\]"):
        memory.search(torch.randn(2, 2, 4), topk=17)
    with pytest.raises(ValueError, match="nprobe applies to IVF"):
        memory.search(torch.randn(2, 2, 4), topk=2, nprobe=8)
    with pytest.raises(ValueError, match=r"batch index must be in \[0, 2\)"):
        memory.set_scoped_indices([0, 5])
    with pytest.raises(ValueError, match=r"batch indices must be in \[0, 2\)"):
        memory.clear([2])


def test_memory_list_clear_and_scoping():
    memories = KNNMemoryList.create_memories(batch_size=3, num_memory_layers=2)(dim=4,
                                                                                 max_memories=8)
    for memory in memories:
        memory.add(tagged(3, 5, 4, 0))
    memories.clear_memory([1], memory_indices=[0])
    q = torch.randn(3, 2, 4)
    assert memories[0].search(q, 3)[1].any(-1).any(-1).tolist() == [True, False, True]
    assert memories[1].search(q, 3)[1].all()
    with memories.at_batch_indices([2]):
        assert memories[0].search(q[:1], 3)[1].all()
    assert memories[0].scoped_indices == [0, 1, 2]
    memories.cleanup()
