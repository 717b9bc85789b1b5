"""Index kinds over one memory's ring buffer of keys.

A memory stores entry number ``seq`` (counted from its last clear) in ring slot ``seq % ring_size``.
The store tells its index which sequence numbers it wrote (``write``) and which ones are live
(``search(..., lo, hi)``: the newest ``max_memories``); the index answers with ring *slots*, so the
store gathers key/values without any id translation. That is the fix for the seed, whose faiss
positions pointed at the wrong key/values after the first wrap.

- ``flat``: exact inner product (the paper's choice). The ring itself is the index: a search is one
  ``faiss.knn`` over the live keys, so eviction is free and results are exact.
- ``hnsw``: approximate. HNSW cannot delete, so the ring is cut into fixed-size segments, each with
  its own HNSW graph that is rebuilt when the ring comes back to it; the ring holds one segment more
  than ``max_memories`` and a search restricts the oldest segment to its live ids, so FIFO stays
  exact. Per-segment top-k lists are merged.
- ``ivf``: approximate, an inverted file (``faiss.IndexIVFFlat``, inner product) over the ring, with
  ids = ring slots. See ``IVFIndex`` for when it trains and how entries leave it.

Compressed keys (``key_dtype="float16"``): the ring holds float16 keys. Every search scores them
in float32, converting at most ``CONVERT_BYTES`` of keys at a time, so ``flat`` stays exact for
the stored keys (which differ from the given ones by float16 rounding, 2^-11 relative); an
``ivf`` index's lists hold 8-bit codes instead of float copies and the best ``IVF_RESCORE`` x k
candidates they give are rescored exactly from the ring.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math

import faiss
import numpy as np

INDEX_KINDS = ("flat", "hnsw", "ivf")

IVF_TRAIN_PER_LIST = 32
"""Keys per inverted list that k-means trains on. The ivf index trains once a memory holds
``IVF_TRAIN_PER_LIST * nlist`` entries, on exactly that many of its live keys (sampled by faiss
with its fixed seed), so training costs the same whatever the memory size; a ``nlist`` that
could never train is refused at open."""


IVF_RESCORE = 4
"""A compressed-key ``ivf`` search takes ``IVF_RESCORE * k`` candidates from its 8-bit lists
and keeps the ``k`` best by exact float32 scores of the ring's keys: the codes' rounding moves
entries near the k-th score, and 4x the candidates catches most of them (recall@32 on model
keys 0.981 and 0.965 at 16K and 64K, against 0.982 and 0.971 for ``IndexIVFFlat`` at the same
nprobe; bench.memory)."""
CONVERT_BYTES = 4 << 20
"""Float32 bytes of float16 keys a search converts at once (the rescoring: of the candidates of
one group of queries): a bounded temporary whatever the memory size."""


def _libc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _libc_trim()


def release_freed_heap() -> None:
    """Give the heap that freed inverted lists or an outgrown ring leave behind back to the OS.
    glibc keeps it (past its first large free it serves large arrays from the heap): a 64K
    float16 ivf memory held 946 bytes per entry of RSS for 483 in use (float32: 1,345 for 958),
    measured. Called after each (re)build of the lists and each growth of a ring."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def float32_keys(keys: np.ndarray) -> np.ndarray:
    """``keys`` as float32 (itself when it is already)."""
    return np.ascontiguousarray(keys, dtype=np.float32)


