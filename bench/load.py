"""Load: many concurrent clients sending mixed add/search/clear requests to memory servers on
loopback; prints p50/p99 latency per op and the throughput.

    python -m bench.load [--clients 16] [--requests 1000] [--servers 1] [--threads 4]

Each client owns its own rows (so it can predict exactly what they hold) and checks at the end
that every memory it touched holds exactly the entries it expects; ``tests/test_load.py`` runs a
smaller version as a test.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from memory_server import MemoryClient, NamespaceConfig
from memory_server.local import start_servers
from memory_server.store import MAX_K

NAMESPACE = "load"
DIM, TOKENS, QUERIES, K = 32, 8, 16, 8
ROWS_PER_CLIENT, LAYERS = 2, 2
MIX = (("add", 0.5), ("search", 0.4), ("clear", 0.1))


@dataclass
class LoadResult:
    latencies: dict[str, list[float]] = field(default_factory=dict)
    """Seconds per answered request, by op."""
    expected: dict[tuple[int, int], int] = field(default_factory=dict)
    """(layer, row) -> entries it must hold."""
    found: dict[tuple[int, int], int] = field(default_factory=dict)
    """(layer, row) -> entries a final full search found."""
    seconds: float = 0.0

    @property
    def answered(self) -> int:
        return sum(len(v) for v in self.latencies.values())


def config(clients: int, requests: int) -> NamespaceConfig:
    # Room for every add a client could send to one memory, up to what one search may return
    # (MAX_K), so that a final search sees every live entry; a fuller ring keeps its newest.
    return NamespaceConfig(dim=DIM, max_memories=max(K, min(requests * TOKENS, MAX_K)),
                           num_layers=LAYERS,
                           num_rows=clients * ROWS_PER_CLIENT)


def _client(endpoints: list[str], index: int, requests: int, cfg: NamespaceConfig, seed: int,
            timeout: float, result: LoadResult, lock: threading.Lock) -> None:
    rng = random.Random(seed * 1000 + index)
    data = np.random.default_rng(seed * 1000 + index)
    rows = np.arange(index * ROWS_PER_CLIENT, (index + 1) * ROWS_PER_CLIENT)
    counts = {(layer, int(row)): 0 for layer in range(LAYERS) for row in rows}
    latencies: dict[str, list[float]] = {op: [] for op, _ in MIX}
    ops, weights = zip(*MIX)
    with MemoryClient(endpoints, timeout=timeout) as client:
        client.open(NAMESPACE, cfg)
        for _ in range(requests):
            op, layer = rng.choices(ops, weights)[0], rng.randrange(LAYERS)
            start = time.perf_counter()
            if op == "add":
                keys = data.standard_normal((len(rows), TOKENS, DIM), dtype=np.float32)
                client.add(NAMESPACE, layer, rows, keys, keys)
                for row in rows:
                    counts[(layer, int(row))] += TOKENS
            elif op == "search":
                queries = data.standard_normal((len(rows), QUERIES, DIM), dtype=np.float32)
                client.search(NAMESPACE, layer, rows, queries, K)
            else:
                layers = None if rng.random() < 0.5 else [layer]
                client.clear(NAMESPACE, rows, layers)
                for key in counts:
                    if layers is None or key[0] == layer:
                        counts[key] = 0
            latencies[op].append(time.perf_counter() - start)
        found = {}
        for layer in range(LAYERS):  # one query with k = max_memories sees every live entry
            query = np.zeros((len(rows), 1, DIM), np.float32)
            mask = client.search(NAMESPACE, layer, rows, query, cfg.max_memories).mask
            found.update({(layer, int(row)): int(mask[i].sum()) for i, row in enumerate(rows)})
    with lock:
        for op, values in latencies.items():
            result.latencies.setdefault(op, []).extend(values)
        result.expected.update({key: min(count, cfg.max_memories)
                                for key, count in counts.items()})
        result.found.update(found)


def run_load(endpoints: list[str], clients: int, requests: int, *, seed: int = 0,
             timeout: float = 30.0) -> LoadResult:
    """``clients`` threads, each with its own MemoryClient, send ``requests`` mixed requests;
    an exception in any client (a lost request times out) propagates."""
    cfg = config(clients, requests)
    result, lock = LoadResult(), threading.Lock()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(_client, endpoints, i, requests, cfg, seed, timeout, result, lock)
                   for i in range(clients)]
        for future in futures:
            future.result()
    result.seconds = time.perf_counter() - start
    return result


def report(result: LoadResult, clients: int, servers: int, threads: int) -> str:
    from bench.common import machine_line, table

    rows = []
    for op, values in sorted(result.latencies.items()):
        p50, p99 = np.percentile(values, [50, 99]) * 1000
        rows.append([op, len(values), f"{p50:.2f}", f"{p99:.2f}"])
    every = [v for values in result.latencies.values() for v in values]
    p50, p99 = np.percentile(every, [50, 99]) * 1000
    rows.append(["all", len(every), f"{p50:.2f}", f"{p99:.2f}"])
    lines = [machine_line(f"{servers} server(s) x {threads} threads, {clients} clients"),
             "", table(["op", "requests", "p50 ms", "p99 ms"], rows), "",
             f"Throughput: {result.answered / result.seconds:,.0f} requests/s "
             f"({result.answered} in {result.seconds:.1f} s); rows of {TOKENS} tokens x {DIM} "
             f"dims per add, {QUERIES} queries k={K} per search"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1000, help="per client")
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=4, help="worker threads per server")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    servers = start_servers(args.servers, "--threads", str(args.threads), "--log-level",
                            "WARNING")
    try:
        result = run_load([s.endpoint for s in servers], args.clients, args.requests,
                          seed=args.seed)
    finally:
        for server in servers:
            server.stop()
    lost = args.clients * args.requests - result.answered
    wrong = {k: (v, result.found[k]) for k, v in result.expected.items() if result.found[k] != v}
    print(report(result, args.clients, args.servers, args.threads))
    print(f"Lost requests: {lost}; memories with unexpected entry counts: {len(wrong)}")


if __name__ == "__main__":
    main()
