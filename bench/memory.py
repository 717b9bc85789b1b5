"""Memory add/search cost: in-process KNNMemory against RemoteKNNMemory on 1 and 2 servers.

The workload of one memorizing layer's step at the issue's configuration: batch 8, 8 heads x 512
queries per row, k=32, dim 64, memories of 16K and 64K entries per row, filled with unit keys.
Remote search time includes the wire both ways and the client's merge; bytes are payload bytes
(array frames) per search, against the dense (b, q, k, 2, d) float32 tensor the seed builds.

    python -m bench.memory [--sizes 16384 65536] [--reps 3] [--index flat]
"""

from __future__ import annotations

import argparse

import torch

from memory_server.local import start_servers
from memtrans import RemoteKNNMemory
from memtrans.memory import KNNMemoryList

from .common import machine_line, table, timed

BATCH, HEADS, QUERIES, K, DIM, ADD = 8, 8, 512, 32, 64, 512


def unit(*shape) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape), dim=-1)


def fill(memory, size: int) -> None:
    for _ in range(size // ADD):
        keys = unit(BATCH, ADD, DIM)
        memory.add(torch.stack((keys, torch.randn(BATCH, ADD, DIM)), dim=-2))
    memory.collect_adds()


def measure(memories: KNNMemoryList, size: int, reps: int) -> dict:
    memory = memories[0]
    fill(memory, size)
    queries = unit(BATCH, HEADS, QUERIES, DIM)
    last = {}

    def search():
        last["r"] = memory.retrieved(memory.search_async(queries, K))

    def add():
        memory.add(torch.stack((unit(BATCH, ADD, DIM), torch.randn(BATCH, ADD, DIM)), dim=-2))
        memory.collect_adds()

    search_s = timed(search, reps)
    add_s = timed(add, reps)
    r = last["r"]
    reply = r.keys.nbytes + r.values.nbytes + r.positions.nbytes
    return dict(search=search_s, add=add_s, reply=reply, request=queries.numel() * 4,
                unique=r.keys.shape[0] - 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--index", default="flat", choices=["flat", "hnsw"])
    parser.add_argument("--server-threads", type=int, default=None,
                        help="memory-server --threads (default: its own default, all cores)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    flags = ("--threads", str(args.server_threads)) if args.server_threads else ()
    dense = BATCH * HEADS * QUERIES * K * 2 * DIM * 4
    rows = []
    for size in args.sizes:
        local = KNNMemoryList.create_memories(batch_size=BATCH, num_memory_layers=1)(
            dim=DIM, max_memories=size, multiprocessing=False, index=args.index)
        base = measure(local, size, args.reps)
        local.cleanup()
        rows.append([f"{size // 1024}K", "in-process", f"{base['add'] * 1e3:.1f}",
                     f"{base['search'] * 1e3:.0f}", f"{BATCH * HEADS * QUERIES / base['search']:,.0f}",
                     "1.00", "-", "-"])
        for count in (1, 2):
            servers = start_servers(count, *flags)
            try:
                remote = RemoteKNNMemory.create([s.endpoint for s in servers], dim=DIM,
                                                max_memories=size, batch_size=BATCH,
                                                index=args.index, timeout=600)
                got = measure(remote, size, args.reps)
                remote.cleanup()
            finally:
                for server in servers:
                    server.stop()
            rows.append([f"{size // 1024}K", f"remote, {count} server{'s' * (count > 1)}",
                         f"{got['add'] * 1e3:.1f}", f"{got['search'] * 1e3:.0f}",
                         f"{BATCH * HEADS * QUERIES / got['search']:,.0f}",
                         f"{got['search'] / base['search']:.2f}",
                         f"{(got['request'] + got['reply']) / 2**20:.1f}",
                         f"{dense / got['reply']:.1f}x"])
    print(machine_line(f"index {args.index}, server threads "
                       f"{args.server_threads or 'default'}, no pinning"))
    print(f"Batch {BATCH}, {HEADS} heads x {QUERIES} queries per row, k={K}, dim {DIM}, "
          f"adds of {ADD} per row; median of {args.reps}. Dense reply would be "
          f"{dense / 2**20:.0f} MiB.\n")
    print(table(["memories/row", "memory", "add ms", "search ms", "queries/s",
                 "search / in-process", "MiB on wire per search", "dense / reply"], rows))


if __name__ == "__main__":
    main()
