"""Memory add/search cost and recall: the seed's KNNMemory, memtrans in-process and remote.

The workload of one memorizing layer's step at the issue's configuration: batch 8, 8 heads x 512
queries per row, k=32, dim 64, memories of 16K and 64K (and, with ``--sizes``, 262K) entries per
row, ``flat``, ``hnsw`` and ``ivf``.

Keys and queries come from a trained model by default: the l2-normalised keys (``to_kv``, key half)
and queries (``to_q``) of the first memorizing layer of a small memtrans model (dim_head 64) run
over the Python standard library's sources, 8 rows each reading its own stretch of text. Each row's
memory holds the keys of the ``size`` tokens just before the 512 tokens whose queries search it.
The model is ``--checkpoint``, else one trained once for ~2 minutes (``memtrans-train --steps 150
--memory inproc --dim-head 64 --heads 8``) and cached with its keys under ``$XDG_CACHE_HOME/memtrans/bench``.
``--keys random`` (or a failure to get model keys, which is reported) uses random unit vectors.

Rows:

- ``seed``: the seed package's ``KNNMemory`` (HNSW M=15, efSearch 16; memmaps in a temporary
  directory, removed after); its ``search`` returns the dense ``(b, h, q, k, 2, d)`` tensor.
- ``inproc``: memtrans ``KNNMemory`` (one worker thread, as in the model); search is
  ``retrieved(search_async(...))``, the compact form the model consumes.
- ``remote1`` / ``remote2``: ``RemoteKNNMemory`` on 1 / 2 local ``memory-server`` processes (rows
  sharded ``row % servers``); times include the wire both ways and the client's merge.

``add ms`` is the median of the last ``--reps`` adds of 512 tokens per row that fill the memory
(each waited for). The memory is then given one more ring's worth of adds (the same keys again),
and ``add ms/step`` is their mean: the add cost of a step in steady state, with the ``ivf``
retraining that a turn of the ring brings amortised in it (the seed's memory is not turned).
``search ms`` is the median of ``--reps`` searches (after one warm-up) of the full memory, after
that turn; ``step ms`` = search + amortised add, the memory's cost per step and layer, and
``flat / this`` compares it with ``flat`` on the same memory kind. ``server RSS`` is the resident
memory of the server processes (all of them) with the full memories. Bytes on the wire are array
payload per search: the queries plus the compact reply. Recall@32 is measured on the index code
itself (memtrans ``Memory``, the seed's ``KNN``) against an exact inner-product search of the same
keys, on ``--recall-rows`` rows; for ``ivf`` after the fill (centroids from the oldest
32 x nlist keys) and after a turn of the ring (retrained on the full ring), at the default nprobe
and each of ``--nprobes`` (with the time of one row's search on one thread).

``--compressed`` adds the compressed-keys table: ``flat`` and ``ivf`` with float32 keys and
values against float16 keys and values (``key_dtype``/``value_dtype``), each memory (``--recall-rows``
rows) filled 512 at a time and given one more turn of its ring, as above; recall@32 against an
exact float32 search of the model's (unrounded) keys, one row's search on one faiss thread, the
bytes per entry ``--max-bytes`` books (``Memory.bytes_per_slot``) and what a fresh memory
server's resident memory grew by per entry when given the same memories (RSS, measured), and
memories per GiB from it.

    python -m bench.memory                                  # everything (~6-10 minutes on 2 cores)
    python -m bench.memory --sizes 16384 --memories inproc remote1 --indexes flat
    python -m bench.memory --keys random --no-recall
    python -m bench.memory --sizes 16384 65536 262144 --indexes flat ivf --memories inproc remote1
    python -m bench.memory --sizes 16384 65536 --memories --no-recall --compressed
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from memory_server.index import ivf_nlist, ivf_nprobe
from memory_server.local import start_servers
from memory_server.store import Memory, NamespaceConfig
from memtrans import RemoteKNNMemory
from memtrans.memory import KNNMemoryList

from .common import machine_line, table, timed

BATCH, HEADS, QUERIES, K, DIM, ADD = 8, 8, 512, 32, 64, 512
MEMORIES = ("seed", "inproc", "remote1", "remote2")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "memtrans" / "bench"
TRAIN_ARGS = ("--steps", "150", "--memory", "inproc", "--dim-head", "64", "--heads", "8",
              "--eval-every", "0",
              "--eval-batches", "1", "--checkpoint-every", "0")


# -----------------------------------------------------------------------------
# keys and queries


def unit(*shape) -> np.ndarray:
    return torch.nn.functional.normalize(torch.randn(*shape), dim=-1).numpy()


def random_keys(tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit keys ``(BATCH, tokens, DIM)`` and queries ``(BATCH, HEADS, QUERIES, DIM)``."""
    return unit(BATCH, tokens, DIM), unit(BATCH, HEADS, QUERIES, DIM)


