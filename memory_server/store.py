"""MemoryStore: the key/value memories of every namespace, each a ring buffer with an index.

The in-process memory (``memtrans.KNNMemory``) and the memory server both use this class, so the
two paths give the same results by construction. It is torch-free and thread-safe: operations on
different memories run in parallel (faiss releases the GIL), operations on one memory are serialised
by its lock, and the rows of one call are spread over ``threads`` worker threads.

The ``max_bytes`` books are kept per namespace under the store's lock: an add reserves its growth
before it writes, or creates any memory, and settles the difference after, and dropping, restoring
over or expiring a namespace takes its bytes off the books at once and marks it retired, so an add
still running in it neither counts against the budget afterwards nor is acknowledged. A restore
books what the snapshot describes before its arrays are read (``book_restore``). A memory
counts its slots (keys, values and what its index keeps per entry) and a fixed overhead
(``memory_overhead``: its objects, and HNSW's graphs), so an add naming many new rows is refused
before it allocates them.

Quotas (``quotas``, the server's tenants): the namespaces named ``PREFIX.*`` may hold at most
``quotas[PREFIX]`` bytes together, booked like ``max_bytes`` and refused with ``QuotaExceeded``,
so one group of namespaces cannot take all of ``max_bytes`` from the others.

A memory is ``(namespace, layer, row)``. It keeps the newest ``max_memories`` entries it was given
(true FIFO, however many times the ring wraps) and is created by the first ``add`` that names it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields

import faiss
import numpy as np

from .errors import ConfigMismatch, InvalidRequest, LimitExceeded, QuotaExceeded, UnknownNamespace
from .index import (INDEX_KINDS, IVF_RESCORE, IVF_TRAIN_PER_LIST, FlatIndex, HNSWIndex,
                    IVFIndex, hnsw_segment_size, ivf_nlist, ivf_nprobe, release_freed_heap,
                    ring_size)

VALUE_DTYPES = {"float32": np.float32, "float16": np.float16}
KEY_DTYPES = VALUE_DTYPES
"""How a namespace's ring stores keys (``key_dtype``) and values (``value_dtype``)."""

# Every integer field of a NamespaceConfig has a range, checked before any faiss call, so no
# client (by open or by a snapshot it restores) can crash the server or make it loop for ever.
MAX_DIM = 4096
MAX_MEMORIES = 1 << 24
MAX_LAYERS = 1024
MAX_ROWS = 1 << 20
CONFIG_RANGES = {
    "dim": (1, MAX_DIM),
    "max_memories": (1, MAX_MEMORIES),
    "num_layers": (1, MAX_LAYERS),
    "num_rows": (1, MAX_ROWS),
    "hnsw_m": (2, 256),  # faiss's HNSW segfaults on the first add with M=1 (its 1/log M is inf)
    "hnsw_segments": (1, 64),  # a search runs and merges one HNSW search per segment
    "ef_search": (1, 4096),
    "ef_construction": (1, 4096),
    "nlist": (0, 1 << 16),  # 0: derived from max_memories; at most max_memories / 32 (below)
    "nprobe": (0, 1 << 16),  # 0: derived from nlist; at most nlist (below)
}
"""Field -> (min, max), both included."""
MAX_MEMORY_FLOATS = 1 << 28
"""Cap on ``max_memories * dim``: one full memory holds at most 1 GiB of float32 keys."""
MAX_NAMESPACE_MEMORIES = 1 << 20
"""Cap on ``num_layers * num_rows``, the memories one namespace may have (and one ``clear`` of
every layer visits)."""
MAX_K = 2048
"""Cap on ``k`` of a search, whatever ``max_memories``: a reply holds rows x queries x k
positions."""
MAX_TOTAL = 1 << 62
"""Entries a memory may have been given since its last clear (its sequence numbers are int64);
a restored snapshot claiming more is refused."""
SEARCH_SLOT_BYTES = 16
"""What a search allocates per neighbour (row x query x k): faiss's float32 score and int64 id,
and the reply's int32 position."""
HNSW_MERGE_SLOT_BYTES = 32
"""What an HNSW search holds per neighbour and segment graph of each row it searches at once:
every graph's scores and slots (12), their concatenation (12) and its argsort (8)."""
RESCORE_SLOT_BYTES = 32
"""What a compressed-key ``ivf`` search holds per candidate (``IVF_RESCORE`` per neighbour) of
each row it searches at once: faiss's score and id (12), the exact score, its negation and
their argsort (16), with room to spare."""
MEMORY_BYTES = 2048
"""What ``max_bytes`` counts for a memory besides its slots: the Python objects, numpy arrays,
lock and index object of an empty memory and its entry in the namespace (0.8 KB flat, 1.1 KB
hnsw, measured with 50,000 memories), with room to spare."""
HNSW_GRAPH_BYTES = 8192
"""What ``max_bytes`` counts for each HNSW segment graph besides its entries (6.5 KB measured for a
graph of one entry): a memory counts all ``hnsw_segments + 1`` of them from its creation."""