def _chunk_rows(dim: int) -> int:
    return max(1, CONVERT_BYTES // (4 * dim))


def ivf_nlist(max_memories: int, nlist: int) -> int:
    """``nlist``, or when it is 0 the default: about 4 sqrt(max_memories) lists (the usual faiss
    guidance, 4-16 sqrt(N)) up to 64K memories, one per 64 memories beyond (4,096 at 262K, where
    2,048 lists needed nprobe 24 for the recall that 4,096 reach at 20, and scanned 2.4x the keys;
    ``bench.ivf_profile``), fewer when the memory could not hold enough keys to train them."""
    if nlist:
        return nlist
    lists = max(round(4 * math.sqrt(max_memories)), max_memories // 64)
    return max(1, min(lists, max_memories // IVF_TRAIN_PER_LIST))


def ivf_nprobe(nlist: int, nprobe: int) -> int:
    """``nprobe``, or when it is 0 the default: 8; more with many lists (4 + nlist / 256: 20 of
    4,096) and with few (6,144 / nlist: 12 of 512). Fitted on model keys with ties counted
    (``bench.memory``, ``bench.ivf_profile``; README): recall@32 0.965 at 16K memories (512
    lists; 0.947 at nprobe 8), 0.960 at 64K (1,024), 0.966 at 262K (4,096; 0.945-0.957 at 16).
    Recall follows the lists probed more than the keys scanned: a query's neighbours spread over
    several lists, and at 64K 8 of 256 lists (2,048 keys) found fewer than 8 of 1,024 (526)."""
    return nprobe or min(nlist, max(8, 4 + nlist // 256, 6144 // nlist))


def hnsw_segment_size(max_memories: int, hnsw_segments: int) -> int:
    return math.ceil(max_memories / hnsw_segments)


def ring_size(kind: str, max_memories: int, hnsw_segments: int) -> int:
    """Slots a memory's ring needs for ``max_memories`` live entries with this index kind."""
    if kind in ("flat", "ivf"):
        return max_memories
    segment = hnsw_segment_size(max_memories, hnsw_segments)
    return (math.ceil(max_memories / segment) + 1) * segment


class FlatIndex:
    """Exact maximum-inner-product search over the live part of the ring."""

    def __init__(self, ring: int):
        self.ring = ring

    def reset(self) -> None:
        pass

    def write(self, seq_start: int, keys: np.ndarray, ring_keys: np.ndarray) -> None:
        pass

    def search(self, keys: np.ndarray, queries: np.ndarray, k: int, lo: int, hi: int) -> np.ndarray:
        return _exact(keys, queries, k, min(hi, self.ring))

    bytes_per_entry = 0


class HNSWIndex:
    """Segmented HNSW graphs over the ring; see the module docstring."""

    def __init__(self, dim: int, ring: int, segment: int, m: int, ef_search: int,
                 ef_construction: int):
        self.dim = dim
        self.segment = segment
        self.m = m
        self.ef_search = ef_search
        self.ef_construction = ef_construction
        self._graphs: list[faiss.IndexHNSWFlat | None] = [None] * (ring // segment)
        self._seq_start = [0] * (ring // segment)

    def _new_graph(self) -> faiss.IndexHNSWFlat:
        graph = faiss.IndexHNSWFlat(self.dim, self.m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = self.ef_construction
        return graph

    def reset(self) -> None:
        self._graphs = [None] * len(self._graphs)

    def write(self, seq_start: int, keys: np.ndarray, ring_keys: np.ndarray) -> None:
        ring = self.segment * len(self._graphs)
        done = 0
        while done < keys.shape[0]:
            seq = seq_start + done
            slot = seq % ring
            seg, offset = divmod(slot, self.segment)
            take = min(keys.shape[0] - done, self.segment - offset)
            if offset == 0 or self._graphs[seg] is None:
                self._graphs[seg] = self._new_graph()
                self._seq_start[seg] = seq - offset
            self._graphs[seg].add(float32_keys(keys[done : done + take]))
            done += take

    def search(self, keys: np.ndarray, queries: np.ndarray, k: int, lo: int, hi: int) -> np.ndarray:
        all_scores, all_slots = [], []
        for seg, graph in enumerate(self._graphs):
            if graph is None or graph.ntotal == 0:
                continue
            first = self._seq_start[seg]
            live_lo, live_hi = max(lo, first) - first, min(hi, first + graph.ntotal) - first
            if live_hi <= live_lo:
                continue
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.ef_search, k)
            if live_lo > 0 or live_hi < graph.ntotal:
                selector = faiss.IDSelectorRange(live_lo, live_hi)
                params.sel = selector
            scores, ids = graph.search(queries, k, params=params)
            all_scores.append(scores)
            all_slots.append(np.where(ids >= 0, ids + seg * self.segment, -1))
        if not all_scores:
            return np.full((queries.shape[0], k), -1, dtype=np.int64)
        scores = np.concatenate(all_scores, axis=1)
        slots = np.concatenate(all_slots, axis=1)
        scores[slots < 0] = -np.inf
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(slots, top, axis=1)

    @property
    def bytes_per_entry(self) -> int:
        # The graphs keep their own copy of each vector plus about 2*M neighbour links (int32).
        return self.dim * 4 + 2 * self.m * 4


class IVFIndex:
    """An inverted file over the ring (``IndexIVFFlat``, inner product): each query scans the
    ``nprobe`` lists whose centroids it is closest to, not every key.

    - Before training a search is exact (as ``flat``). The index trains, inside the ``add`` that
      brings the memory to ``IVF_TRAIN_PER_LIST * nlist`` entries, on that many keys, and then
      lists every live entry. Centroids are per memory (each batch row has its own): rows fill
      and clear at different times, and training on a row's own keys needs no coordination
      between rows; a row's training runs on its own worker thread like its adds.
    - It retrains, in the same way, each time the memory has doubled while it fills (so the
      centroids of a full memory come from all of its keys, not from its oldest quarter: recall
      0.92 against 0.96 at 262K, measured), and then each time the ring has turned over since
      the last training (``max_memories`` entries later: none of the keys the centroids were
      fitted to is live), so the lists follow the keys as the model and the documents change.
    - An entry's id is its ring slot. Overwriting a slot first removes that id from its list
      (``remove_ids`` with an ``IDSelectorBatch``, a hashed set: one pass over the lists, each
      entry's id looked up in O(1)), so a search never returns an evicted entry and the ring
      holds exactly ``max_memories`` slots, as ``flat``. There is no direct map: faiss's
      hash-table map cost RAM (a 64K memory's RSS: 959 bytes per entry with it, on an earlier
      model's keys, 918 without; README) and
      removed no faster (remove and add of 512, one thread: 2.8 against 2.6 ms at 64K, 5.5 and
      5.5 ms at 262K; ``python -m bench.ivf_profile``).
    - Training is deterministic (faiss's k-means with its fixed seed on the ring's keys), and
      ``state``/``restore`` carry the centroids and when they were trained, so a restored memory
      has the same lists and gives the same results as the one it was saved from (up to the
      order of exactly tied scores).
    - ``compressed`` (float16 keys in the ring): the lists are an ``IndexIVFScalarQuantizer``
      with 8-bit codes of each key's residual to its centroid (d bytes a key, not 4·d), its
      per-dimension ranges trained with the centroids; a search takes ``IVF_RESCORE * k``
      candidates and rescores them exactly from the ring. It trains on ``train_size`` keys it
      samples itself (a fixed seed), so it never converts more of the ring than that at once;
      ``state`` appends the quantiser's ranges to the centroids (2 rows: minimum, width).
    """

    def __init__(self, dim: int, ring: int, nlist: int, nprobe: int, compressed: bool = False):
        self.dim = dim
        self.ring = ring
        self.nlist = nlist
        self.nprobe = nprobe
        self.compressed = compressed
        self.train_size = IVF_TRAIN_PER_LIST * nlist
        self.reset()

    @property
    def state_rows(self) -> int:
        """Rows of ``state``'s array: the centroids, and the 8-bit ranges when compressed."""
        return self.nlist + (2 if self.compressed else 0)

    def reset(self) -> None:
        self._ivf: faiss.IndexIVF | None = None
        self.trained_at = 0
        """Entries written (the memory's ``total``) when the centroids were trained."""

    @property
    def trained(self) -> bool:
        return self._ivf is not None

    def _build(self, centroids: np.ndarray | None, train: np.ndarray | None = None) -> None:
        quantizer = faiss.IndexFlatIP(self.dim)
        if self.compressed:
            ivf = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, self.nlist,
                                                faiss.ScalarQuantizer.QT_8bit,
                                                faiss.METRIC_INNER_PRODUCT)
        else:
            ivf = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        if centroids is None:
            # Train on exactly train_size keys: no sampling warning, a bounded cost.
            ivf.cp.min_points_per_centroid = ivf.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST
            if self.compressed:  # sample them here: convert train_size keys, not the ring
                pick = np.random.default_rng(1234).choice(train.shape[0], self.train_size,
                                                          replace=False)
                train = float32_keys(train[np.sort(pick)])
            ivf.train(train)
        else:
            quantizer.add(np.ascontiguousarray(centroids[: self.nlist]))
            if self.compressed:
                faiss.copy_array_to_vector(np.ascontiguousarray(centroids[self.nlist :]).ravel(),
                                           ivf.sq.trained)
            ivf.is_trained = True
        self._quantizer = quantizer  # the IVF index does not own it: keep it alive
        self._ivf = ivf

    def _list_all(self, ring_keys: np.ndarray, live: int) -> None:
        step = _chunk_rows(self.dim) if self.compressed else max(live, 1)
        for start in range(0, live, step):
            end = min(live, start + step)
            self._ivf.add_with_ids(float32_keys(ring_keys[start:end]),
                                   np.arange(start, end, dtype=np.int64))

    def write(self, seq_start: int, keys: np.ndarray, ring_keys: np.ndarray) -> None:
        """Index ``keys`` (sequence numbers from ``seq_start``), already in ``ring_keys``."""
        hi = seq_start + keys.shape[0]
        live = min(hi, self.ring)
        if (not self.trained and live >= self.train_size) \
                or (self.trained and hi - self.trained_at >= min(self.trained_at, self.ring)):
            self._build(None, ring_keys[:live])
            self.trained_at = hi
            self._list_all(ring_keys, live)
            release_freed_heap()
            return
        if not self.trained:
            return
        seqs = seq_start + np.arange(keys.shape[0], dtype=np.int64)
        slots = seqs % self.ring
        evicted = np.ascontiguousarray(slots[seqs >= self.ring])
        if evicted.size:
            self._ivf.remove_ids(faiss.IDSelectorBatch(evicted.size, faiss.swig_ptr(evicted)))
        self._ivf.add_with_ids(float32_keys(keys), slots)

    def search(self, keys: np.ndarray, queries: np.ndarray, k: int, lo: int, hi: int) -> np.ndarray:
        if not self.trained:
            return _exact(keys, queries, k, min(hi, self.ring))
        params = faiss.SearchParametersIVF()
        params.nprobe = self.nprobe  # read here: a benchmark may sweep it on one trained index
        if not self.compressed:
            return self._ivf.search(queries, k, params=params)[1]
        candidates = self._ivf.search(queries, IVF_RESCORE * k, params=params)[1]
        return _rescore(keys, queries, candidates, k)

    def state(self) -> tuple[np.ndarray | None, int]:
        """The centroids (None before training), with the 8-bit ranges after them when
        compressed (``state_rows``), and the ``total`` they were trained at."""
        if not self.trained:
            return None, 0
        centroids = self._quantizer.reconstruct_n(0, self.nlist)
        if self.compressed:
            ranges = faiss.vector_to_array(self._ivf.sq.trained).reshape(2, self.dim)
            centroids = np.concatenate([centroids, ranges])
        return centroids, self.trained_at

    def restore(self, centroids: np.ndarray, trained_at: int, ring_keys: np.ndarray,
                total: int) -> None:
        """Take saved centroids and list the live entries of the ring under them."""
        self._build(np.ascontiguousarray(centroids, dtype=np.float32))
        self.trained_at = trained_at
        self._list_all(ring_keys, min(total, self.ring))
        release_freed_heap()

    @property
    def bytes_per_entry(self) -> int:
        # Each list keeps a copy of the key (or its d-byte code) and its int64 id in vectors
        # that grow by doubling and keep their capacity as entries leave (half more), and the
        # allocator holds about 64 bytes per entry more: 460 bytes at dim 64 (172 compressed).
        # Measured, one 64K memory's RSS: 918 (433 compressed) bytes per entry, booked 972
        # (428) with the ring (bench.memory, README). The centroids (nlist x dim) are not counted.
        code = self.dim if self.compressed else self.dim * 4
        return (code + 8) * 3 // 2 + 64


def _exact(keys: np.ndarray, queries: np.ndarray, k: int, live: int) -> np.ndarray:
    # The ring holds exactly max_memories slots: before the first wrap the live entries are
    # slots [0, hi), after it every slot is live.
    if keys.dtype == np.float32:
        _, slots = faiss.knn(queries, keys[:live], k, metric=faiss.METRIC_INNER_PRODUCT)
        return slots
    # Float16 keys: exact over blocks converted to float32 for BLAS, top-k lists merged.
    heap = faiss.ResultHeap(queries.shape[0], k, keep_max=True)
    step = _chunk_rows(keys.shape[1])
    for start in range(0, live, step):
        block = float32_keys(keys[start : min(live, start + step)])
        scores, ids = faiss.knn(queries, block, min(k, block.shape[0]),
                                metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(ids >= 0, ids + start, -1))
    heap.finalize()
    return heap.I


def _rescore(keys: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best of each query's ``candidates`` (ring slots, -1 for none) by exact float32
    inner products with the ring's ``keys``, best first; -1 where fewer were found."""
    n, width = candidates.shape
    dim = keys.shape[1]
    scores = np.empty((n, width), np.float32)
    step = max(1, CONVERT_BYTES // (4 * dim * width))
    for start in range(0, n, step):
        ids = candidates[start : start + step]
        # Convert each distinct candidate once: neighbouring queries share most of theirs
        # (2.6x faster than converting every candidate, 16K model keys).
        distinct, where = np.unique(np.where(ids >= 0, ids, 0), return_inverse=True)
        block = float32_keys(keys[distinct])
        where = np.ascontiguousarray(where.reshape(ids.shape), dtype=np.int64)
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(scores[start : start + step]),
            faiss.swig_ptr(np.ascontiguousarray(queries[start : start + step])),
            faiss.swig_ptr(block), faiss.swig_ptr(where), dim, ids.shape[0], width)
    scores[candidates < 0] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(scores, top, axis=1) > -np.inf,
                    np.take_along_axis(candidates, top, axis=1), -1)
