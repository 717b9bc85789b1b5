"""What every benchmark prints with its table: the machine, threads and pinning."""

from __future__ import annotations

import os
import platform
import statistics
import time

import faiss
import torch


def machine_line(extra: str = "") -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"{platform.machine()} {cores} cores ({os.cpu_count()} online)",
             f"python {platform.python_version()}", f"torch {torch.__version__} "
             f"({torch.get_num_threads()} threads)", f"faiss {faiss.__version__} "
             f"({faiss.omp_get_max_threads()} omp threads)"]
    if extra:
        parts.append(extra)
    return "Machine: " + ", ".join(parts)


def timed(fn, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
