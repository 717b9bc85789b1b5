"""What a snapshot and a restore cost a server in resident memory, for a large store.

    python -m bench.snapshot [--rows 16] [--max-memories 65536] [--dim 64]

A real server is filled with one namespace (flat index, float32 keys and values: rows x
max_memories x dim x 8 bytes), then snapshotted; the namespace is dropped and restored from that
snapshot. For each step the table gives the server's resident memory before it and its peak
during it (the kernel's high-water mark ``VmHWM``, reset just before the step through
``/proc/PID/clear_refs``) and after it, so "peak over before" is what the step itself held on
top of the store (for a restore, that includes the namespace it loads).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numpy as np

from memory_server import MemoryClient, NamespaceConfig
from memory_server.local import start_servers

from .common import table

_ADD_TOKENS = 2048  # entries per row and add


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident memory


def _measured(pid: int, step) -> tuple[int, int, int, float]:
    """(resident bytes before, peak bytes during, resident bytes after, seconds) of ``step()``."""
    before = _status(pid, "VmRSS")
    _reset_peak(pid)
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    return before, _status(pid, "VmHWM"), _status(pid, "VmRSS"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-memories", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    config = NamespaceConfig(dim=args.dim, max_memories=args.max_memories, num_layers=1,
                             num_rows=args.rows)
    data_dir = tempfile.mkdtemp(prefix="bench-snapshot-")
    (server,) = start_servers(1, "--threads", "2", "--data-dir", data_dir,
                              "--max-message-bytes", "256M")
    pid = server.proc.pid
    try:
        rng = np.random.default_rng(0)
        rows = list(range(args.rows))
        with MemoryClient(server.endpoint, timeout=600) as client:
            idle = _status(pid, "VmRSS")
            client.open("big", config)
            for _ in range(args.max_memories // _ADD_TOKENS):
                keys = rng.standard_normal((args.rows, _ADD_TOKENS, args.dim), dtype=np.float32)
                client.add("big", 0, rows, keys, keys)
            held = client.stats()[0]["bytes"]
            results = [("snapshot", *_measured(pid, lambda: client.snapshot("big", "t")))]
            written = client.snapshots()[0][0]["bytes"]
            client.drop("big")
            results.append(("restore (after a drop)",
                            *_measured(pid, lambda: client.restore("big", "t"))))
            assert client.stats()[0]["bytes"] == held
    finally:
        assert server.stop() == 0, server.output()[-2000:]
        shutil.rmtree(data_dir)
    mib = 1 << 20
    print(f"store: {args.rows} rows x {args.max_memories} entries x dim {args.dim}, flat, "
          f"{held / mib:.0f} MiB counted; snapshot file {written / mib:.0f} MiB; idle server "
          f"{idle / mib:.0f} MiB resident")
    print(table(["step", "resident before MiB", "peak during MiB", "peak over before MiB",
                 "resident after MiB", "seconds"],
                [[step, f"{before / mib:.0f}", f"{peak / mib:.0f}",
                  f"+{(peak - before) / mib:.0f}", f"{after / mib:.0f}", f"{seconds:.2f}"]
                 for step, before, peak, after, seconds in results]))


if __name__ == "__main__":
    main()
