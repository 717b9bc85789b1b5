"""kNN memories for the model: in-process (``KNNMemory``) or on memory servers (``RemoteKNNMemory``).

Both are views of one memory layer over a *backend* that runs ``MemoryStore`` operations: in this
process on a worker thread (``LocalBackend``), or on ``memory-server`` daemons through a
``MemoryClient`` (``RemoteBackend``). Operations go to the backend in call order and the backend
applies them in that order, so an ``add`` never has to be waited for before the next ``search``:
the model sends adds and moves on, and their errors surface at the next search of that memory.

Tensors may live on a CUDA device: the model's thread only starts their copies to the host
(``transfer.to_host``) and each backend's own thread ("knn-memory...") waits for them, and
``retrieved`` gives the results on the queries' device through non-blocking copies of pinned
buffers. Nothing on the model's thread waits for the GPU (``tests/test_device.py``).

The classes are drop-in for ``memorizing_transformers_pytorch``'s ``KNNMemory`` and
``KNNMemoryList`` (same constructor arguments, ``add``/``search``/``clear``/``at_batch_indices``),
without its files on disk: memories live in RAM here or on the servers.
"""

from __future__ import annotations

import copy
import os
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from memory_server.store import MemoryStore, NamespaceConfig, Retrieval

from .transfer import HostCopy, pin_for, to_device, to_host

DEFAULT_KNN_MEMORY_MEMMAP_DIRECTORY = "./.tmp/knn.memories"
"""Kept for the seed's constructor arguments; nothing is written there (memories live in RAM)."""

SERVERS_ENV = "MEMTRANS_SERVERS"
SERVER_KEY_ENV = "MEMTRANS_SERVER_KEY"
CLIENT_KEY_ENV = "MEMTRANS_CLIENT_KEY"


@dataclass(frozen=True, slots=True)
class TensorRetrieval:
    """A ``Retrieval`` as tensors: ``keys`` and ``values`` ``(m, dim)`` (row 0 the "no memory"
    zeros) and ``positions`` ``(b, q, k)`` int32 into them, 0 where nothing was found."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def staged(cls, retrieval: Retrieval, device: torch.device) -> TensorRetrieval:
        """On the host, ready to go to ``device`` without waiting (pinned for CUDA)."""
        return cls(*(pin_for(torch.from_numpy(a), device)
                     for a in (retrieval.keys, retrieval.values, retrieval.positions)))

    def to(self, device: torch.device) -> TensorRetrieval:
        """On ``device``, copied ``non_blocking`` (from ``staged``)."""
        return TensorRetrieval(*(to_device(t, device)
                                 for t in (self.keys, self.values, self.positions)))

    @property
    def mask(self) -> torch.Tensor:
        return self.positions > 0


def _split(kv: HostCopy) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values ``(b, n, dim)`` of host key/values ``(b, n, 2, dim)``; waits for the copy."""
    array = kv.numpy()
    return np.ascontiguousarray(array[:, :, 0]), np.ascontiguousarray(array[:, :, 1])


class LocalBackend:
    """A private ``MemoryStore`` driven by one worker thread, so calls return futures in order.

    The worker waits for a call's device-to-host copy, runs the store, and stages the retrieval
    for the device: all off the model's thread.
    """

    def __init__(self, config: NamespaceConfig, *, threads: int = 1):
        self.config = config
        self.num_rows = config.num_rows
        self.namespace = "local"
        self.store = MemoryStore(threads=threads)
        self.store.open(self.namespace, config)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="knn-memory")

    def add_async(self, layer: int, rows: np.ndarray, kv: HostCopy) -> Future[None]:
        return self._worker.submit(lambda: self.store.add(self.namespace, layer, rows, *_split(kv)))

    def search_async(self, layer: int, rows: np.ndarray, queries: HostCopy, k: int,
                     device: torch.device) -> Future[TensorRetrieval]:
        def search():
            retrieval = self.store.search(self.namespace, layer, rows, queries.numpy(), k)
            return TensorRetrieval.staged(retrieval, device)

        return self._worker.submit(search)

    def clear(self, rows: np.ndarray, layers: list[int] | None = None) -> None:
        self._worker.submit(self.store.clear, self.namespace, rows, layers).result()

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        self.store.close()