def train_checkpoint() -> Path:
    out = CACHE / "model"
    path = out / "checkpoint.pt"
    if not path.is_file():
        print(f"training a small model for its keys (~2 min): {out}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "memtrans.train", *TRAIN_ARGS, "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
    return path


def stdlib_tokens(total: int) -> np.ndarray:
    """``total`` byte tokens of the standard library's .py sources, in sorted path order."""
    from memtrans.data import encode

    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, have = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(encode(data))
        have += len(data)
        if have >= total:
            break
    tokens = np.concatenate(chunks)
    if tokens.size < total:
        raise RuntimeError(f"the standard library has only {tokens.size} bytes of .py, need {total}")
    return tokens[:total]


@torch.no_grad()
def model_keys(checkpoint: Path, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys ``(BATCH, tokens, DIM)`` and the queries of the next QUERIES tokens, from a model."""
    from memtrans.build import build_model
    from memtrans.checkpoint import resolve_config

    from .step import ZeroMemory

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = resolve_config({}, state, checkpoint)
    if config.dim_head != DIM:
        raise RuntimeError(f"{checkpoint} has dim_head {config.dim_head}, the benchmark needs {DIM}")
    model = build_model(config)
    model.load_state_dict(state["model"])
    model.eval()
    attn = model.layers[model.memorizing_layers[0] - 1][0].fn
    got = {"k": [], "q": []}
    # The keys the memory stores and the queries it is searched with: after the layer's
    # convolutions or smear (when it has them), before they are normalised.
    key_source = attn.key_conv or attn.key_smear
    hooks = [key_source.register_forward_hook(lambda m, i, out: got["k"].append(out))
             if key_source is not None else attn.to_kv.register_forward_hook(
                 lambda m, i, out: got["k"].append(out[..., :DIM])),
             (attn.query_conv or attn.to_q).register_forward_hook(
                 lambda m, i, out: got["q"].append(out))]
    seq, heads = config.seq_len, config.heads
    # A model with fewer heads than HEADS gives the queries of more tokens instead.
    query_tokens = QUERIES * -(-HEADS // heads)
    total = tokens + query_tokens
    steps = -(-total // seq)
    text = torch.from_numpy(stdlib_tokens(BATCH * steps * seq).reshape(BATCH, steps * seq))
    memories = [ZeroMemory(BATCH, DIM) for _ in model.memorizing_layers]
    xl = None
    try:
        for s in range(steps):
            out = model(text[:, s * seq : (s + 1) * seq], memories, xl_memories=xl)
            if isinstance(out, tuple):
                xl = out[1]
    finally:
        for hook in hooks:
            hook.remove()
    keys = torch.nn.functional.normalize(torch.cat(got["k"], dim=1)[:, :tokens], dim=-1)
    q = torch.cat(got["q"], dim=1)[:, tokens:total].reshape(BATCH, query_tokens, heads, DIM)
    q = q.transpose(1, 2).reshape(BATCH, -1, QUERIES, DIM)[:, :HEADS]
    q = torch.nn.functional.normalize(q, dim=-1)
    return keys.contiguous().numpy(), q.contiguous().numpy()


def get_keys(source: str, checkpoint: str | None, tokens: int) -> tuple[np.ndarray, np.ndarray, str]:
    if source == "random":
        return (*random_keys(tokens), "random unit vectors")
    try:
        path = Path(checkpoint) if checkpoint else train_checkpoint()
        tag = hashlib.sha1(f"{path.resolve()}:{path.stat().st_mtime}".encode()).hexdigest()[:16]
        cached = CACHE / f"keys-{tag}-{tokens}.npz"
        # Keys of more tokens serve too: their last ``tokens`` keys precede the same queries.
        larger = sorted((int(f.stem.rsplit("-", 1)[1]), f) for f in CACHE.glob(f"keys-{tag}-*.npz")
                        if int(f.stem.rsplit("-", 1)[1]) >= tokens)
        if larger:
            data = np.load(larger[0][1])
            keys, queries = data["keys"][:, -tokens:], data["queries"]
        else:
            started = time.perf_counter()
            keys, queries = model_keys(path, tokens)
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cached, keys=keys, queries=queries)
            print(f"collected model keys in {time.perf_counter() - started:.0f} s: {cached}",
                  file=sys.stderr, flush=True)
        return keys, queries, f"model keys/queries ({path}, first memorizing layer, stdlib text)"
    except Exception as exc:  # report it and measure on random keys rather than nothing
        print(f"could not get model keys ({type(exc).__name__}: {exc}); using random keys",
              file=sys.stderr, flush=True)
        return (*random_keys(tokens), f"random unit vectors (model keys failed: {exc})")


# -----------------------------------------------------------------------------
# timing


def _kv(keys: np.ndarray, start: int, n: int) -> torch.Tensor:
    k = torch.from_numpy(keys[:, start : start + n])
    return torch.stack((k, torch.randn(k.shape)), dim=-2)


def _fill(memory, keys: np.ndarray, seed: bool) -> list[float]:
    """Add ``keys`` 512 per row at a time, each waited for; their times."""
    times = []
    for start in range(0, keys.shape[1], ADD):
        began = time.perf_counter()
        memory.add(_kv(keys, start, ADD))
        if not seed:
            memory.collect_adds()
        times.append(time.perf_counter() - began)
    return times


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def measure(memory, keys: np.ndarray, queries: np.ndarray, size: int, reps: int,
            seed: bool = False, servers=()) -> dict:
    """Fill ``memory`` with the last ``size`` keys (timing the last adds), turn its ring once
    more with the same keys (timing every add), then time searches."""
    keys = keys[:, keys.shape[1] - size :]
    add_times = _fill(memory, keys, seed)
    turn_times = add_times if seed else _fill(memory, keys, seed)
    q = torch.from_numpy(queries)
    last = {}

    def search():
        if seed:
            last["r"] = memory.search(q, K)
        else:
            last["r"] = memory.retrieved(memory.search_async(q, K))

    search_s = timed(search, reps)
    out = dict(search=search_s, add=float(np.median(add_times[-reps:])),
               add_step=float(np.mean(turn_times)), request=q.numel() * 4,
               rss=sum(rss_bytes(s.proc.pid) for s in servers) if servers else None)
    if not seed:
        r = last["r"]
        out["reply"] = r.keys.nbytes + r.values.nbytes + r.positions.nbytes
    return out


def run_memory(kind: str, index: str, size: int, keys, queries, reps: int, flags,
               options: dict) -> dict | None:
    if kind == "seed":
        if index != "hnsw":
            return None
        from .seed import seed_memories

        with seed_memories(batch_size=BATCH, num_memory_layers=1, dim=DIM,
                           max_memories=size) as memories:
            return measure(memories[0], keys, queries, size, reps, seed=True)
    if kind == "inproc":
        memories = KNNMemoryList.create_memories(batch_size=BATCH, num_memory_layers=1)(
            dim=DIM, max_memories=size, multiprocessing=False, index=index, **options)
        try:
            return measure(memories[0], keys, queries, size, reps)
        finally:
            memories.cleanup()
    count = int(kind[-1])
    servers = start_servers(count, *flags)
    try:
        memories = RemoteKNNMemory.create([s.endpoint for s in servers], dim=DIM,
                                          max_memories=size, batch_size=BATCH, index=index,
                                          timeout=600, **options)
        try:
            return measure(memories[0], keys, queries, size, reps, servers=servers)
        finally:
            memories.cleanup()
    finally:
        for server in servers:
            server.stop()


# -----------------------------------------------------------------------------
# recall


TIE = 1e-5
"""Score tolerance of a tie: exact search (BLAS) and an index (its own dot products) round the
same inner product differently by about 1e-7."""


def exact_kth(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Each query's k-th best exact score: what a returned entry must reach to count."""
    import faiss

    return faiss.knn(queries, keys, k, metric=faiss.METRIC_INNER_PRODUCT)[0][:, -1]


def recall(keys: np.ndarray, queries: np.ndarray, found: np.ndarray, kth: np.ndarray) -> float:
    """Recall@K with ties counted (ann-benchmarks' definition): the share of returned entries
    (``found``: positions in ``keys``, -1 for none) whose exact score reaches the query's k-th
    exact score. Identical keys score the same, and a memorizing layer that sees only the last
    few tokens stores many: three quarters of the bench model's keys at 64K are copies of another
    (repeated 8-grams of code). Which copies make the top k is arbitrary, for exact search too,
    so matching its ids counted equally good answers as misses."""
    valid = found >= 0
    scores = np.einsum("qd,qkd->qk", queries, keys[np.where(valid, found, 0)])
    return float(((scores >= kth[:, None] - TIE) & valid).sum() / found.size)


def ivf_recall(k: np.ndarray, q: np.ndarray, kth: np.ndarray, probes: list[int]) -> dict:
    """Recall@K of an ivf memory filled 512 at a time at each nprobe, after the fill and after
    one more turn of its ring (the same keys: slots stay sequence numbers), and the seconds of
    that last search: nprobe -> (recall after fill, recall after turn, seconds)."""
    memory = Memory(NamespaceConfig(dim=DIM, max_memories=k.shape[0], num_layers=1, num_rows=1,
                                    index="ivf"))
    found, seconds = {p: [] for p in probes}, {}
    for _ in range(2):
        for start in range(0, k.shape[0], ADD):
            memory.add(k[start : start + ADD], k[start : start + ADD])
        for p in probes:
            memory.index.nprobe = p  # a search-time setting: one trained index for the sweep
            began = time.perf_counter()
            slots = memory.search(q, K)
            seconds[p] = time.perf_counter() - began
            found[p].append(recall(k, q, slots, kth))
    return {p: (*found[p], seconds[p]) for p in probes}


def measure_recall(keys: np.ndarray, queries: np.ndarray, size: int, rows: int, hnsw: bool,
                   ivf: bool, nprobes: list[int]) -> dict:
    """Recall@K against exact search of memtrans hnsw and the seed's HNSW (``hnsw``), and of
    ivf (``ivf``) at the default nprobe and at ``nprobes``."""
    from .seed import available, seed_knn

    config = NamespaceConfig(dim=DIM, max_memories=size, num_layers=1, num_rows=1, index="hnsw")
    default = ivf_nprobe(ivf_nlist(size, 0), 0)
    probes = sorted({default, *(p for p in nprobes if p <= ivf_nlist(size, 0))}) if ivf else []
    ours, seed, found = [], [], {p: [] for p in probes}
    threads = faiss_threads(1)  # one row's search on one thread, as a server's row thread
    try:
        for row in range(rows):
            k = np.ascontiguousarray(keys[row, keys.shape[1] - size :])
            q = np.ascontiguousarray(queries[row].reshape(-1, DIM))
            kth = exact_kth(k, q, K)
            if probes:
                for p, got in ivf_recall(k, q, kth, probes).items():
                    found[p].append(got)
            if not hnsw:
                continue
            memory = Memory(config)
            memory.add(k, np.zeros_like(k))
            slots = memory.search(q, K)  # slots == sequence numbers: the ring never wrapped
            ours.append(recall(k, q, slots, kth))
            if available() is None:
                knn = seed_knn(DIM, size)
                knn.add(k, ids=np.arange(size))
                seed.append(recall(k, q, knn.search(q, K), kth))
    finally:
        faiss_threads(threads)
    return dict(hnsw=float(np.mean(ours)) if ours else None,
                seed=float(np.mean(seed)) if seed else None,
                default=default, ivf={p: np.mean(v, axis=0) for p, v in found.items()})


COMPRESSED = [("flat", "float32"), ("ivf", "float32"), ("flat", "float16"), ("ivf", "float16")]
"""(index, key and value dtype) of ``--compressed``."""


def server_bytes_per_entry(config: NamespaceConfig, ks: list[np.ndarray]) -> float:
    """What a fresh memory server's RSS grows by per entry, filled and turned as ``ks``."""
    from memory_server import MemoryClient

    (server,) = start_servers(1)
    try:
        with MemoryClient(server.endpoint, timeout=600) as client:
            # Trained, searched and dropped memories first, one per row thread: the server's
            # one-time allocations (BLAS and OpenMP buffers, tens of MB) are not counted per entry.
            rows = np.arange(len(ks))
            warm = NamespaceConfig(dim=DIM, max_memories=4096, num_layers=1, num_rows=len(ks),
                                   index="ivf", key_dtype=config.key_dtype)
            first = np.ascontiguousarray(np.stack([k[:4096] for k in ks]))
            client.open("warm", warm)
            client.add("warm", 0, rows, first, first)
            client.search("warm", 0, rows, first[:, :512], K)
            client.drop("warm")
            client.open("rss", config)
            before = rss_bytes(server.proc.pid)
            stacked = np.stack(ks)
            for _ in range(2):
                for start in range(0, stacked.shape[1], ADD):
                    part = np.ascontiguousarray(stacked[:, start : start + ADD])
                    client.add("rss", 0, rows, part, part)
            return (rss_bytes(server.proc.pid) - before) / (stacked.shape[0] * stacked.shape[1])
    finally:
        server.stop()


def compressed_rows(keys: np.ndarray, queries: np.ndarray, size: int, rows: int) -> list[list]:
    """For each of ``COMPRESSED``: recall@K against exact float32 search, one row's search on
    one thread, and bytes per entry booked and measured (a server's RSS growth)."""
    threads = faiss_threads(1)
    out = []
    try:
        ks = [np.ascontiguousarray(keys[r, keys.shape[1] - size :]) for r in range(rows)]
        qs = [np.ascontiguousarray(queries[r].reshape(-1, DIM)) for r in range(rows)]
        kths = [exact_kth(k, q, K) for k, q in zip(ks, qs)]
        for index, dtype in COMPRESSED:
            config = NamespaceConfig(dim=DIM, max_memories=size, num_layers=1, num_rows=rows,
                                     index=index, key_dtype=dtype, value_dtype=dtype)
            grown = server_bytes_per_entry(config, ks)
            memories = [Memory(config) for _ in range(rows)]
            for memory, k in zip(memories, ks):
                for _ in range(2):  # the fill, then a turn of the ring (slot = position in k)
                    for start in range(0, size, ADD):
                        memory.add(k[start : start + ADD], k[start : start + ADD])
            found, seconds = [], []
            for memory, k, q, kth in zip(memories, ks, qs, kths):
                began = time.perf_counter()
                slots = memory.search(q, K)
                seconds.append(time.perf_counter() - began)
                found.append(recall(k, q, slots, kth))
            label = index if index == "flat" else \
                f"ivf {memories[0].index.nlist} lists, nprobe {memories[0].index.nprobe}"
            out.append([f"{size // 1024}K", label, dtype, f"{np.mean(found):.3f}",
                        f"{np.median(seconds) * 1e3:.0f}", f"{memories[0].bytes_per_slot:,}",
                        f"{grown:,.0f}", f"{2**30 / grown / 1e6:.2f}"])
            print(f"[compressed] {' | '.join(map(str, out[-1]))}", file=sys.stderr, flush=True)
            del memories
    finally:
        faiss_threads(threads)
    return out


HNSW_SWEEP = [(segments, m, ef) for segments in (1, 4) for m in (16, 32) for ef in (32, 64, 128)]
"""(hnsw_segments, hnsw_m, ef_search) of ``--hnsw-sweep``."""


def hnsw_sweep(keys: np.ndarray, queries: np.ndarray, size: int) -> list[list]:
    """Recall@K and one row's search time (one faiss thread) of memtrans hnsw settings and of
    flat, on row 0: whether any HNSW setting beats exact search."""
    k = np.ascontiguousarray(keys[0, keys.shape[1] - size :])
    q = np.ascontiguousarray(queries[0].reshape(-1, DIM))
    threads = faiss_threads(1)
    try:
        kth = exact_kth(k, q, K)
        flat = Memory(NamespaceConfig(dim=DIM, max_memories=size, num_layers=1, num_rows=1))
        flat.add(k, k)
        rows = [[f"{size // 1024}K", "flat", "-", "-", "-", "1.000",
                 f"{timed(lambda: flat.search(q, K), 1) * 1e3:.0f}"]]
        for segments, m in sorted({(s, m) for s, m, _ in HNSW_SWEEP}):
            memory = Memory(NamespaceConfig(dim=DIM, max_memories=size, num_layers=1, num_rows=1,
                                            index="hnsw", hnsw_m=m, hnsw_segments=segments))
            for start in range(0, size, ADD):
                memory.add(k[start : start + ADD], k[start : start + ADD])
            for ef in sorted(e for s, mm, e in HNSW_SWEEP if (s, mm) == (segments, m)):
                memory.index.ef_search = ef  # a search-time setting: no rebuild needed
                seconds = timed(lambda: memory.search(q, K), 1)
                rows.append([f"{size // 1024}K", "hnsw", segments, m, ef,
                             f"{recall(k, q, memory.search(q, K), kth):.3f}", f"{seconds * 1e3:.0f}"])
    finally:
        faiss_threads(threads)
    return rows


def faiss_threads(n: int) -> int:
    """Set faiss's OpenMP threads; returns what it was."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    return before


# -----------------------------------------------------------------------------


LABELS = {"seed": "seed KNNMemory", "inproc": "memtrans in-process", "remote1": "remote, 1 server",
          "remote2": "remote, 2 servers"}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--indexes", nargs="+", default=["flat", "hnsw", "ivf"],
                        choices=["flat", "hnsw", "ivf"])
    parser.add_argument("--memories", nargs="*", default=list(MEMORIES), choices=MEMORIES,
                        help="memory kinds to time (none: only the recall tables)")
    parser.add_argument("--server-threads", type=int, default=None,
                        help="memory-server --threads (default: its own default, all cores)")
    parser.add_argument("--keys", choices=["model", "random"], default="model")
    parser.add_argument("--checkpoint", help="memtrans checkpoint (dim_head 64) to take keys from "
                        "(default: train and cache a small one)")
    parser.add_argument("--nprobe", type=int, default=0,
                        help="ivf nprobe of the timed rows (default 0: derived from nlist)")
    parser.add_argument("--nprobes", type=int, nargs="*", default=[],
                        help="more ivf nprobe values for the recall table")
    parser.add_argument("--hnsw-sweep", action="store_true",
                        help="also time hnsw at several segments/M/efSearch against flat")
    parser.add_argument("--compressed", action="store_true",
                        help="also the compressed-keys table (float16 keys and values)")
    parser.add_argument("--recall-rows", type=int, default=4)
    parser.add_argument("--no-recall", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    flags = ("--threads", str(args.server_threads)) if args.server_threads else ()
    keys, queries, source = get_keys(args.keys, args.checkpoint, max(args.sizes))
    dense = BATCH * HEADS * QUERIES * K * 2 * DIM * 4
    load = [os.getloadavg()[0]]
    rows = []
    for size in args.sizes:
        flat = {}
        for index in args.indexes:
            options = dict(nprobe=args.nprobe) if index == "ivf" else {}
            results = {}
            for kind in args.memories:
                started = time.perf_counter()
                got = run_memory(kind, index, size, keys, queries, args.reps, flags, options)
                if got is not None:
                    results[kind] = got
                    print(f"[{size} {index} {kind}] add {got['add'] * 1e3:.1f} ms "
                          f"({got['add_step'] * 1e3:.1f} ms/step), search "
                          f"{got['search'] * 1e3:.0f} ms ({time.perf_counter() - started:.0f} s)",
                          file=sys.stderr, flush=True)
            if index == "flat":
                flat = results
            base = results.get("inproc")
            for kind, got in results.items():
                remote = kind.startswith("remote")
                step = got["search"] + got["add_step"]
                other = flat.get(kind)
                label = "hnsw M=15 ef 16" if kind == "seed" else index
                if index == "ivf":
                    nlist = ivf_nlist(size, 0)
                    label = f"ivf {nlist} lists, nprobe {ivf_nprobe(nlist, args.nprobe)}"
                rows.append([f"{size // 1024}K", label, LABELS[kind], f"{got['add'] * 1e3:.1f}",
                             f"{got['add_step'] * 1e3:.1f}", f"{got['search'] * 1e3:.0f}",
                             f"{step * 1e3:.0f}",
                             f"{(other['search'] + other['add_step']) / step:.1f}x"
                             if other else "-",
                             f"{BATCH * HEADS * QUERIES / got['search']:,.0f}",
                             f"{got['search'] / base['search']:.2f}" if base else "-",
                             f"{got['rss'] / 2**20:,.0f}" if got["rss"] else "-",
                             f"{(got['request'] + got['reply']) / 2**20:.1f}" if remote else "-",
                             f"{dense / got['reply']:.1f}x" if remote else "-"])
    load.append(os.getloadavg()[0])

    recall_rows, probe_rows = [], []
    if not args.no_recall and {"hnsw", "ivf"} & set(args.indexes):
        sets = [("model" if source.startswith("model") else "random", keys, queries)]
        if source.startswith("model"):
            sets.append(("random", *random_keys(max(args.sizes))))
        for size in args.sizes:
            for name, k, q in sets:
                got = measure_recall(k, q, size, min(args.recall_rows, BATCH),
                                     "hnsw" in args.indexes, "ivf" in args.indexes, args.nprobes)
                ivf = got["ivf"].get(got["default"])
                recall_rows.append([f"{size // 1024}K", name, _f(got["hnsw"]), _f(got["seed"]),
                                    _f(ivf[0] if ivf is not None else None),
                                    _f(ivf[1] if ivf is not None else None)])
                for p, (after_fill, after_turn, seconds) in got["ivf"].items():
                    probe_rows.append([f"{size // 1024}K", name, ivf_nlist(size, 0), p,
                                       f"{after_fill:.3f}", f"{after_turn:.3f}",
                                       f"{seconds * 1e3:.0f}"])

    sweep_rows = [row for size in args.sizes for row in hnsw_sweep(keys, queries, size)] \
        if args.hnsw_sweep else []
    compressed = [row for size in args.sizes
                  for row in compressed_rows(keys, queries, size, min(args.recall_rows, BATCH))] \
        if args.compressed else []
    hnsw = NamespaceConfig(dim=DIM, max_memories=max(args.sizes), num_layers=1, num_rows=1,
                           index="hnsw")
    print(machine_line(f"server threads {args.server_threads or 'default'}, no pinning, "
                       f"load average {load[0]:.1f} before / {load[1]:.1f} after timing"))
    print(f"Batch {BATCH}, {HEADS} heads x {QUERIES} queries per row, k={K}, dim {DIM}, adds of "
          f"{ADD} per row; median of {args.reps}. Keys: {source}. memtrans hnsw: M={hnsw.hnsw_m}, "
          f"efSearch {hnsw.ef_search}, efConstruction {hnsw.ef_construction}, "
          f"{hnsw.hnsw_segments} segments per memory; seed: HNSW M=15, efSearch 16, "
          f"efConstruction 40. Dense reply (what the seed's search returns) would be "
          f"{dense / 2**20:.0f} MiB.\n")
    if rows:
        print(table(["memories/row", "index", "memory", "add ms", "add ms/step", "search ms",
                     "step ms", "flat / this", "queries/s", "search / in-process",
                     "server RSS MiB", "MiB on wire per search", "dense / reply"], rows))
    if recall_rows:
        print(f"\nRecall@{K} against exact inner-product search of the same keys, mean over "
              f"{min(args.recall_rows, BATCH)} rows x {HEADS * QUERIES} queries:\n")
        print(table(["memories/row", "keys", f"memtrans hnsw (M={hnsw.hnsw_m}, ef "
                     f"{hnsw.ef_search})", "seed HNSW (M=15, ef 16)", "ivf after the fill",
                     "ivf after a ring turn"], recall_rows))
    if sweep_rows:
        print(f"\nhnsw settings against flat (row 0, {HEADS * QUERIES} queries, one faiss thread, "
              f"one search each; keys: {source}):\n")
        print(table(["memories/row", "index", "segments", "M", "efSearch", f"recall@{K}",
                     "search ms (1 row)"], sweep_rows))
    if probe_rows:
        print(f"\nivf recall@{K} by nprobe (one row, {HEADS * QUERIES} queries, one faiss "
              f"thread; search ms after the ring turn):\n")
        print(table(["memories/row", "keys", "nlist", "nprobe", "recall after the fill",
                     "recall after a ring turn", "search ms (1 row)"], probe_rows))
    if compressed:
        print(f"\nCompressed keys: recall@{K} against exact float32 search, after a ring turn, "
              f"mean over {min(args.recall_rows, BATCH)} rows x {HEADS * QUERIES} queries; one "
              f"row's search on one faiss thread (median); bytes per entry (keys: {source}):\n")
        print(table(["memories/row", "index", "key and value dtype", f"recall@{K}",
                     "search ms (1 row)", "bytes/entry booked", "bytes/entry RSS",
                     "M memories per GiB (RSS)"], compressed))


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
