"""Where an ivf search's time goes, against flat: one row of model keys on one faiss thread.

For each size: exact search (``faiss.knn``, a matrix multiply) of one row's 4,096 queries; then
``IndexIVFFlat`` at 4 and 8 sqrt(N) lists and several nprobe, with recall@32 against exact (ties
counted: ``bench.memory.recall``), the time split into the coarse quantiser (the queries' nprobe
nearest centroids) and the list scan (``search_preassigned``), and the keys scanned per query;
the k-means of each nlist (what a retraining costs, once per turn of the ring, and that cost
spread over the turn's steps of 512 adds); and the cost of removing and adding 512 entries (a
step's eviction) with faiss's hash-table direct map and without it (``IDSelectorBatch``, what
``IVFIndex`` does). Keys are bench.memory's (cached model keys).

    python -m bench.ivf_profile                       # 64K and 262K (~3 minutes)
    python -m bench.ivf_profile --sizes 65536 --nlists 256 1024 --nprobes 8 16
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from memory_server.index import IVF_TRAIN_PER_LIST

from .common import machine_line, table
from .memory import ADD, K, exact_kth, get_keys, recall


def best_ms(fn, reps: int = 3):
    """The fastest of ``reps`` runs, in ms, and the last result."""
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - began)
    return min(times) * 1e3, out


def ivf(keys: np.ndarray, nlist: int, direct_map: bool) -> tuple[faiss.IndexIVFFlat, float]:
    """The index over ``keys`` and the seconds its k-means took."""
    quantizer = faiss.IndexFlatIP(keys.shape[1])
    index = faiss.IndexIVFFlat(quantizer, keys.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.min_points_per_centroid = index.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST
    began = time.perf_counter()
    index.train(keys)
    train_seconds = time.perf_counter() - began
    if direct_map:
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
    index.add_with_ids(keys, np.arange(keys.shape[0]))
    return index, train_seconds


def eviction_ms(index: faiss.IndexIVFFlat, keys: np.ndarray, direct_map: bool) -> float:
    """Median ms of removing and re-adding 512 entries, 16 times."""
    times = []
    for start in range(0, 16 * 512, 512):
        ids = np.arange(start, start + 512, dtype=np.int64)
        began = time.perf_counter()
        selector = (faiss.IDSelectorArray if direct_map else faiss.IDSelectorBatch)(
            ids.size, faiss.swig_ptr(ids))
        index.remove_ids(selector)
        index.add_with_ids(keys[start : start + 512], ids)
        times.append(time.perf_counter() - began)
    return float(np.median(times)) * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144])
    parser.add_argument("--nlists", type=int, nargs="+",
                        help="list counts to try (default: 4 and 8 sqrt(memories))")
    parser.add_argument("--nprobes", type=int, nargs="+", default=[4, 8, 12, 16, 20, 24, 32])
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(1)
    all_keys, all_queries, source = get_keys("model", None, max(args.sizes))
    queries = np.ascontiguousarray(all_queries[0].reshape(-1, all_queries.shape[-1]))
    rows, trainings, evictions = [], [], []
    for size in args.sizes:
        keys = np.ascontiguousarray(all_keys[0, -size:])
        flat_ms, kth = best_ms(lambda: exact_kth(keys, queries, K), 2)
        rows.append([size, "flat", "-", f"{flat_ms:.0f}", "-", "-", size, "1.000", "1.0x"])
        for nlist in args.nlists or (round(4 * np.sqrt(size)), round(8 * np.sqrt(size))):
            index, train_seconds = ivf(keys, nlist, direct_map=False)
            trainings.append([size, nlist, min(size, IVF_TRAIN_PER_LIST * nlist),
                              f"{train_seconds:.1f}",
                              f"{train_seconds * 1e3 / (size / ADD):.1f}"])
            for nprobe in args.nprobes:
                index.nprobe = nprobe
                search_ms, (_, found) = best_ms(lambda: index.search(queries, K))
                quant_ms, (dist, assign) = best_ms(lambda: index.quantizer.search(queries, nprobe))
                scan_ms, _ = best_ms(lambda: index.search_preassigned(queries, K, assign, dist))
                sizes = np.array([index.invlists.list_size(i) for i in range(nlist)])
                rows.append([size, nlist, nprobe, f"{search_ms:.0f}", f"{quant_ms:.0f}",
                             f"{scan_ms:.0f}", f"{sizes[assign].sum(1).mean():.0f}",
                             f"{recall(keys, queries, found, kth):.3f}", f"{flat_ms / search_ms:.1f}x"])
        for direct_map in (True, False):
            index, _ = ivf(keys, round(4 * np.sqrt(size)), direct_map)
            evictions.append([size, "hash-table map" if direct_map else "none (IDSelectorBatch)",
                              f"{eviction_ms(index, keys, direct_map):.1f}"])
    print(machine_line())
    print(f"One row's {queries.shape[0]} queries, k={K}, one faiss thread; keys: {source}.\n")
    print(table(["memories", "nlist", "nprobe", "search ms", "quantiser ms", "scan ms",
                 "keys scanned/query", "recall@32", "flat / this"], rows))
    print()
    print(table(["memories", "nlist", "keys trained on", "k-means s",
                 f"ms per step of {ADD} adds, over a turn of the ring"], trainings))
    print()
    print(table(["memories", "direct map", "remove + add 512 ms"], evictions))


if __name__ == "__main__":
    main()