class RemoteBackend:
    """One namespace on memory servers; local rows are offset to this rank's global rows.

    Calls go through one staging thread ("knn-memory-io"), in order: it waits for a call's
    device-to-host copy and hands the request to the client, whose I/O thread sends it and, as
    a search's reply completes, stages the retrieval for the device. Clears take the same queue,
    so they stay in order with the adds before them.
    """

    def __init__(self, client, namespace: str, config: NamespaceConfig, *, num_rows: int,
                 row_offset: int = 0, owns_namespace: bool = True):
        self.client = client
        self.namespace = namespace
        self.config = config
        self.num_rows = num_rows
        self.row_offset = row_offset
        self.owns_namespace = owns_namespace
        client.open(namespace, config)
        self._staging = ThreadPoolExecutor(1, thread_name_prefix="knn-memory-io")

    def add_async(self, layer: int, rows: np.ndarray, kv: HostCopy) -> Future[None]:
        rows = rows + self.row_offset
        return _flatten(self._staging.submit(
            lambda: self.client.add_async(self.namespace, layer, rows, *_split(kv))))

    def search_async(self, layer: int, rows: np.ndarray, queries: HostCopy, k: int,
                     device: torch.device) -> Future[TensorRetrieval]:
        rows = rows + self.row_offset
        return _flatten(self._staging.submit(
            lambda: self.client.search_async(self.namespace, layer, rows, queries.numpy(), k)),
            lambda retrieval: TensorRetrieval.staged(retrieval, device))

    def clear(self, rows: np.ndarray, layers: list[int] | None = None) -> None:
        rows = rows + self.row_offset
        self._staging.submit(self.client.clear, self.namespace, rows, layers).result()

    def close(self) -> None:
        try:
            self._staging.shutdown(wait=True)
            if self.owns_namespace:
                self.client.drop(self.namespace)
        finally:
            self.client.close()


@dataclass(frozen=True, slots=True)
class PendingSearch:
    """A search under way, with the adds sent before it (whose errors it reports)."""

    future: Future[TensorRetrieval]
    """The retrieval staged on the host for ``device``."""
    adds_before: list[Future]
    device: torch.device
    """Where the queries were, and so where the retrieval goes."""


