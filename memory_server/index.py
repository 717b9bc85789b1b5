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
"""

from __future__ import annotations

import math

import faiss
import numpy as np

INDEX_KINDS = ("flat", "hnsw", "ivf")

IVF_TRAIN_PER_LIST = 32
"""Keys per inverted list that k-means trains on. The ivf index trains once a memory holds
``IVF_TRAIN_PER_LIST * nlist`` entries, on exactly that many of its live keys (sampled by faiss
with its fixed seed), so training costs the same whatever the memory size; a ``nlist`` that
could never train is refused at open."""


def ivf_nlist(max_memories: int, nlist: int) -> int:
    """``nlist``, or when it is 0 the default: about 4 sqrt(max_memories) lists (the usual faiss
    guidance, 4-16 sqrt(N)), fewer when the memory could not hold enough keys to train them."""
    if nlist:
        return nlist
    return max(1, min(round(4 * math.sqrt(max_memories)), max_memories // IVF_TRAIN_PER_LIST))


def ivf_nprobe(nlist: int, nprobe: int) -> int:
    """``nprobe``, or when it is 0 the default: 1/64 of the lists, at least 32 (measured on model
    keys by ``bench.memory``: recall@32 0.96-0.98 at 16K-262K memories, where 16 lists gave 0.94
    at 64K and 0.91 at 262K; README)."""
    return nprobe or min(nlist, max(32, nlist // 64))


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
            self._graphs[seg].add(keys[done : done + take])
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
      (``remove_ids`` through faiss's hash-table direct map, O(1) each: 4 ms per 512 at 64K
      against 9 ms for the list scan without the map), so a search never returns an evicted
      entry and the ring holds exactly ``max_memories`` slots, as ``flat``.
    - Training is deterministic (faiss's k-means with its fixed seed on the ring's keys), and
      ``state``/``restore`` carry the centroids and when they were trained, so a restored memory
      has the same lists and gives the same results as the one it was saved from (up to the
      order of exactly tied scores).
    """

    def __init__(self, dim: int, ring: int, nlist: int, nprobe: int):
        self.dim = dim
        self.ring = ring
        self.nlist = nlist
        self.nprobe = nprobe
        self.train_size = IVF_TRAIN_PER_LIST * nlist
        self.reset()

    def reset(self) -> None:
        self._ivf: faiss.IndexIVFFlat | None = None
        self.trained_at = 0
        """Entries written (the memory's ``total``) when the centroids were trained."""

    @property
    def trained(self) -> bool:
        return self._ivf is not None

    def _build(self, centroids: np.ndarray | None, train: np.ndarray | None = None) -> None:
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        if centroids is None:
            # Train on exactly train_size keys: no sampling warning, a bounded cost.
            ivf.cp.min_points_per_centroid = ivf.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST
            ivf.train(train)
        else:
            quantizer.add(centroids)
            ivf.is_trained = True
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        self._quantizer = quantizer  # the IVF index does not own it: keep it alive
        self._ivf = ivf

    def _list_all(self, ring_keys: np.ndarray, live: int) -> None:
        self._ivf.add_with_ids(ring_keys[:live], np.arange(live, dtype=np.int64))

    def write(self, seq_start: int, keys: np.ndarray, ring_keys: np.ndarray) -> None:
        """Index ``keys`` (sequence numbers from ``seq_start``), already in ``ring_keys``."""
        hi = seq_start + keys.shape[0]
        live = min(hi, self.ring)
        if (not self.trained and live >= self.train_size) \
                or (self.trained and hi - self.trained_at >= min(self.trained_at, self.ring)):
            self._build(None, ring_keys[:live])
            self.trained_at = hi
            self._list_all(ring_keys, live)
            return
        if not self.trained:
            return
        seqs = seq_start + np.arange(keys.shape[0], dtype=np.int64)
        slots = seqs % self.ring
        evicted = np.ascontiguousarray(slots[seqs >= self.ring])
        if evicted.size:
            self._ivf.remove_ids(faiss.IDSelectorArray(evicted.size, faiss.swig_ptr(evicted)))
        self._ivf.add_with_ids(keys, slots)

    def search(self, keys: np.ndarray, queries: np.ndarray, k: int, lo: int, hi: int) -> np.ndarray:
        if not self.trained:
            return _exact(keys, queries, k, min(hi, self.ring))
        params = faiss.SearchParametersIVF()
        params.nprobe = self.nprobe  # read here: a benchmark may sweep it on one trained index
        return self._ivf.search(queries, k, params=params)[1]

    def state(self) -> tuple[np.ndarray | None, int]:
        """The centroids (None before training) and the ``total`` they were trained at."""
        if not self.trained:
            return None, 0
        return self._quantizer.reconstruct_n(0, self.nlist), self.trained_at

    def restore(self, centroids: np.ndarray, trained_at: int, ring_keys: np.ndarray,
                total: int) -> None:
        """Take saved centroids and list the live entries of the ring under them."""
        self._build(np.ascontiguousarray(centroids, dtype=np.float32))
        self.trained_at = trained_at
        self._list_all(ring_keys, min(total, self.ring))

    @property
    def bytes_per_entry(self) -> int:
        # Each list keeps a copy of the key and its int64 id in vectors that grow by doubling
        # (half again on average), and the hash-table direct map about 64 bytes more: 440 bytes
        # at dim 64, where a server's RSS grew by 394 (64K) to 475 (262K) bytes per entry more
        # than flat's (bench.memory). The centroids (nlist x dim floats) are not counted.
        return (self.dim * 4 + 8) * 3 // 2 + 64


def _exact(keys: np.ndarray, queries: np.ndarray, k: int, live: int) -> np.ndarray:
    # The ring holds exactly max_memories slots: before the first wrap the live entries are
    # slots [0, hi), after it every slot is live.
    _, slots = faiss.knn(queries, keys[:live], k, metric=faiss.METRIC_INNER_PRODUCT)
    return slots
