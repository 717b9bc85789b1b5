"""The seed package (memorizing-transformers-pytorch 0.4.1) as the benchmarks run it.

Its ``KNNMemory`` writes a float32 memmap of ``(rows, max_memories, 2, dim)`` per memory; every
helper here puts those files in a private temporary directory and removes it afterwards. Its index
is ``faiss.IndexHNSWFlat(dim, M=15, inner product)`` per row, searched with faiss' default
``efSearch`` of 16 (the seed never sets it), built with the default ``efConstruction`` of 40; when
a row's memory would exceed ``max_memories`` the seed wipes that row's index (not FIFO).

The package is installed by the ``bench`` extra with ``--no-deps`` (plus ``einops-exts`` and
``joblib``); ``available()`` says whether it can be imported.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager

SEED_PACKAGE = "memorizing-transformers-pytorch 0.4.1"
SEED_HNSW = "HNSW M=15, efSearch 16 (faiss default), efConstruction 40"


def available() -> str | None:
    """None if the seed package imports, else why not."""
    try:
        import memorizing_transformers_pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or one of its dependencies failing to import
        return f"{type(exc).__name__}: {exc}"
    return None


@contextmanager
def seed_memories(*, batch_size: int, num_memory_layers: int, dim: int, max_memories: int,
                  multiprocessing: bool = False):
    """The seed's ``KNNMemoryList`` with its memmaps in a temporary directory, removed on exit."""
    from memorizing_transformers_pytorch.knn_memory import KNNMemoryList

    directory = tempfile.mkdtemp(prefix="memtrans-bench-seed-")
    memories = None
    try:
        memories = KNNMemoryList.create_memories(
            batch_size=batch_size, num_memory_layers=num_memory_layers,
            memories_directory=directory)(dim=dim, max_memories=max_memories,
                                          multiprocessing=multiprocessing)
        yield memories
    finally:
        if memories is not None:
            memories.clear()  # drop the memmaps (Linux unlinks open files fine)
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def seed_model(**kwargs):
    """The seed's ``MemorizingTransformer(**kwargs)`` whose memmap directory is temporary."""
    from memorizing_transformers_pytorch import MemorizingTransformer

    directory = tempfile.mkdtemp(prefix="memtrans-bench-seed-")
    try:
        yield MemorizingTransformer(knn_memories_directory=directory, **kwargs)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def seed_knn(dim: int, max_memories: int):
    """One row's seed index (``KNN``): ``add(keys, ids)``, ``search(queries, k)`` -> ids."""
    from memorizing_transformers_pytorch.knn_memory import KNN

    return KNN(dim=dim, max_num_entries=max_memories, cap_num_entries=True)