class KNNMemory:
    """The kNN memory of one memorizing layer for a batch of ``num_indices`` rows.

    ``add(memories)`` takes ``(b, n, 2, dim)`` key/values; ``search(queries, topk)`` takes
    ``(b, ..., dim)`` queries and returns key/values ``(b, ..., topk, 2, dim)`` and a mask
    ``(b, ..., topk)``. ``b`` is the number of scoped rows (all rows unless ``at_batch_indices``).
    ``index`` is ``flat`` (exact), ``ivf`` (``nlist``/``nprobe``, 0 for the defaults) or ``hnsw``
    (``ef_search``); ``key_dtype``/``value_dtype`` ``float16`` store keys/values at half the
    bytes; ``multiprocessing`` searches rows on all cores.
    """

    def __init__(self, dim: int, max_memories: int = 16000, num_indices: int = 1,
                 memmap_filename: str | None = None, multiprocessing: bool = True, *,
                 index: str = "flat", value_dtype: str = "float32", key_dtype: str = "float32",
                 ef_search: int = 128, nlist: int = 0, nprobe: int = 0):
        config = NamespaceConfig(dim=dim, max_memories=max_memories, num_layers=1,
                                 num_rows=num_indices, index=index, value_dtype=value_dtype,
                                 key_dtype=key_dtype, ef_search=ef_search, nlist=nlist,
                                 nprobe=nprobe)
        backend = LocalBackend(config, threads=_threads(multiprocessing))
        self._attach(backend, 0, owns_backend=True)

    @classmethod
    def _on(cls, backend, layer: int, *, owns_backend: bool = False) -> KNNMemory:
        memory = cls.__new__(cls)
        memory._attach(backend, layer, owns_backend=owns_backend)
        return memory

    def _attach(self, backend, layer: int, *, owns_backend: bool) -> None:
        self.backend = backend
        self.layer = layer
        self.dim = backend.config.dim
        self.max_memories = backend.config.max_memories
        self.num_indices = backend.num_rows
        self.scoped_indices = list(range(self.num_indices))
        self._owns_backend = owns_backend
        self._pending_adds: list[Future] = []

    # scoping (seed API)

    def set_scoped_indices(self, indices) -> None:
        indices = [int(i) for i in indices]
        if len(set(indices)) != len(indices):
            raise ValueError(f"scoped batch indices must be distinct, got {indices}")
        if not all(0 <= i < self.num_indices for i in indices):
            raise ValueError(f"each batch index must be in [0, {self.num_indices}), got {indices}")
        self.scoped_indices = indices

    @contextmanager
    def at_batch_indices(self, indices):
        previous = self.scoped_indices
        self.set_scoped_indices(indices)
        try:
            yield self
        finally:
            self.scoped_indices = previous

    # operations

    def add(self, memories: torch.Tensor) -> None:
        """Append key/values ``(b, n, 2, dim)``; returns without waiting for the store.

        A CPU tensor is read later, on the memory's thread: do not change it in place before
        ``collect_adds`` (a CUDA tensor is copied, in stream order, when this is called)."""
        self.add_async(memories)

    def add_async(self, memories: torch.Tensor) -> Future:
        memories = self._check(memories, "memories", (len(self.scoped_indices), None, 2, self.dim))
        future = self.backend.add_async(self.layer, self._rows(), to_host(memories))
        self._pending_adds.append(future)
        return future

    def search_async(self, queries: torch.Tensor, topk: int) -> PendingSearch:
        """Start a search of ``(b, ..., dim)`` queries; ``retrieved`` gives its result."""
        if not isinstance(topk, int) or not 1 <= topk <= self.max_memories:
            raise ValueError(f"topk must be an integer in [1, max_memories={self.max_memories}], "
                             f"got {topk!r}")
        queries = self._check(queries, "queries", (len(self.scoped_indices), ..., self.dim))
        flat = to_host(queries.reshape(queries.shape[0], -1, self.dim))
        future = self.backend.search_async(self.layer, self._rows(), flat, topk, queries.device)
        return PendingSearch(future, self._take_pending_adds(), queries.device)

    def retrieved(self, pending: PendingSearch) -> TensorRetrieval:
        """Wait for a search; its retrieval on the queries' device (``positions`` ``(b, q, k)``
        for the ``q`` queries of each row, flattened). An error of an add sent before it is
        raised here."""
        retrieval = pending.future.result()
        _raise_first_error(pending.adds_before)
        return retrieval.to(pending.device)

    def search(self, queries: torch.Tensor, topk: int, nprobe: int | None = None,
               increment_hits: bool = True, increment_age: bool = True):
        """Top-``topk`` key/values ``(b, ..., topk, 2, dim)`` and mask ``(b, ..., topk)``.

        ``nprobe`` per search is not supported: an ``ivf`` memory takes it in its config, and other
        indices have none; passing it is an error rather than silently ignored (the seed ignored
        it). The hit and age counters of
        the seed are not kept; their flags are accepted for compatibility.
        """
        if nprobe is not None:
            raise ValueError("nprobe applies to IVF indices and is set when the memories are "
                             "made (index='ivf', nprobe=...); this memory's index is "
                             f"{self.backend.config.index!r}")
        retrieval = self.retrieved(self.search_async(queries, topk))
        table = torch.stack((retrieval.keys.float(), retrieval.values.float()), dim=1)
        lead = tuple(queries.shape[:-1])
        kv = table[retrieval.positions.long()].reshape(*lead, topk, 2, self.dim)
        return kv, retrieval.mask.reshape(*lead, topk)

    def collect_adds(self) -> None:
        """Wait for every add sent so far and raise the first error among them."""
        _raise_first_error(self._take_pending_adds())

    def _take_pending_adds(self) -> list[Future]:
        # In place: row-group views share this list with the memory they were made from.
        pending = list(self._pending_adds)
        self._pending_adds.clear()
        return pending

    def row_group(self, batch_rows) -> KNNMemory:
        """A view of some of the scoped batch rows (positions in the batch), for micro-batches.

        It shares the backend and the list of adds under way, so errors are still collected.
        """
        view = copy.copy(self)
        view.scoped_indices = [self.scoped_indices[r] for r in batch_rows]
        view._owns_backend = False
        return view

    def clear(self, batch_indices=None) -> None:
        """Empty the memories of ``batch_indices`` (absolute rows, default all)."""
        if batch_indices is None:
            batch_indices = range(self.num_indices)
        rows = np.array(sorted(set(_as_list(batch_indices))), dtype=np.int64)
        if rows.size == 0:
            return
        if rows.min() < 0 or rows.max() >= self.num_indices:
            raise ValueError(f"batch indices must be in [0, {self.num_indices}), got {rows.tolist()}")
        self.collect_adds()
        self.backend.clear(rows, [self.layer])

    def close(self) -> None:
        try:
            self.collect_adds()
        finally:
            if self._owns_backend:
                self.backend.close()

    def _rows(self) -> np.ndarray:
        return np.asarray(self.scoped_indices, dtype=np.int64)

    def _check(self, tensor: torch.Tensor, name: str, shape: tuple) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        ok = _shape_matches(tuple(tensor.shape), shape)
        if not ok:
            want = ", ".join("..." if s is ... else "*" if s is None else str(s) for s in shape)
            raise ValueError(f"{name} must have shape ({want}) (batch = {len(self.scoped_indices)} "
                             f"scoped rows, dim = {self.dim}), got {tuple(tensor.shape)}")
        return tensor


