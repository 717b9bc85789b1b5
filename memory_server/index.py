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
"""

from __future__ import annotations

import math

import faiss
import numpy as np

INDEX_KINDS = ("flat", "hnsw")


def hnsw_segment_size(max_memories: int, hnsw_segments: int) -> int:
    return math.ceil(max_memories / hnsw_segments)


def ring_size(kind: str, max_memories: int, hnsw_segments: int) -> int:
    """Slots a memory's ring needs for ``max_memories`` live entries with this index kind."""
    if kind == "flat":
        return max_memories
    segment = hnsw_segment_size(max_memories, hnsw_segments)
    return (math.ceil(max_memories / segment) + 1) * segment


class FlatIndex:
    """Exact maximum-inner-product search over the live part of the ring."""

    def __init__(self, ring: int):
        self.ring = ring

    def reset(self) -> None:
        pass

    def write(self, seq_start: int, keys: np.ndarray) -> None:
        pass

    def search(self, keys: np.ndarray, queries: np.ndarray, k: int, lo: int, hi: int) -> np.ndarray:
        # The ring holds exactly max_memories slots: before the first wrap the live entries are
        # slots [0, hi), after it every slot is live.
        live = keys[: min(hi, self.ring)]
        _, slots = faiss.knn(queries, live, k, metric=faiss.METRIC_INNER_PRODUCT)
        return slots

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

    def write(self, seq_start: int, keys: np.ndarray) -> None:
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
