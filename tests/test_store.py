"""MemoryStore: exact retrieval, true FIFO eviction, row isolation, limits and argument errors."""

import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from memory_server import store as store_module
from memory_server import (ConfigMismatch, InvalidRequest, LimitExceeded, MemoryStore,
                           NamespaceConfig, UnknownNamespace)


def unit(rng, *shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_store(index="flat", max_memories=64, rows=3, layers=2, dim=16, ivf=None,
               **store_kwargs):
    """``ivf``: the namespace's ``nlist`` and ``nprobe`` (default: derived from max_memories)."""
    store = MemoryStore(**store_kwargs)
    store.open("ns", NamespaceConfig(dim=dim, max_memories=max_memories, num_layers=layers,
                                     num_rows=rows, index=index, **(ivf or {})))
    return store


def ivf_of(store, layer=0, row=0):
    return store._namespaces["ns"].memories[(layer, row)].index


def tagged_values(row, seqs, dim):
    """Values that name their row and sequence number, to check what comes back."""
    values = np.zeros((len(seqs), dim), np.float32)
    values[:, 0] = row
    values[:, 1] = seqs
    return values


def fill(store, rng, rows, steps, n, dim=16, layer=0):
    keys_per_row = {r: [] for r in rows}
    for step in range(steps):
        keys = unit(rng, len(rows), n, dim)
        seqs = np.arange(step * n, (step + 1) * n)
        values = np.stack([tagged_values(r, seqs, dim) for r in rows])
        store.add("ns", layer, np.array(rows), keys, values)
        for i, r in enumerate(rows):
            keys_per_row[r].append(keys[i])
    return {r: np.concatenate(k) for r, k in keys_per_row.items()}


def test_flat_search_equals_brute_force_after_many_wraps():
    rng = np.random.default_rng(0)
    store = make_store(max_memories=64)
    history = fill(store, rng, [0, 1, 2], steps=23, n=29)  # 667 entries: ten wraps of the ring
    queries = unit(rng, 3, 40, 16)
    kv, mask = store.search("ns", 0, np.arange(3), queries, 10).dense()
    assert mask.all()
    for r in range(3):
        live = history[r][-64:]
        order = np.argsort(-(queries[r] @ live.T), axis=1, kind="stable")[:, :10]
        np.testing.assert_array_equal(kv[r, :, :, 0], live[order])
        first_live_seq = history[r].shape[0] - 64
        np.testing.assert_array_equal(kv[r, :, :, 1, 1], first_live_seq + order)
        assert (kv[r, :, :, 1, 0] == r).all()


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivf"])
def test_fifo_every_live_entry_is_found_and_no_evicted_one(index):
    rng = np.random.default_rng(1)
    store = make_store(index=index, max_memories=100, rows=2)
    history = fill(store, rng, [0, 1], steps=17, n=37)
    total = history[0].shape[0]
    for r in range(2):
        live = history[r][-100:]
        kv, mask = store.search("ns", 0, np.array([r]), live[None], 5).dense()
        assert mask.all()
        seqs = kv[0, :, :, 1, 1]
        assert (seqs >= total - 100).all(), "an evicted entry was returned"
        # A unit key's best inner-product match is itself.
        np.testing.assert_array_equal(seqs[:, 0], np.arange(total - 100, total))


def test_hnsw_recall_against_flat_above_floor():
    rng = np.random.default_rng(2)
    keys = unit(rng, 1, 8192, 32)
    queries = unit(rng, 1, 256, 32)
    found = {}
    for index in ("flat", "hnsw"):
        store = make_store(index=index, max_memories=8192, rows=1, dim=32)
        store.add("ns", 0, np.array([0]), keys, keys)
        kv, _ = store.search("ns", 0, np.array([0]), queries, 32).dense()
        found[index] = kv[0, :, :, 0]
    # Compare as sets of vectors per query: recall@32 of hnsw against the exact answer.
    exact = {tuple(q.tobytes() for q in row) for row in found["flat"]}
    hits = sum(len(set(a.tobytes() for a in h) & set(b.tobytes() for b in f))
               for h, f in zip(found["hnsw"], found["flat"]))
    recall = hits / (256 * 32)
    assert exact and recall >= 0.9, f"hnsw recall@32 {recall:.3f} below the 0.9 floor"


def test_clear_isolates_rows_and_memory_works_after_clear():
    rng = np.random.default_rng(3)
    store = make_store()
    fill(store, rng, [0, 1, 2], steps=3, n=10)
    store.clear("ns", [1])
    queries = unit(rng, 3, 4, 16)
    kv, mask = store.search("ns", 0, np.arange(3), queries, 5).dense()
    assert mask[0].all() and mask[2].all() and not mask[1].any()
    assert (kv[1] == 0).all()
    assert (kv[0, ..., 1, 0] == 0).all() and (kv[2, ..., 1, 0] == 2).all()
    # The seed's index stayed "untrained" after a reset and found nothing again.
    store.add("ns", 0, np.array([1]), unit(rng, 1, 3, 16), tagged_values(1, [0, 1, 2], 16)[None])
    _, mask = store.search("ns", 0, np.array([1]), queries[1:2], 5).dense()
    assert mask[0, :, :3].all() and not mask[0, :, 3:].any()


def test_clear_one_layer_leaves_the_other():
    rng = np.random.default_rng(4)
    store = make_store()
    fill(store, rng, [0], steps=1, n=8, layer=0)
    fill(store, rng, [0], steps=1, n=8, layer=1)
    store.clear("ns", [0], layers=[0])
    q = unit(rng, 1, 2, 16)
    assert not store.search("ns", 0, np.array([0]), q, 3).mask.any()
    assert store.search("ns", 1, np.array([0]), q, 3).mask.all()


def test_add_longer_than_capacity_keeps_the_newest():
    rng = np.random.default_rng(5)
    store = make_store(max_memories=64, rows=1)
    keys = unit(rng, 1, 150, 16)
    store.add("ns", 0, np.array([0]), keys, tagged_values(0, np.arange(150), 16)[None])
    kv, mask = store.search("ns", 0, np.array([0]), keys[:, -64:], 1).dense()
    np.testing.assert_array_equal(kv[0, :, 0, 1, 1], np.arange(86, 150))


def test_retrieval_is_compact():
    rng = np.random.default_rng(6)
    store = make_store(max_memories=64, rows=2)
    fill(store, rng, [0, 1], steps=2, n=32)
    retrieval = store.search("ns", 0, np.arange(2), unit(rng, 2, 500, 16), 16)
    assert retrieval.keys.shape[0] <= 1 + 2 * 64
    assert retrieval.positions.dtype == np.int32
    assert (retrieval.keys[0] == 0).all()


def test_float16_values():
    store = MemoryStore()
    store.open("ns", NamespaceConfig(dim=4, max_memories=8, num_layers=1, num_rows=1,
                                     value_dtype="float16"))
    keys = np.eye(4, dtype=np.float32)[None]
    store.add("ns", 0, np.array([0]), keys, keys * 0.5)
    kv, _ = store.search("ns", 0, np.array([0]), keys, 1).dense()
    assert kv.dtype == np.float32
    np.testing.assert_array_equal(kv[0, :, 0, 1], np.eye(4) * 0.5)


@pytest.mark.parametrize("call, match", [
    (lambda s, q: s.add("ns", 0, np.array([0]), q[:, :, :8], q[:, :, :8]), r"keys must have shape \(1, \*, 16\)"),
    (lambda s, q: s.add("ns", 0, np.array([0]), q * np.nan, q), "NaN or Inf"),
    (lambda s, q: s.search("ns", 0, np.array([0]), q * np.inf, 2), "NaN or Inf"),
    (lambda s, q: s.search("ns", 0, np.array([3]), q, 2), r"rows must be in \[0, num_rows=3\)"),
    (lambda s, q: s.search("ns", 2, np.array([0]), q, 2), r"layer must be an integer in \[0, 2\)"),
    (lambda s, q: s.search("ns", 0, np.array([0]), q, 0), r"k must be an integer in \[1, 64\]"),
    (lambda s, q: s.search("ns", 0, np.array([0]), q, 65), "k must be"),
    (lambda s, q: s.add("ns", 0, np.array([0, 0]), np.repeat(q, 2, 0), np.repeat(q, 2, 0)), "distinct"),
    (lambda s, q: s.search("ns", 0, np.array([0]), q.astype(np.float64), 2), "float32"),
])
def test_bad_arguments_raise_and_change_nothing(call, match):
    rng = np.random.default_rng(7)
    store = make_store()
    fill(store, rng, [0], steps=1, n=5)
    before = store.stats()
    with pytest.raises(InvalidRequest, match=match):
        call(store, unit(rng, 1, 5, 16))
    assert store.stats() == before


def test_namespace_errors_and_limits():
    # Room for two memories of 64 slots of 16 keys and values, each with its overhead.
    store = MemoryStore(max_namespaces=1, max_memories_per_namespace=4,
                        max_bytes=2 * (64 * 16 * 8 + store_module.MEMORY_BYTES))
    config = NamespaceConfig(dim=16, max_memories=64, num_layers=2, num_rows=2)
    store.open("a", config)
    store.open("a", config)  # same config again: fine
    with pytest.raises(ConfigMismatch, match="already open"):
        store.open("a", NamespaceConfig(dim=8, max_memories=64, num_layers=2, num_rows=2))
    with pytest.raises(LimitExceeded, match="max_namespaces=1"):
        store.open("b", config)
    with pytest.raises(UnknownNamespace, match="'zz'"):
        store.search("zz", 0, np.array([0]), np.zeros((1, 1, 16), np.float32), 1)
    store.drop("a")
    with pytest.raises(LimitExceeded, match="max_memories_per_namespace=4"):
        store.open("c", NamespaceConfig(dim=16, max_memories=64, num_layers=3, num_rows=2))
    store.open("d", config)
    ones = np.ones((1, 64, 16), np.float32)
    store.add("d", 0, np.array([0]), ones, ones)
    store.add("d", 1, np.array([0]), ones, ones)
    with pytest.raises(LimitExceeded, match="max_bytes"):
        store.add("d", 0, np.array([1]), ones, ones)
    assert store.stats()["entries"] == 128


def test_config_validation():
    with pytest.raises(InvalidRequest, match=re.escape("dim must be an integer in [1, 4096]")):
        NamespaceConfig(dim=0, max_memories=4, num_layers=1, num_rows=1)
    with pytest.raises(InvalidRequest, match="index must be one of"):
        NamespaceConfig(dim=4, max_memories=4, num_layers=1, num_rows=1, index="pq")
    with pytest.raises(InvalidRequest, match="unknown fields"):
        NamespaceConfig.from_dict({"dim": 4, "max_memories": 4, "num_layers": 1, "num_rows": 1,
                                   "bogus": 1})


def test_rows_in_parallel_give_the_same_result():
    queries = unit(np.random.default_rng(9), 3, 7, 16)
    results = []
    for threads in (1, 3):
        store = make_store(max_memories=50, rows=3, threads=threads)
        fill(store, np.random.default_rng(8), [0, 1, 2], steps=4, n=30)
        results.append(store.search("ns", 0, np.arange(3), queries, 4).dense())
        store.close()
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivf"])
def test_export_import_gives_identical_searches(index):
    rng = np.random.default_rng(10)
    store = make_store(index=index, max_memories=100, rows=2)
    fill(store, rng, [0, 1], steps=9, n=37)
    state = store.export_namespace("ns")
    other = MemoryStore()
    other.import_namespace("ns", state)
    queries = unit(rng, 2, 30, 16)
    for a, b in zip(store.search("ns", 0, np.arange(2), queries, 8).dense(),
                    other.search("ns", 0, np.arange(2), queries, 8).dense()):
        np.testing.assert_array_equal(a, b)
    # Both go on identically after the restore, across the next wrap.
    more = unit(rng, 2, 50, 16)
    for s in (store, other):
        s.add("ns", 0, np.arange(2), more, more)
    np.testing.assert_array_equal(store.search("ns", 0, np.arange(2), queries, 8).dense()[0],
                                  other.search("ns", 0, np.arange(2), queries, 8).dense()[0])


@pytest.mark.parametrize("total", [-1, 2**62, 2**64 - 1])
def test_import_refuses_an_entry_count_out_of_range(total):
    store = make_store(rows=1, layers=1, max_memories=8, dim=4)
    state = store.export_namespace("ns")
    keys = np.ones((8, 4), np.float32)
    state["memories"] = [{"layer": 0, "row": 0, "total": total, "keys": keys, "values": keys}]
    with pytest.raises(InvalidRequest, match=f"claims {total} entries; at most {2**62 - 1}"):
        MemoryStore().import_namespace("ns", state)


def test_clear_with_one_bad_layer_clears_nothing():
    store = make_store(rows=2, layers=2)
    fill(store, np.random.default_rng(11), [0, 1], steps=1, n=5, layer=0)
    before = store.stats()
    with pytest.raises(InvalidRequest, match="layer"):
        store.clear("ns", np.arange(2), layers=[0, 99])
    assert store.stats() == before and store.stats()["entries"] == 10


@pytest.mark.parametrize("threads", [1, 3])
def test_add_refused_by_max_bytes_writes_no_row(threads):
    """Each row alone fits; all of them do not: the add is refused whole, even with rows written
    in parallel."""
    probe = make_store(rows=3, max_memories=256)
    keys = unit(np.random.default_rng(12), 3, 256, 16)
    probe.add("ns", 0, np.arange(1), keys[:1], keys[:1])
    one_row = probe.stats()["bytes"]
    store = make_store(rows=3, max_memories=256, max_bytes=2 * one_row, threads=threads)
    with pytest.raises(LimitExceeded, match="max_bytes"):
        store.add("ns", 0, np.arange(3), keys, keys)
    stats = store.stats()
    assert (stats["entries"], stats["bytes"]) == (0, 0)
    store.add("ns", 0, np.arange(2), keys[:2], keys[:2])  # nothing was left reserved
    assert store.stats()["entries"] == 2 * 256
    store.close()


BASE = dict(dim=4, max_memories=8, num_layers=1, num_rows=1)


@pytest.mark.parametrize("changes, words", [
    ({"dim": 0}, "dim must be an integer in [1, 4096]"),
    ({"dim": 4097}, "dim must be an integer in [1, 4096]"),
    ({"max_memories": 0}, "max_memories must be an integer in [1, 16777216]"),
    ({"max_memories": 2**24 + 1}, "max_memories must be an integer in [1, 16777216]"),
    ({"num_layers": 10**15}, "num_layers must be an integer in [1, 1024]"),
    ({"num_rows": 2**20 + 1}, "num_rows must be an integer in [1, 1048576]"),
    ({"hnsw_m": 1}, "hnsw_m must be an integer in [2, 256]"),  # M=1 segfaults faiss on add
    ({"hnsw_m": 257}, "hnsw_m must be an integer in [2, 256]"),
    ({"hnsw_segments": 65}, "hnsw_segments must be an integer in [1, 64]"),
    ({"ef_search": 4097}, "ef_search must be an integer in [1, 4096]"),
    ({"ef_construction": 0}, "ef_construction must be an integer in [1, 4096]"),
    ({"ef_construction": 2**63}, "ef_construction must be an integer in [1, 4096]"),
    ({"dim": True}, "dim must be an integer"),
    ({"hnsw_m": 16.0}, "hnsw_m must be an integer"),
    ({"nlist": 2**16 + 1}, "nlist must be an integer in [0, 65536]"),
    ({"nprobe": -1}, "nprobe must be an integer in [0, 65536]"),
    ({"index": "ivf", "max_memories": 1000, "nlist": 32},
     "nlist=32 needs 1024 keys to train (32 per list), more than max_memories=1000; lower nlist "
     "to at most 31, or leave nlist 0"),
    ({"index": "ivf", "nlist": 1}, "a memory this small cannot train any list"),
    ({"index": "ivf", "max_memories": 1024, "nlist": 8, "nprobe": 9},
     "nprobe=9 is more than the 8 lists (nlist); lower nprobe or raise nlist"),
    ({"index": "ivf", "max_memories": 1024, "nprobe": 33},  # the default nlist: 32 here
     "nprobe=33 is more than the 32 lists"),
    ({"dim": 4096, "max_memories": 2**16 + 1},
     "max_memories x dim = 268439552 is over 268435456"),
    ({"num_layers": 1024, "num_rows": 1025},
     "num_layers x num_rows = 1049600 is over 1048576"),
])
def test_every_config_field_has_a_stated_range(changes, words):
    with pytest.raises(InvalidRequest, match=re.escape(words)):
        NamespaceConfig(**{**BASE, **changes})
    with pytest.raises(InvalidRequest, match=re.escape(words)):  # the path open and restore take
        NamespaceConfig.from_dict({**BASE, **changes})


def test_configs_at_the_caps_work():
    """The largest accepted values of each field open, add and search without trouble."""
    store = MemoryStore()
    for name, config in {
        "wide": dict(dim=4096, max_memories=2**16, num_layers=1, num_rows=1),
        "long": dict(dim=16, max_memories=2**24, num_layers=1, num_rows=1),
        "many": dict(dim=4, max_memories=8, num_layers=1024, num_rows=1024),
        "hnsw": dict(dim=8, max_memories=64, num_layers=1, num_rows=1, index="hnsw", hnsw_m=2,
                     hnsw_segments=64, ef_search=4096, ef_construction=4096),
        "hnsw-wide": dict(dim=8, max_memories=64, num_layers=1, num_rows=1, index="hnsw",
                          hnsw_m=256, hnsw_segments=1, ef_search=1, ef_construction=1),
        "ivf-lists": dict(dim=16, max_memories=2**21, num_layers=1, num_rows=1, index="ivf",
                          nlist=2**16, nprobe=2**16),
        "ivf-one": dict(dim=8, max_memories=32, num_layers=1, num_rows=1, index="ivf", nlist=1,
                        nprobe=1),  # trains on the 100 keys added below
    }.items():
        config = NamespaceConfig(**config)
        store.open(name, config)
        keys = unit(np.random.default_rng(13), 1, 100, config.dim)
        layer, row = config.num_layers - 1, config.num_rows - 1
        store.add(name, layer, np.array([row]), keys, keys)
        k = min(config.max_memories, 2048)
        found = store.search(name, layer, np.array([row]), keys[:, :3], k)
        assert found.positions.shape == (1, 3, k) and found.mask[0, :, 0].all(), name
        store.clear(name, np.array([row]))
        assert not store.search(name, layer, np.array([row]), keys[:, :3], 1).mask.any()


def test_k_is_capped_whatever_max_memories():
    store = make_store(max_memories=4096, rows=1)
    fill(store, np.random.default_rng(14), [0], steps=1, n=5)
    queries = unit(np.random.default_rng(15), 1, 2, 16)
    assert store.search("ns", 0, np.array([0]), queries, 2048).positions.shape == (1, 2, 2048)
    with pytest.raises(InvalidRequest, match=re.escape("k must be an integer in [1, 2048]")):
        store.search("ns", 0, np.array([0]), queries, 2049)


def test_search_over_max_search_bytes_is_refused_before_it_runs():
    store = make_store(max_memories=4096, rows=2, max_search_bytes=1 << 20)
    fill(store, np.random.default_rng(16), [0, 1], steps=1, n=5)
    queries = unit(np.random.default_rng(17), 2, 100, 16)
    store.search("ns", 0, np.arange(2), queries, 327)  # 2 x 100 x 327 x 16 bytes <= 1 MiB
    with pytest.raises(LimitExceeded, match=r"needs 1049600 bytes .*max_search_bytes=1048576 "
                                            r".*--max-message-bytes"):
        store.search("ns", 0, np.arange(2), queries, 328)


@pytest.mark.parametrize("layers, rows, words", [
    ([0, 0], [0], "layers must be distinct"),
    ([0, 1, 0], [0, 1], "layers must be distinct"),
    (None, [0, 0], "rows must be distinct"),
    (None, [3], "rows must be in [0, num_rows=3)"),
    ([1], [-1], "rows must be in [0, num_rows=3)"),
])
def test_clear_refuses_repeated_or_out_of_range_layers_and_rows(layers, rows, words):
    store = make_store(rows=3, layers=2)
    fill(store, np.random.default_rng(18), [0, 1], steps=1, n=5, layer=0)
    before = store.stats()
    with pytest.raises(InvalidRequest, match=re.escape(words)):
        store.clear("ns", np.array(rows), layers=layers)
    assert store.stats() == before


@pytest.mark.parametrize("value", [1e5, -65520.0, 3e38])
def test_float16_storage_refuses_values_it_cannot_hold(value):
    store = MemoryStore()
    store.open("ns", NamespaceConfig(dim=4, max_memories=8, num_layers=1, num_rows=2,
                                     value_dtype="float16"))
    keys = np.ones((2, 3, 4), np.float32)
    values = np.ones((2, 3, 4), np.float32)
    values[1, 2, 3] = value
    before = store.stats()
    with pytest.raises(InvalidRequest, match=re.escape("values overflow value_dtype float16 "
                                                       "(finite up to +-65504)")):
        store.add("ns", 0, np.arange(2), keys, values)
    assert store.stats() == before
    values[1, 2, 3] = 65504.0  # the largest float16 stores as is
    store.add("ns", 0, np.arange(2), keys, values)
    kv, _ = store.search("ns", 0, np.array([1]), keys[1:, :1], 3).dense()
    assert np.isfinite(kv).all() and kv[0, 0, :, 1].max() == 65504.0


# races: drop, restore, expiry and stats against adds

def _books(store: MemoryStore) -> tuple[int, int]:
    """(bytes the --max-bytes accounting holds, bytes the live memories hold): equal at rest."""
    with store._lock:
        live = sum(m.nbytes() for ns in store._namespaces.values()
                   for m in ns.memories.values())
        return store._reserved_bytes, live


@pytest.mark.parametrize("remove", ["drop", "restore", "expire"])
def test_an_add_racing_a_drop_restore_or_expiry_is_refused_and_the_books_stay_exact(
        remove, monkeypatch):
    """The namespace goes away while an add is past its reservation: the add is refused, not
    acknowledged, and the whole --max-bytes budget is free again afterwards."""
    one_memory = 64 * 16 * 8 + store_module.MEMORY_BYTES  # max_memories x dim x (4 + 4) bytes
    store = make_store(rows=2, layers=1, max_memories=64, max_bytes=2 * one_memory)
    empty = store.export_namespace("ns")
    inside, release = threading.Event(), threading.Event()
    original = store_module.Memory.add

    def held_add(memory, keys, values):  # the first write waits, after the add reserved
        if not inside.is_set():
            inside.set()
            assert release.wait(10)
        original(memory, keys, values)

    monkeypatch.setattr(store_module.Memory, "add", held_add)
    keys = unit(np.random.default_rng(19), 2, 64, 16)
    with ThreadPoolExecutor(1) as pool:
        add = pool.submit(store.add, "ns", 0, np.array([0]), keys[:1], keys[:1])
        assert inside.wait(10)
        {"drop": lambda: store.drop("ns"),
         "restore": lambda: store.import_namespace("ns", empty),
         "expire": lambda: store.expire(0)}[remove]()
        release.set()
        with pytest.raises(UnknownNamespace, match="'ns' was dropped, restored or expired "
                                                   "while this add ran"):
            add.result(timeout=10)
    assert _books(store) == (0, 0)
    if remove != "restore":
        store.open("ns", NamespaceConfig(dim=16, max_memories=64, num_layers=1, num_rows=2))
    store.add("ns", 0, np.arange(2), keys, keys)  # the whole budget
    assert _books(store) == (2 * one_memory, 2 * one_memory)


def test_a_refused_add_leaves_no_memory_behind():
    store = make_store(rows=1000, layers=1, max_memories=64, max_bytes=64 * 16 * 8)
    keys = np.ones((1000, 1, 16), np.float32)
    with pytest.raises(LimitExceeded, match="max_bytes"):
        store.add("ns", 0, np.arange(1000), keys, keys)
    stats = store.stats()
    assert (stats["memories"], stats["bytes"]) == (0, 0) and _books(store) == (0, 0)


@pytest.fixture
def fast_switching():
    """Switch threads every microsecond, so races show up in few iterations."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_stats_while_adds_create_memories(fast_switching):
    store = make_store(rows=4096, layers=1, max_memories=4, dim=4)
    keys = np.ones((8, 1, 4), np.float32)
    done = threading.Event()

    def add_rows():
        try:
            for start in range(0, 4096, 8):
                store.add("ns", 0, np.arange(start, start + 8), keys, keys)
        finally:
            done.set()

    with ThreadPoolExecutor(1) as pool:
        adds = pool.submit(add_rows)
        for _ in range(100_000):  # bounded; stops when the adds are done
            if done.is_set():
                break
            store.stats()
        adds.result(timeout=60)
    assert store.stats()["memories"] == 4096


def test_threads_hammering_a_store_keep_the_books_exact(fast_switching):
    """Adds, clears, drops, opens, restores, expiries and stats from six threads at once (seeded,
    bounded): only the errors these races call for, and afterwards the --max-bytes accounting
    equals the bytes the live memories hold."""
    config = NamespaceConfig(dim=8, max_memories=32, num_layers=2, num_rows=8)
    names = ["a", "b", "c"]
    one_memory = 32 * 8 * 8
    store = MemoryStore(threads=2, max_bytes=24 * one_memory)
    source = MemoryStore()
    source.open("x", config)
    full = np.ones((8, 32, 8), np.float32)
    source.add("x", 1, np.arange(8), full, full)
    state = source.export_namespace("x")
    for name in names:
        store.open(name, config)

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(300):
            name = names[rng.integers(len(names))]
            rows = rng.permutation(8)[: rng.integers(1, 9)]
            layer, op = int(rng.integers(2)), rng.random()
            try:
                if op < 0.5:
                    keys = rng.standard_normal((len(rows), int(rng.integers(1, 40)), 8),
                                               dtype=np.float32)
                    store.add(name, layer, rows, keys, keys)
                elif op < 0.6:
                    store.clear(name, rows, [layer])
                elif op < 0.7:
                    store.drop(name)
                elif op < 0.8:
                    store.open(name, config)
                elif op < 0.86:
                    store.import_namespace(name, state)
                elif op < 0.9:
                    store.expire(0.001)
                else:
                    store.stats()
            except UnknownNamespace:  # dropped, restored or expired by another thread
                assert op < 0.7
            except LimitExceeded:  # the budget is shared by all threads
                assert op < 0.5 or 0.8 <= op < 0.86

    with ThreadPoolExecutor(6) as pool:
        for future in [pool.submit(hammer, seed) for seed in range(6)]:
            future.result(timeout=120)
    reserved, live = _books(store)
    assert reserved == live
    for name in store.namespaces():
        store.drop(name)
    assert _books(store) == (0, 0)
    store.close()


def test_an_hnsw_search_counts_the_lists_of_its_segments():
    """512 queries x k=64 are 512 KiB of neighbours: within 1 MiB for flat, but an HNSW search
    also holds each of its 5 segment graphs' lists while it merges them (5 MiB more)."""
    queries = unit(np.random.default_rng(23), 1, 512, 16)
    for index, fits in (("flat", True), ("hnsw", False)):
        store = make_store(index, max_memories=256, rows=1, layers=1,
                           max_search_bytes=1 << 20)
        store.add("ns", 0, np.arange(1), queries[:, :256], queries[:, :256])
        if fits:
            assert store.search("ns", 0, np.arange(1), queries, 64).mask.all()
        else:
            with pytest.raises(LimitExceeded, match="32 a neighbour and segment graph"):
                store.search("ns", 0, np.arange(1), queries, 64)
        store.close()


# ivf


def test_ivf_is_exact_before_it_trains():
    rng = np.random.default_rng(20)
    keys, queries = unit(rng, 2, 2000, 16), unit(rng, 2, 50, 16)
    ivf = dict(nlist=64, nprobe=1)  # trains at 64 x 32 = 2048 entries
    found = []
    for index in ("flat", "ivf"):
        store = make_store(index=index, max_memories=4096, rows=2, layers=1,
                           ivf=ivf if index == "ivf" else None)
        store.add("ns", 0, np.arange(2), keys, keys)
        found.append(store.search("ns", 0, np.arange(2), queries, 32).dense())
    assert not ivf_of(store).trained
    np.testing.assert_array_equal(found[0][0], found[1][0])
    np.testing.assert_array_equal(found[0][1], found[1][1])


def clustered(rng, n, dim, centres):
    """Unit keys around ``centres`` random directions, as a model's keys are (not uniform)."""
    x = centres[rng.integers(len(centres), size=n)] + 0.1 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_ivf_recall_after_training_on_clustered_keys():
    rng = np.random.default_rng(21)
    centres = unit(rng, 256, 32).astype(np.float64)
    keys, queries = clustered(rng, 8192, 32, centres), clustered(rng, 256, 32, centres)
    found = {}
    for index in ("flat", "ivf"):  # ivf defaults here: 256 lists, nprobe 24
        store = make_store(index=index, max_memories=8192, rows=1, layers=1, dim=32)
        for start in range(0, 8192, 512):
            store.add("ns", 0, np.array([0]), keys[None, start : start + 512],
                      tagged_values(0, np.arange(start, start + 512), 32)[None])
        kv, mask = store.search("ns", 0, np.array([0]), queries[None], 32).dense()
        found[index] = np.where(mask[0], kv[0, :, :, 1, 1], -1)
    assert ivf_of(store).trained and (ivf_of(store).nlist, ivf_of(store).nprobe) == (256, 24)
    hits = sum(len(np.intersect1d(a[a >= 0], b)) for a, b in zip(found["ivf"], found["flat"]))
    recall = hits / found["flat"].size
    assert recall >= 0.9, f"ivf recall@32 {recall:.3f} below the 0.9 floor"


def test_ivf_never_returns_an_overwritten_entry():
    """Each add overwrites the oldest slots; searching for the keys it overwrote (their best
    match, were they still listed) finds only live entries, before and after the retraining
    that comes when the ring has turned over."""
    rng = np.random.default_rng(22)
    store = make_store(index="ivf", max_memories=512, rows=1, layers=1,
                       ivf=dict(nlist=16, nprobe=4))
    history = np.empty((0, 16), np.float32)
    trainings = set()
    for step in range(40):  # 40 x 100 entries: about 8 turns of the ring
        keys = unit(rng, 1, 100, 16)
        seqs = np.arange(step * 100, (step + 1) * 100)
        store.add("ns", 0, np.array([0]), keys, tagged_values(0, seqs, 16)[None])
        history = np.concatenate([history, keys[0]])
        total = history.shape[0]
        index = ivf_of(store)
        if index.trained:
            trainings.add(index.trained_at)
        evicted = history[max(0, total - 612) : max(0, total - 512)]
        live = history[-512:]
        for queries in (evicted, live):
            if len(queries) == 0:
                continue
            kv, mask = store.search("ns", 0, np.array([0]), queries[None], 8).dense()
            seqs_found = kv[0, :, :, 1, 1][mask[0]]
            assert (seqs_found >= total - 512).all(), f"an evicted entry was returned at {total}"
        # A live key's best match is itself: its own list is the first one probed.
        np.testing.assert_array_equal(kv[0, :, 0, 1, 1], np.arange(total - len(live), total))
    # Trained by the add that filled the ring (600 entries), then by the first add after each turn.
    assert trainings == {600, 1200, 1800, 2400, 3000, 3600}


def test_ivf_export_import_resumes_exactly_across_retraining():
    rng = np.random.default_rng(23)
    store = make_store(index="ivf", max_memories=1024, rows=2, layers=1,
                       ivf=dict(nlist=16, nprobe=2))
    fill(store, rng, [0, 1], steps=9, n=150)  # trained at 600 and 1200 (doubled), ring wrapped
    state = store.export_namespace("ns")
    assert state["memories"][0]["trained_at"] == 1200
    other = MemoryStore()
    other.import_namespace("ns", state)
    queries = unit(rng, 2, 60, 16)
    for step in range(8):  # the next training comes at 2224 = 1200 + 1024
        a = store.search("ns", 0, np.arange(2), queries, 8).dense()
        b = other.search("ns", 0, np.arange(2), queries, 8).dense()
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        more = unit(rng, 2, 150, 16)
        for s in (store, other):
            s.add("ns", 0, np.arange(2), more, more)
    assert ivf_of(store).trained_at == ivf_of(other).trained_at == 2250


def test_import_refuses_centroids_that_do_not_fit():
    store = make_store(index="ivf", max_memories=256, rows=1, layers=1, ivf=dict(nlist=4))
    fill(store, np.random.default_rng(24), [0], steps=2, n=100)
    state = store.export_namespace("ns")
    good = state["memories"][0]
    for change, words in [({"centroids": good["centroids"][:3]}, "centroids of shape (3, 16)"),
                          ({"trained_at": 10**6}, "trained at entry 1000000, not in [1, 200]")]:
        state["memories"] = [{**good, **change}]
        with pytest.raises(InvalidRequest, match=re.escape(words)):
            MemoryStore().import_namespace("ns", state)


# compressed keys (key_dtype float16)


def test_float16_keys_flat_is_exact_for_the_stored_keys(monkeypatch):
    """Flat search over float16 keys, converted a few keys at a time (a tiny CONVERT_BYTES: many
    blocks, and blocks smaller than k), finds the top-k of a float32 search of the rounded keys."""
    from memory_server import index as index_module

    monkeypatch.setattr(index_module, "CONVERT_BYTES", 4 * 16 * 50)  # 50 keys a block
    rng = np.random.default_rng(30)
    store = MemoryStore()
    store.open("ns", NamespaceConfig(dim=16, max_memories=700, num_layers=1, num_rows=2,
                                     key_dtype="float16"))
    keys = unit(rng, 2, 1000, 16)  # the ring wraps
    store.add("ns", 0, np.arange(2), keys[:, :600], keys[:, :600])
    store.add("ns", 0, np.arange(2), keys[:, 600:], keys[:, 600:])
    queries = unit(rng, 2, 80, 16)
    found = store.search("ns", 0, np.arange(2), queries, 64)
    assert found.keys.dtype == np.float16
    kv, mask = found.dense()
    assert mask.all()
    for row in range(2):
        stored = keys[row, -700:].astype(np.float16).astype(np.float64)
        exact = np.sort(queries[row] @ stored.T, axis=1)[:, ::-1][:, :64]
        got = np.einsum("qd,qkd->qk", queries[row], kv[row, :, :, 0].astype(np.float64))
        np.testing.assert_allclose(got, exact, atol=1e-5)  # the same entries, best first
        np.testing.assert_array_equal(kv[row, :, :, 0], kv[row, :, :, 1].astype(np.float16))


def test_float16_keys_ivf_recall_with_rescoring_on_clustered_keys():
    """8-bit lists and exact rescoring: recall@32 against exact search of the stored keys, and
    the neighbours best first by their exact scores."""
    rng = np.random.default_rng(31)
    centres = unit(rng, 256, 32).astype(np.float64)
    keys, queries = clustered(rng, 8192, 32, centres), clustered(rng, 256, 32, centres)
    store = MemoryStore()
    store.open("ns", NamespaceConfig(dim=32, max_memories=8192, num_layers=1, num_rows=1,
                                     index="ivf", key_dtype="float16"))
    for start in range(0, 8192, 512):
        store.add("ns", 0, np.array([0]), keys[None, start : start + 512],
                  tagged_values(0, np.arange(start, start + 512), 32)[None])
    index = ivf_of(store)
    assert index.trained and index.compressed and index.state()[0].shape == (256 + 2, 32)
    kv, mask = store.search("ns", 0, np.array([0]), queries[None], 32).dense()
    assert mask.all()
    stored = keys.astype(np.float16).astype(np.float64)
    exact = np.argsort(-(queries @ stored.T), axis=1, kind="stable")[:, :32]
    found = kv[0, :, :, 1, 1].astype(np.int64)
    recall = sum(len(np.intersect1d(a, b)) for a, b in zip(found, exact)) / exact.size
    assert recall >= 0.9, f"compressed ivf recall@32 {recall:.3f} below the 0.9 floor"
    scores = np.einsum("qd,qkd->qk", queries, stored[found])
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # ordered by exact scores
    np.testing.assert_allclose(kv[0, :, :, 0], stored[found], atol=0)  # keys as stored


def test_float16_keys_ivf_never_returns_an_overwritten_entry_and_resumes_exactly():
    rng = np.random.default_rng(32)
    store = MemoryStore()
    config = NamespaceConfig(dim=16, max_memories=512, num_layers=1, num_rows=1, index="ivf",
                             key_dtype="float16", nlist=16, nprobe=4)
    store.open("ns", config)
    history = np.empty((0, 16), np.float32)
    for step in range(14):  # about 3 turns of the ring, retrained after each
        keys = unit(rng, 1, 100, 16)
        store.add("ns", 0, np.array([0]), keys,
                  tagged_values(0, np.arange(step * 100, (step + 1) * 100), 16)[None])
        history = np.concatenate([history, keys[0]])
        total = history.shape[0]
        kv, mask = store.search("ns", 0, np.array([0]), history[None, -612:], 8).dense()
        assert (kv[0, :, :, 1, 1][mask[0]] >= total - 512).all()
    other = MemoryStore()
    other.import_namespace("ns", store.export_namespace("ns"))
    queries = unit(rng, 1, 60, 16)
    for _ in range(4):
        a = store.search("ns", 0, np.array([0]), queries, 8)
        b = other.search("ns", 0, np.array([0]), queries, 8)
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.positions, b.positions)
        more = unit(rng, 1, 150, 16)
        for s in (store, other):
            s.add("ns", 0, np.array([0]), more, more)
    assert ivf_of(store).trained_at == ivf_of(other).trained_at


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_float16_keys_refuse_keys_they_cannot_hold(index):
    store = MemoryStore()
    store.open("ns", NamespaceConfig(dim=4, max_memories=64, num_layers=1, num_rows=2,
                                     index=index, key_dtype="float16"))
    keys = np.ones((2, 3, 4), np.float32)
    keys[1, 2, 3] = -7e4
    before = store.stats()
    with pytest.raises(InvalidRequest, match=re.escape("keys overflow key_dtype float16 "
                                                       "(finite up to +-65504)")):
        store.add("ns", 0, np.arange(2), keys, keys * 0)
    assert store.stats() == before
    keys[1, 2, 3] = -65504.0
    store.add("ns", 0, np.arange(2), keys, keys * 0)
    kv, _ = store.search("ns", 0, np.array([1]), keys[1:, 2:], 1).dense()
    assert kv[0, 0, 0, 0, 3] == -65504.0


def test_key_dtype_is_validated_and_a_float32_config_reads_as_before():
    with pytest.raises(InvalidRequest, match=re.escape(
            "key_dtype must be one of ('float32', 'float16'), got 'int8'")):
        NamespaceConfig.from_dict({**BASE, "key_dtype": "int8"})
    assert "key_dtype" not in NamespaceConfig(**BASE).to_dict()  # older servers take it
    half = NamespaceConfig(**BASE, key_dtype="float16")
    assert NamespaceConfig.from_dict(half.to_dict()) == half


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_float16_keys_take_fewer_bytes_on_the_books(index):
    """What --max-bytes counts per slot: half the keys' bytes, and for ivf 8-bit list codes."""
    sizes = {}
    for key_dtype in ("float32", "float16"):
        memory = store_module.Memory(NamespaceConfig(dim=64, max_memories=4096, num_layers=1,
                                                     num_rows=1, index=index, key_dtype=key_dtype))
        sizes[key_dtype] = memory.bytes_per_slot
    lists = (4 * 64 + 8) * 3 // 2 - (64 + 8) * 3 // 2  # a list's code: 64 bytes, not 256
    assert sizes["float32"] - sizes["float16"] == 2 * 64 + (lists if index == "ivf" else 0)