def memory_overhead(config: NamespaceConfig) -> int:
    """Bytes a memory of ``config`` is counted for besides its slots."""
    graphs = config.hnsw_segments + 1 if config.index == "hnsw" else 0
    return MEMORY_BYTES + graphs * HNSW_GRAPH_BYTES


@dataclass(frozen=True, kw_only=True, slots=True)
class NamespaceConfig:
    """What a client declares for its namespace; every memory in it is shaped by this."""

    dim: int
    """Key and value width (the model's ``dim_head``)."""
    max_memories: int
    """Live entries per memory; older ones are evicted first in, first out."""
    num_layers: int
    """Memorizing layers: valid layer numbers are ``0..num_layers-1``."""
    num_rows: int
    """Global batch rows: valid rows are ``0..num_rows-1``."""
    index: str = "flat"
    """``flat`` (exact inner product, the paper's choice), ``ivf`` (approximate, inverted file:
    the fast one at full memories, README) or ``hnsw`` (approximate, slower than ``flat`` here)."""
    value_dtype: str = "float32"
    """How values are stored: ``float32`` or ``float16``."""
    key_dtype: str = "float32"
    """How keys are stored: ``float32``, or ``float16`` (compressed keys: half the ring's key
    bytes, searched in float32, exact for ``flat``; an ``ivf`` index keeps 8-bit codes in its
    lists and rescores its candidates exactly; ``index.IVF_RESCORE``). Search replies carry
    keys in this dtype."""
    hnsw_m: int = 32
    """HNSW graph degree."""
    hnsw_segments: int = 4
    """HNSW eviction granularity: the ring is cut into this many graphs (plus one spare)."""
    ef_search: int = 128
    """HNSW search breadth (raised to k when k is larger); recall grows with it."""
    ef_construction: int = 64
    """HNSW build breadth."""
    nlist: int = 0
    """IVF inverted lists; 0 picks about 4 sqrt(max_memories), max_memories / 64 beyond 64K
    (``index.ivf_nlist``). The index trains once a memory holds ``IVF_TRAIN_PER_LIST`` (32) keys
    per list; it is exact before."""
    nprobe: int = 0
    """IVF lists a query scans; 0 picks one from nlist (``index.ivf_nprobe``: 12 of 512, 8 of
    1,024, 20 of 4,096). Recall and search time grow with it."""

    def __post_init__(self):
        for name, (lo, hi) in CONFIG_RANGES.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise InvalidRequest(f"namespace config: {name} must be an integer in "
                                     f"[{lo}, {hi}], got {value!r:.100}")
        for a, b, cap, what in (("max_memories", "dim", MAX_MEMORY_FLOATS,
                                 "1 GiB of float32 keys per memory"),
                                ("num_layers", "num_rows", MAX_NAMESPACE_MEMORIES,
                                 "memories per namespace")):
            product = getattr(self, a) * getattr(self, b)
            if product > cap:
                raise InvalidRequest(f"namespace config: {a} x {b} = {product} is over {cap} "
                                     f"({what}); lower {a} or {b}")
        if self.index not in INDEX_KINDS:
            raise InvalidRequest(f"namespace config: index must be one of {INDEX_KINDS}, "
                                 f"got {self.index!r}")
        if self.index == "ivf":
            nlist = ivf_nlist(self.max_memories, self.nlist)
            most = self.max_memories // IVF_TRAIN_PER_LIST
            if self.nlist > most:
                fix = (f"lower nlist to at most {most}" if most else
                       "a memory this small cannot train any list (it would stay exact): use "
                       "index flat")
                raise InvalidRequest(
                    f"namespace config: nlist={nlist} needs {nlist * IVF_TRAIN_PER_LIST} keys to "
                    f"train ({IVF_TRAIN_PER_LIST} per list), more than max_memories="
                    f"{self.max_memories}; {fix}, or leave nlist 0 (the default)")
            if self.nprobe > nlist:
                raise InvalidRequest(f"namespace config: nprobe={self.nprobe} is more than the "
                                     f"{nlist} lists (nlist); lower nprobe or raise nlist")
        for name, dtypes in (("value_dtype", VALUE_DTYPES), ("key_dtype", KEY_DTYPES)):
            if getattr(self, name) not in dtypes:
                raise InvalidRequest(f"namespace config: {name} must be one of "
                                     f"{tuple(dtypes)}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: dict) -> NamespaceConfig:
        if not isinstance(data, dict):
            raise InvalidRequest(f"namespace config must be a map, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise InvalidRequest(f"namespace config: unknown fields {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise InvalidRequest(f"namespace config: {exc}") from None

    def to_dict(self) -> dict:
        """The fields as a map; ``key_dtype`` only when not float32, so a float32-key config
        reads as before on older servers and in older snapshot readers."""
        data = asdict(self)
        if data["key_dtype"] == "float32":
            del data["key_dtype"]
        return data


class Memory:
    """One ring buffer of keys and values with its index; entry ``seq`` lives in slot ``seq % ring``."""

    def __init__(self, config: NamespaceConfig):
        self.config = config
        self.ring = ring_size(config.index, config.max_memories, config.hnsw_segments)
        self.keys = np.empty((0, config.dim), dtype=KEY_DTYPES[config.key_dtype])
        self.values = np.empty((0, config.dim), dtype=VALUE_DTYPES[config.value_dtype])
        self.total = 0
        self.lock = threading.Lock()
        self.overhead = memory_overhead(config)
        if config.index == "flat":
            self.index = FlatIndex(self.ring)
        elif config.index == "ivf":
            nlist = ivf_nlist(config.max_memories, config.nlist)
            self.index = IVFIndex(config.dim, self.ring, nlist, ivf_nprobe(nlist, config.nprobe),
                                  compressed=config.key_dtype != "float32")
        else:
            self.index = HNSWIndex(config.dim, self.ring,
                                   hnsw_segment_size(config.max_memories, config.hnsw_segments),
                                   config.hnsw_m, config.ef_search, config.ef_construction)

    @property
    def live(self) -> int:
        return min(self.total, self.config.max_memories)

    @property
    def bytes_per_slot(self) -> int:
        return self.config.dim * (self.keys.itemsize + self.values.itemsize) \
            + self.index.bytes_per_entry

    def nbytes(self) -> int:
        """Bytes this memory accounts for: its allocated slots, what its index keeps per slot, and
        its fixed overhead."""
        return self.keys.shape[0] * self.bytes_per_slot + self.overhead

    def growth_bytes(self, n: int) -> int:
        """Bytes the memory must allocate before it can take ``n`` more entries."""
        total = self.total
        if n >= self.config.max_memories:  # add() starts afresh with the newest max_memories
            total, n = 0, self.config.max_memories
        return (self._capacity_for(n, total) - self.keys.shape[0]) * self.bytes_per_slot

    def _capacity_for(self, n: int, total: int) -> int:
        have = self.keys.shape[0]
        need = min(self.ring, total + n)
        if need <= have:
            return have
        # Grow geometrically so a memory that fills in small adds does not copy itself each time.
        return min(self.ring, max(need, 2 * have, 256))

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        if keys.shape[0] >= self.config.max_memories:
            # Only the newest max_memories can be live: start afresh with exactly those.
            keys, values = keys[-self.config.max_memories :], values[-self.config.max_memories :]
            self.clear()
        keys = keys.astype(self.keys.dtype, copy=False)  # the index sees the stored keys
        n = keys.shape[0]
        capacity = self._capacity_for(n, self.total)
        if capacity > self.keys.shape[0]:
            outgrown = self.keys.nbytes + self.values.nbytes
            self.keys = _grown(self.keys, capacity)
            self.values = _grown(self.values, capacity)
            if outgrown >= 1 << 20:  # glibc would keep it; small ones it reuses anyway
                release_freed_heap()
        slots = (self.total + np.arange(n)) % self.ring
        self.keys[slots] = keys
        self.values[slots] = values
        self.index.write(self.total, keys, self.keys)
        self.total += n

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Ring slots of the top-``k`` live entries per query, best first; -1 where none."""
        if self.total == 0:
            return np.full((queries.shape[0], k), -1, dtype=np.int64)
        lo = max(0, self.total - self.config.max_memories)
        return self.index.search(self.keys, queries, k, lo, self.total)

    def clear(self) -> None:
        self.total = 0
        self.index.reset()

    def export(self) -> dict:
        """The allocated ring and the entry count: everything that defines this memory; for a
        trained ``ivf`` index also its ``centroids`` and the count they were ``trained_at``."""
        state = {"total": self.total, "keys": self.keys.copy(), "values": self.values.copy()}
        if isinstance(self.index, IVFIndex) and self.index.trained:
            state["centroids"], state["trained_at"] = self.index.state()
        return state

    def load(self, keys: np.ndarray, values: np.ndarray, total: int,
             centroids: np.ndarray | None = None, trained_at: int = 0) -> None:
        """Take an exported ring as it was, slot for slot, and rebuild the index from it."""
        self.keys, self.values, self.total = keys, values, total
        self.index.reset()
        if centroids is not None:  # a trained ivf index: the same centroids, the same lists
            self.index.restore(centroids, trained_at, keys, total)
            return
        # Re-index in write order from the start of the segment holding the oldest live entry:
        # exactly what the index held (the flat index holds nothing of its own).
        lo = max(0, total - self.config.max_memories)
        first = lo - (lo % self.ring) % getattr(self.index, "segment", self.ring)
        if total > first:
            self.index.write(first, keys[np.arange(first, total) % self.ring], keys)


def _index_state(item: dict, config: NamespaceConfig, memory: Memory, namespace: str) -> tuple:
    """The checked ``(centroids, trained_at)`` of an exported memory, or ``()`` when it has none."""
    if item.get("centroids") is None:
        return ()
    where = f"memory (layer {item['layer']}, row {item['row']}) of namespace {namespace!r}"
    if config.index != "ivf":
        raise InvalidRequest(f"{where} has ivf centroids but the namespace's index is "
                             f"{config.index!r}")
    centroids = np.asarray(item["centroids"], dtype=np.float32)
    trained_at = item.get("trained_at")
    rows = memory.index.state_rows  # with compressed keys, the 8-bit ranges too
    if centroids.shape != (rows, config.dim) or not np.isfinite(centroids).all():
        raise InvalidRequest(f"{where} has centroids of shape {centroids.shape}, expected "
                             f"{(rows, config.dim)} finite values")
    if not isinstance(trained_at, (int, np.integer)) or isinstance(trained_at, bool) \
            or not 0 < trained_at <= int(item["total"]):
        raise InvalidRequest(f"{where} claims its centroids were trained at entry "
                             f"{trained_at!r:.50}, not in [1, {int(item['total'])}]")
    return centroids, int(trained_at)


def _grown(array: np.ndarray, capacity: int) -> np.ndarray:
    grown = np.empty((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown


@dataclass(frozen=True, slots=True)
class Retrieval:
    """Search results in compact form.

    ``keys[0]`` and ``values[0]`` are zeros and stand for "no memory"; the other entries are the
    distinct key/values retrieved, and ``positions[b, q, j]`` indexes them for the j-th neighbour of
    query q of row b (0 where the memory had fewer than k live entries). Many queries retrieve the
    same entries, so this is far smaller than the dense ``(b, q, k, 2, d)`` tensor. ``keys`` and
    ``values`` are as stored: in the namespace's ``key_dtype`` and ``value_dtype``.
    """

    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        return self.positions > 0

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """The seed's form: key/values ``(b, q, k, 2, d)`` float32 (zeros where masked) and mask."""
        kv = np.stack((self.keys.astype(np.float32, copy=False),
                       self.values.astype(np.float32, copy=False)), axis=1)
        return kv[self.positions], self.mask


@dataclass(slots=True)
class _Namespace:
    config: NamespaceConfig
    memories: dict[tuple[int, int], Memory]
    """Added to only under the store's lock."""
    last_used: float
    group: str | None = None
    """The prefix whose quota it counts against (None: no quota)."""
    bytes: int = 0
    """What the books hold for it: its memories' bytes plus what adds under way reserved."""
    retired: bool = False
    """Dropped, restored over or expired: its bytes are off the books."""


class MemoryStore:
    """All namespaces of one process. See the module docstring for the model of memories.

    With ``threads > 1`` the rows of a call are searched on that many threads, each running faiss
    with one OpenMP thread: row threads and OpenMP threads at once oversubscribe the cores (a 64K
    flat search of 8 rows took 5.2 s that way on 2 cores, 3.0 s with rows in parallel). With
    ``threads=1`` rows go one after another and faiss parallelises each search itself.

    ``max_search_bytes`` refuses, before anything is allocated, a search of more neighbours
    (rows x queries x k) than it holds at ``SEARCH_SLOT_BYTES`` each, and for HNSW the merge of
    the segments' lists (``HNSW_MERGE_SLOT_BYTES``); the server passes its message size limit.
    """

    def __init__(self, *, threads: int = 1, max_bytes: int | None = None,
                 max_namespaces: int | None = None, max_memories_per_namespace: int | None = None,
                 max_search_bytes: int | None = None, quotas: dict[str, int] | None = None):
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.max_bytes = max_bytes
        self.max_search_bytes = max_search_bytes
        self._row_threads = threads
        self.max_namespaces = max_namespaces
        self.max_memories_per_namespace = max_memories_per_namespace
        self._namespaces: dict[str, _Namespace] = {}
        self._lock = threading.Lock()
        self._reserved_bytes = 0
        self.quotas = dict(quotas or {})
        self._group_bytes: dict[str, int] = {}
        # The OpenMP thread count is per calling thread: set it in each row thread.
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="memstore",
                                        initializer=faiss.omp_set_num_threads,
                                        initargs=(1,)) if threads > 1 else None

    def close(self, wait: bool = True) -> None:
        """Stop the row threads; ``wait=False`` leaves rows still running to finish unjoined."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=not wait)

    # namespaces

    def open(self, namespace: str, config: NamespaceConfig) -> None:
        """Declare a namespace; opening it again with the same config is a no-op."""
        _check_namespace_name(namespace)
        cells = config.num_layers * config.num_rows
        if self.max_memories_per_namespace is not None and cells > self.max_memories_per_namespace:
            raise LimitExceeded(
                f"namespace {namespace!r} declares {config.num_layers} layers x {config.num_rows} "
                f"rows = {cells} memories, over the limit max_memories_per_namespace="
                f"{self.max_memories_per_namespace} (memory-server --max-memories-per-namespace); "
                f"use fewer rows or layers per server, or more servers")
        with self._lock:
            existing = self._namespaces.get(namespace)
            if existing is not None:
                if existing.config != config:
                    raise ConfigMismatch(
                        f"namespace {namespace!r} is already open with {existing.config.to_dict()}; "
                        f"got {config.to_dict()}. Use a new namespace or drop this one first")
                existing.last_used = time.monotonic()
                return
            if self.max_namespaces is not None and len(self._namespaces) >= self.max_namespaces:
                raise LimitExceeded(
                    f"cannot open namespace {namespace!r}: the server already holds "
                    f"{len(self._namespaces)} namespaces, the limit max_namespaces="
                    f"{self.max_namespaces} (memory-server --max-namespaces); drop finished "
                    f"namespaces or raise the limit")
            self._namespaces[namespace] = _Namespace(config, {}, time.monotonic(),
                                                     self._group(namespace))

    def drop(self, namespace: str) -> None:
        """Forget a namespace and free its memories."""
        with self._lock:
            ns = self._namespaces.pop(namespace, None)
            if ns is None:
                raise UnknownNamespace(f"cannot drop namespace {namespace!r}: it is not open")
            self._retire(ns)

    def config(self, namespace: str) -> NamespaceConfig:
        return self._namespace(namespace).config

    def namespaces(self) -> list[str]:
        with self._lock:
            return list(self._namespaces)

    def expire(self, idle_seconds: float) -> list[str]:
        """Drop namespaces unused for ``idle_seconds``; returns their names."""
        now = time.monotonic()
        with self._lock:  # found and dropped at once: a name dropped meanwhile is no error
            stale = [n for n, ns in self._namespaces.items() if now - ns.last_used > idle_seconds]
            for name in stale:
                self._retire(self._namespaces.pop(name))
        return stale

    def _namespace(self, namespace: str) -> _Namespace:
        with self._lock:
            ns = self._namespaces.get(namespace)
        if ns is None:
            raise UnknownNamespace(f"namespace {namespace!r} is not open on this server; "
                                   f"open it first (the client does so on its first request)")
        ns.last_used = time.monotonic()
        return ns

    # memory operations

    def add(self, namespace: str, layer: int, rows, keys: np.ndarray, values: np.ndarray) -> None:
        """Append ``keys``/``values`` ``(b, n, dim)`` to the memories of ``rows`` ``(b,)`` in ``layer``."""
        ns = self._namespace(namespace)
        cfg = ns.config
        rows = _check_rows(rows, cfg, layer)
        _check_array("keys", keys, (len(rows), None, cfg.dim), finite=True)
        _check_array("values", values, (len(rows), keys.shape[1], cfg.dim), finite=True)
        if keys.shape[1] == 0:
            return
        n = keys.shape[1]
        keys = _stored("keys", keys, cfg.key_dtype)
        values = _stored("values", values, cfg.value_dtype)
        # All rows or none: reserve the growth of every row before writing any, and create the
        # missing memories only then, so a refused add allocates and leaves nothing. A new memory
        # is planned at its overhead and first slots (those of one probe: all are alike).
        keys_of = [(layer, int(row)) for row in rows]
        with self._lock:
            found = [ns.memories.get(key) for key in keys_of]
        if any(memory is None for memory in found):
            probe = Memory(cfg)
            fresh = probe.nbytes() + probe.growth_bytes(n)
        planned = []
        for memory in found:
            if memory is None:
                planned.append(fresh)
                continue
            with memory.lock:
                planned.append(memory.growth_bytes(n))
        with self._lock:
            self._check_live(ns, namespace)
            self._reserve(ns, sum(planned), f"add to namespace {namespace!r}")
        created = [Memory(cfg) if memory is None else None for memory in found]
        with self._lock:
            self._check_live(ns, namespace)
            memories = []
            for i, key in enumerate(keys_of):
                memory = found[i] or ns.memories.setdefault(key, created[i])
                if memory is created[i]:  # its overhead is booked now; the rest is growth
                    planned[i] -= memory.nbytes()
                memories.append(memory)

        def add_row(i: int) -> None:
            memory = memories[i]
            with memory.lock:
                before = memory.nbytes()
                try:
                    memory.add(keys[i], values[i])
                finally:
                    # Another add to this memory may have come in between: keep the books exact
                    # (this may pass max_bytes by that one add's growth).
                    self._adjust(ns, memory.nbytes() - before - planned[i])

        self._map(add_row, range(len(rows)))
        with self._lock:
            self._check_live(ns, namespace)

    def search(self, namespace: str, layer: int, rows, queries: np.ndarray, k: int) -> Retrieval:
        """Top-``k`` entries by inner product for ``queries`` ``(b, q, dim)`` in the memories of ``rows``."""
        ns = self._namespace(namespace)
        cfg = ns.config
        rows = _check_rows(rows, cfg, layer)
        _check_array("queries", queries, (len(rows), None, cfg.dim), finite=True)
        most = min(cfg.max_memories, MAX_K)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= most:
            raise InvalidRequest(f"k must be an integer in [1, {most}] (at most max_memories="
                                 f"{cfg.max_memories} and MAX_K={MAX_K}), got {k!r}")
        nbytes = len(rows) * queries.shape[1] * k * SEARCH_SLOT_BYTES
        merged = ""
        if cfg.index == "hnsw":  # and the lists of every segment of the rows searched at once
            nbytes += min(len(rows), self._row_threads) * queries.shape[1] * k \
                * (cfg.hnsw_segments + 1) * HNSW_MERGE_SLOT_BYTES
            merged = f", and {HNSW_MERGE_SLOT_BYTES} a neighbour and segment graph of each row " \
                     f"searched at once"
        elif cfg.index == "ivf" and cfg.key_dtype != "float32":  # and the candidates rescored
            nbytes += min(len(rows), self._row_threads) * queries.shape[1] * k * IVF_RESCORE \
                * RESCORE_SLOT_BYTES
            merged = f", and {IVF_RESCORE * RESCORE_SLOT_BYTES} a neighbour of each row " \
                     f"searched at once for the candidates rescored"
        if self.max_search_bytes is not None and nbytes > self.max_search_bytes:
            raise LimitExceeded(
                f"search of {len(rows)} rows x {queries.shape[1]} queries x k={k} needs {nbytes} "
                f"bytes ({SEARCH_SLOT_BYTES} a neighbour{merged}), over max_search_bytes="
                f"{self.max_search_bytes} (memory-server --max-message-bytes); send fewer rows "
                f"or queries per request, or a smaller k")
        with self._lock:
            memories = [ns.memories.get((layer, int(row))) for row in rows]

        def search_row(i: int):
            memory = memories[i]
            if memory is None:
                return _empty_gather(cfg, queries.shape[1], k)
            with memory.lock:
                slots = memory.search(queries[i], k)
                return _gather(memory, slots)

        parts = self._map(search_row, range(len(rows)))
        return _assemble(parts, cfg, len(rows), queries.shape[1], k)

    def clear(self, namespace: str, rows, layers=None) -> None:
        """Empty the memories of ``rows`` in ``layers`` (default: every layer)."""
        ns = self._namespace(namespace)
        cfg = ns.config
        layers = range(cfg.num_layers) if layers is None else list(layers)
        rows = list(_check_rows(rows, cfg, 0))
        try:  # all checked before any is cleared: a bad list clears nothing
            for layer in layers:
                _check_layer(layer, cfg)
        except InvalidRequest:
            raise InvalidRequest(f"layers must be integers in [0, {cfg.num_layers}), got "
                                 f"{list(layers)!r:.200}") from None
        if len(set(layers)) != len(layers):
            raise InvalidRequest(f"layers must be distinct, got {list(layers)!r:.200}")
        for layer in layers:
            with self._lock:
                memories = [ns.memories.get((layer, int(row))) for row in rows]
            for memory in memories:
                if memory is not None:
                    with memory.lock:
                        memory.clear()

    def export_namespace(self, namespace: str) -> dict:
        """A namespace's config and every memory's ring, as plain data and numpy arrays."""
        config, _, memories = self.export_stream(namespace)
        return {"config": config, "memories": list(memories)}

    def export_stream(self, namespace: str) -> tuple[dict, int, Iterator[dict]]:
        """A namespace's config, its memory count, and its memories, each copied under its lock
        only when the iterator reaches it, so a snapshot writer holds one copy at a time.
        The memories are those that existed at this call, each as it is when reached."""
        ns = self._namespace(namespace)
        with self._lock:
            items = sorted(ns.memories.items())

        def exported(memory: Memory) -> dict:
            with memory.lock:
                return memory.export()

        def memories() -> Iterator[dict]:  # holds no memory's copy while the next is made
            for (layer, row), memory in items:
                yield {"layer": layer, "row": row, **exported(memory)}

        return ns.config.to_dict(), len(items), memories()

    def book_restore(self, namespace: str, config: NamespaceConfig, slots: list[int]) -> _Namespace:
        """Book what a restore of ``namespace`` with memories of ``slots`` slots each will hold,
        before any of them is read, or refuse it as an add is refused (``LimitExceeded``,
        ``QuotaExceeded``): a snapshot too large for the server costs it nothing. The booking is
        for ``import_namespace``, or for ``unbook`` when the restore fails."""
        _check_namespace_name(namespace)
        probe = Memory(config)
        nbytes = sum(n * probe.bytes_per_slot + probe.overhead for n in slots)
        booked = _Namespace(config, {}, time.monotonic(), self._group(namespace))
        with self._lock:
            old = self._namespaces.get(namespace)
            self._reserve(booked, nbytes, f"restore of namespace {namespace!r}",
                          freeing=0 if old is None else old.bytes)
        return booked

    def unbook(self, booked: _Namespace) -> None:
        """Give back what ``book_restore`` booked for a restore that did not happen."""
        with self._lock:
            if not booked.retired:
                self._retire(booked)

    def import_namespace(self, namespace: str, state: dict,
                         booked: _Namespace | None = None) -> None:
        """Replace ``namespace`` with an exported one (the same ring, slot for slot); its bytes
        are booked once loaded, or were by ``book_restore`` (``booked``)."""
        config = NamespaceConfig.from_dict(state["config"])
        if booked is not None and booked.config != config:
            raise InvalidRequest(f"namespace {namespace!r} was booked with config "
                                 f"{booked.config.to_dict()}, and its state has {config.to_dict()}")
        loaded = {}
        for item in state["memories"]:
            layer, row = int(item["layer"]), int(item["row"])
            _check_rows(np.array([row]), config, layer)
            memory = Memory(config)
            keys = np.asarray(item["keys"], dtype=KEY_DTYPES[config.key_dtype])
            values = np.asarray(item["values"], dtype=VALUE_DTYPES[config.value_dtype])
            total = int(item["total"])
            if not 0 <= total < MAX_TOTAL:
                raise InvalidRequest(f"memory (layer {layer}, row {row}) of namespace "
                                     f"{namespace!r} claims {total} entries; at most "
                                     f"{MAX_TOTAL - 1} can have been added")
            if keys.shape != values.shape or keys.ndim != 2 or keys.shape[1] != config.dim \
                    or keys.shape[0] != min(memory.ring, keys.shape[0]) \
                    or not 0 <= min(total, memory.ring) <= keys.shape[0]:
                raise InvalidRequest(f"memory (layer {layer}, row {row}) of namespace "
                                     f"{namespace!r} has inconsistent shapes {keys.shape} / "
                                     f"{values.shape} for {total} entries")
            memory.load(keys, values, total, *_index_state(item, config, memory, namespace))
            loaded[(layer, row)] = memory
        new = booked if booked is not None else _Namespace(config, {}, time.monotonic(),
                                                           self._group(namespace))
        new.memories, new.last_used = loaded, time.monotonic()
        nbytes = sum(m.nbytes() for m in loaded.values())
        with self._lock:  # the swap is one step: concurrent adds and restores see old or new
            old = self._namespaces.get(namespace)
            if nbytes > new.bytes:  # all of it, unless booked (then exactly that)
                self._reserve(new, nbytes - new.bytes, f"restore of namespace {namespace!r}",
                              freeing=0 if old is None or booked else old.bytes)
            elif nbytes < new.bytes:  # a memory the snapshot holds twice is kept once
                extra = new.bytes - nbytes
                new.bytes -= extra
                self._reserved_bytes -= extra
                self._book_group(new, -extra)
            if old is not None:
                self._retire(old)
            self._namespaces[namespace] = new

    def stats(self) -> dict:
        with self._lock:  # adds create memories meanwhile
            spaces = {name: (ns.config, list(ns.memories.items()))
                      for name, ns in self._namespaces.items()}
        per_namespace = {}
        for name, (config, items) in spaces.items():
            per_namespace[name] = {
                "memories": len(items),
                "entries": sum(m.live for _, m in items),
                "bytes": sum(m.nbytes() for _, m in items),
                "rows": sorted({row for (_, row), _ in items}),
                "config": config.to_dict(),
            }
        return {
            "namespaces": len(per_namespace),
            "memories": sum(s["memories"] for s in per_namespace.values()),
            "entries": sum(s["entries"] for s in per_namespace.values()),
            "bytes": sum(s["bytes"] for s in per_namespace.values()),
            "per_namespace": per_namespace,
        }

    def quota(self, prefix: str) -> dict | None:
        """The quota of the namespaces ``PREFIX.*`` and the bytes they hold; None without one."""
        if prefix not in self.quotas:
            return None
        with self._lock:
            return {"max_bytes": self.quotas[prefix], "bytes": self._group_bytes.get(prefix, 0)}

    # internals

    def _group(self, namespace: str) -> str | None:
        prefix, dot, _ = namespace.partition(".")
        return prefix if dot and prefix in self.quotas else None

    # The books: callers hold self._lock, except for _adjust.

    def _reserve(self, ns: _Namespace, nbytes: int, what: str, freeing: int = 0) -> None:
        """Book ``nbytes`` for ``ns``, or refuse; ``freeing``: bytes the caller frees with it (of
        a namespace of the same name, so of the same group)."""
        group = ns.group
        if group is not None and nbytes > freeing:
            held, quota = self._group_bytes.get(group, 0), self.quotas[group]
            if held - freeing + nbytes > quota:
                raise QuotaExceeded(
                    f"{what} needs {nbytes} more bytes but tenant {group!r} holds {held} of its "
                    f"quota max_bytes={quota} (its line of the server's --token-file, or "
                    f"--tenant-max-bytes); drop its unused namespaces, lower "
                    f"max_memories, or ask for a larger quota")
        if self.max_bytes is not None and nbytes > freeing \
                and self._reserved_bytes - freeing + nbytes > self.max_bytes:
            raise LimitExceeded(
                f"{what} needs {nbytes} more bytes but the server holds {self._reserved_bytes} "
                f"of max_bytes={self.max_bytes}; raise --max-bytes, lower max_memories, or drop "
                f"unused namespaces")
        ns.bytes += nbytes
        self._reserved_bytes += nbytes
        self._book_group(ns, nbytes)

    def _adjust(self, ns: _Namespace, nbytes: int) -> None:
        if nbytes:
            with self._lock:
                ns.bytes += nbytes
                if not ns.retired:
                    self._reserved_bytes += nbytes
                    self._book_group(ns, nbytes)

    def _retire(self, ns: _Namespace) -> None:
        ns.retired = True
        self._reserved_bytes -= ns.bytes
        self._book_group(ns, -ns.bytes)

    def _book_group(self, ns: _Namespace, nbytes: int) -> None:
        if ns.group is not None:
            self._group_bytes[ns.group] = self._group_bytes.get(ns.group, 0) + nbytes

    @staticmethod
    def _check_live(ns: _Namespace, namespace: str) -> None:
        if ns.retired:
            raise UnknownNamespace(f"namespace {namespace!r} was dropped, restored or expired "
                                   f"while this add ran; the add was not kept")

    def _map(self, fn, items):
        items = list(items)
        if self._pool is None or len(items) < 2:
            return [fn(i) for i in items]
        return list(self._pool.map(fn, items))


def _check_namespace_name(namespace) -> None:
    if not isinstance(namespace, str) or not 0 < len(namespace) <= 256:
        raise InvalidRequest(f"namespace must be a non-empty string of at most 256 characters, "
                             f"got {namespace!r}")


def _check_layer(layer, cfg: NamespaceConfig) -> None:
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) \
            or not 0 <= layer < cfg.num_layers:
        raise InvalidRequest(f"layer must be an integer in [0, {cfg.num_layers}), got {layer!r}")


def _check_rows(rows, cfg: NamespaceConfig, layer) -> np.ndarray:
    _check_layer(layer, cfg)
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.size == 0 or rows.dtype.kind not in "iu":
        raise InvalidRequest(f"rows must be a non-empty 1-d integer array, got shape {rows.shape} "
                             f"dtype {rows.dtype}")
    if rows.min() < 0 or rows.max() >= cfg.num_rows:
        raise InvalidRequest(f"rows must be in [0, num_rows={cfg.num_rows}), got "
                             f"{rows.min()}..{rows.max()}")
    if np.unique(rows).size != rows.size:
        raise InvalidRequest(f"rows must be distinct, got {rows.tolist()}")
    return rows


def _check_array(name: str, array, shape: tuple, *, finite: bool) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise InvalidRequest(f"{name} must be a float32 array, got {got}")
    if array.ndim != len(shape) or any(s is not None and a != s for a, s in zip(array.shape, shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise InvalidRequest(f"{name} must have shape {want}, got {tuple(array.shape)}")
    if finite and not np.isfinite(array).all():
        raise InvalidRequest(f"{name} contains NaN or Inf")


def _stored(name: str, array: np.ndarray, dtype_name: str) -> np.ndarray:
    """``array`` (float32) in the namespace's dtype for it; refuses what would overflow."""
    dtype = VALUE_DTYPES[dtype_name]
    with np.errstate(over="ignore"):  # an overflow is refused just below, not warned of
        stored = array.astype(dtype, copy=False)
    if dtype is not np.float32 and not np.isfinite(stored).all():
        raise InvalidRequest(
            f"{name} overflow {name[:-1]}_dtype {dtype_name} (finite up to "
            f"+-{float(np.finfo(dtype).max):g}): {np.count_nonzero(~np.isfinite(stored))} of "
            f"them would be stored as inf; scale them down or open the namespace with "
            f"{name[:-1]}_dtype float32")
    return stored


def _gather(memory: Memory, slots: np.ndarray):
    """Distinct live entries among ``slots`` and 1-based positions into them (0 = none)."""
    valid = slots >= 0
    used = np.zeros(memory.keys.shape[0], dtype=bool)
    used[slots[valid]] = True
    distinct = np.flatnonzero(used)
    remap = np.cumsum(used, dtype=np.int32)  # slot -> 1-based rank among the distinct slots
    positions = np.where(valid, remap[np.where(valid, slots, 0)], 0).astype(np.int32)
    return memory.keys[distinct], memory.values[distinct], positions


def _empty_gather(cfg: NamespaceConfig, q: int, k: int):
    return (np.empty((0, cfg.dim), KEY_DTYPES[cfg.key_dtype]),
            np.empty((0, cfg.dim), VALUE_DTYPES[cfg.value_dtype]),
            np.zeros((q, k), np.int32))


def _assemble(parts, cfg: NamespaceConfig, b: int, q: int, k: int) -> Retrieval:
    value_dtype = VALUE_DTYPES[cfg.value_dtype]
    zeros_k = np.zeros((1, cfg.dim), KEY_DTYPES[cfg.key_dtype])
    zeros_v = np.zeros((1, cfg.dim), value_dtype)
    keys = np.concatenate([zeros_k, *(p[0] for p in parts)])
    values = np.concatenate([zeros_v, *(p[1] for p in parts)])
    positions = np.empty((b, q, k), np.int32)
    offset = 0
    for i, (part_keys, _, part_positions) in enumerate(parts):
        positions[i] = np.where(part_positions > 0, part_positions + offset, 0)
        offset += part_keys.shape[0]
    return Retrieval(keys, values, positions)