class RemoteKNNMemory(KNNMemory):
    """A ``KNNMemory`` whose store is on memory servers; create it with ``create_knn_memories``."""

    def __init__(self, *args, **kwargs):
        raise TypeError("create remote memories with model.create_knn_memories(batch_size=..., "
                        "servers=[...]) or RemoteKNNMemory.create(...)")

    @classmethod
    def create(cls, servers, *, dim: int, max_memories: int, batch_size: int, num_layers: int = 1,
               namespace: str | None = None, rank: int = 0, world_size: int = 1,
               index: str = "flat", value_dtype: str = "float32", key_dtype: str = "float32",
               ef_search: int = 128, nlist: int = 0, nprobe: int = 0, timeout: float = 60.0,
               server_public_key=None, secret_key=None) -> KNNMemoryList:
        """Memories of ``num_layers`` layers for this rank's ``batch_size`` rows on ``servers``.

        Rows are global across ranks (``rank * batch_size + local_row``); every rank must pass the
        same ``namespace`` (``create_knn_memories`` picks one on rank 0 and broadcasts it).
        CURVE: ``server_public_key`` and this client's ``secret_key`` (key files, or Z85 keys
        inline as bytes or ``"z85:KEY"``), by default from ``MEMTRANS_SERVER_KEY`` and
        ``MEMTRANS_CLIENT_KEY`` when set.
        """
        from memory_server.client import MemoryClient

        config = NamespaceConfig(dim=dim, max_memories=max_memories, num_layers=num_layers,
                                 num_rows=batch_size * world_size, index=index,
                                 value_dtype=value_dtype, key_dtype=key_dtype,
                                 ef_search=ef_search, nlist=nlist, nprobe=nprobe)
        server_public_key = server_public_key or os.environ.get(SERVER_KEY_ENV) or None
        secret_key = secret_key or os.environ.get(CLIENT_KEY_ENV) or None
        client = MemoryClient(_as_servers(servers), timeout=timeout,
                              server_public_key=server_public_key, secret_key=secret_key)
        try:
            backend = RemoteBackend(client, namespace or f"memtrans-{uuid.uuid4().hex[:12]}", config,
                                    num_rows=batch_size, row_offset=rank * batch_size,
                                    owns_namespace=rank == 0)
        except BaseException:
            client.close()
            raise
        return KNNMemoryList([cls._on(backend, layer) for layer in range(num_layers)],
                             backend=backend)


class KNNMemoryList(list):
    """The memories of every memorizing layer (seed API), owning their shared backend."""

    def __init__(self, memories=(), *, backend=None):
        super().__init__(memories)
        self.backend = backend

    @classmethod
    def create_memories(cls, *, batch_size: int, num_memory_layers: int,
                        memories_directory: str = DEFAULT_KNN_MEMORY_MEMMAP_DIRECTORY):
        """Seed API: returns a function of ``KNNMemory`` arguments that builds the list."""

        def inner(dim: int, max_memories: int = 16000, multiprocessing: bool = True, *,
                  index: str = "flat", value_dtype: str = "float32",
                  key_dtype: str = "float32", ef_search: int = 128, nlist: int = 0,
                  nprobe: int = 0):
            if num_memory_layers == 0:
                return cls([])
            config = NamespaceConfig(dim=dim, max_memories=max_memories,
                                     num_layers=num_memory_layers, num_rows=batch_size,
                                     index=index, value_dtype=value_dtype, key_dtype=key_dtype,
                                     ef_search=ef_search, nlist=nlist, nprobe=nprobe)
            backend = LocalBackend(config, threads=_threads(multiprocessing))
            return cls([KNNMemory._on(backend, layer) for layer in range(num_memory_layers)],
                       backend=backend)

        return inner

    @contextmanager
    def at_batch_indices(self, indices):
        with ExitStack() as stack:
            for memory in self:
                stack.enter_context(memory.at_batch_indices(indices))
            yield self

    def clear_memory(self, batch_indices=None, memory_indices=None) -> None:
        memory_indices = range(len(self)) if memory_indices is None else memory_indices
        for index in memory_indices:
            self[index].clear(batch_indices)

    def collect_adds(self) -> None:
        for memory in self:
            memory.collect_adds()

    def cleanup(self) -> None:
        """Wait for outstanding adds and free the memories (remote: drop the namespace)."""
        try:
            self.collect_adds()
        finally:
            if self.backend is not None:
                self.backend.close()
                self.backend = None


def _flatten(staged: Future[Future], then=None) -> Future:
    """The result of the future that ``staged`` gives (``then`` of it), or the first error."""
    out: Future = Future()
    out.set_running_or_notify_cancel()

    def inner_done(inner: Future) -> None:
        try:
            result = inner.result()
            out.set_result(result if then is None else then(result))
        except BaseException as exc:  # handed on to whoever waits for ``out``
            out.set_exception(exc)

    def staged_done(f: Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
        else:
            f.result().add_done_callback(inner_done)

    staged.add_done_callback(staged_done)
    return out


def _raise_first_error(futures: list[Future]) -> None:
    errors = [exc for exc in (f.exception() for f in futures) if exc is not None]
    if errors:
        raise errors[0]


def _threads(multiprocessing: bool) -> int:
    return max(1, os.cpu_count() or 1) if multiprocessing else 1


def _as_list(indices) -> list[int]:
    if isinstance(indices, torch.Tensor):
        return indices.flatten().tolist()
    if isinstance(indices, (int, np.integer)):
        return [int(indices)]
    return [int(i) for i in indices]


def _as_servers(servers) -> list[str]:
    if isinstance(servers, str):
        servers = [s.strip() for s in servers.split(",") if s.strip()]
    servers = list(servers)
    if not servers:
        raise ValueError("no memory servers given: pass endpoints like ['tcp://host:5555'] or set "
                         f"{SERVERS_ENV}=tcp://host:5555,tcp://host2:5555")
    return servers


def servers_from_env() -> list[str] | None:
    value = os.environ.get(SERVERS_ENV, "").strip()
    return _as_servers(value) if value else None


def _shape_matches(shape: tuple, pattern: tuple) -> bool:
    if ... in pattern:
        head = pattern[: pattern.index(...)]
        tail = pattern[pattern.index(...) + 1 :]
        if len(shape) < len(head) + len(tail):
            return False
        return _shape_matches(shape[: len(head)], head) and \
            _shape_matches(shape[len(shape) - len(tail) :], tail)
    return len(shape) == len(pattern) and all(p is None or s == p for s, p in zip(shape, pattern))
