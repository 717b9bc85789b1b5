"""Training-step cost of kNN memory: the seed package against memtrans, in-process and remote.

The issue's configuration: batch 8, 512-token segments, dim 512, depth 8 (8 heads of 64), kNN
memory in layers 4 and 5 with 16K memories per row (k=32), byte vocabulary (256), random tokens.
One *step* is forward + backward + AdamW step on one segment (and, for memtrans, collecting the
replies of the adds it sent, as ``memtrans-train`` does). Each row trains a fresh model on 5
consecutive segments with fresh memories; its step time is the median of segments 2-5, i.e. after
the memories hold earlier segments (the first segment searches empty memories and pays the
allocator's first touch).

Rows (each runs in its own subprocess, one after another):

- ``none``: memtrans with no memorizing layers (``memorizing_layers=()``): the baseline.
- ``seed``: the seed package's model and ``KNNMemory`` (HNSW M=15, efSearch 16, memmaps in a
  temporary directory, ``knn_memory_multiprocessing=False`` as its default).
- ``zeros``: memtrans with the kNN replaced by a memory that returns an empty compact retrieval at
  once and ignores adds: the model-side cost of the memory layers alone.
- ``inproc-sync``: memtrans' in-process ``KNNMemory``, but every search and add waits for the store
  before returning (no overlap with compute).
- ``inproc``: memtrans' in-process ``KNNMemory`` as the model uses it (search overlapped with the
  local attention, adds not waited for).
- ``remote``: ``RemoteKNNMemory`` on one local ``memory-server`` with its default threads.
- ``remote-pinned``: the same, with the server pinned to core 0 (``taskset -c 0 ... --threads 1``)
  and the trainer pinned to core 1 (``os.sched_setaffinity(0, {1})``, ``torch.set_num_threads(1)``).

"memory calls" is the wall time the training thread spent inside memory calls per step (for
memtrans: ``search_async`` + ``retrieved`` + ``add`` + ``collect_adds``, including the tensor to
numpy copies and any waiting; for the seed: ``search`` + ``add``).

``--device cuda`` runs the model (and its tokens) on the GPU, the memories staying on the host's
CPU cores; each step ends with ``torch.cuda.synchronize()`` so its time is the GPU's too. It
stops with an error where CUDA is not available. It has never run: this project's machine has
no GPU.

    python -m bench.step                  # the issue's configuration, every row (~10 minutes)
    python -m bench.step --quick          # tiny configuration, for smoke-testing (~30 s)
    python -m bench.step --rows none remote --segments 5 --prefill 8192
    python -m bench.step --rows none seed remote --index ivf --max-memories 65536 --prefill 63488 --segments 4
    python -m bench.step --profile inproc # torch.profiler table of one row's warm steps
    python -m bench.step --device cuda    # the model on the GPU (needs CUDA)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from memtrans.memory import TensorRetrieval

from .common import machine_line, table

ROWS = {
    "none": "no memorizing layers",
    "seed": "seed package: model + KNNMemory",
    "zeros": "memtrans, kNN replaced by zeros",
    "inproc-sync": "memtrans in-process, sync",
    "inproc": "memtrans in-process, async",
    "remote": "memtrans remote async, 1 server",
    "remote-pinned": "memtrans remote async, 1 server, pinned",
}


@dataclass(kw_only=True, slots=True)
class StepConfig:
    batch: int = 8
    seq_len: int = 512
    dim: int = 512
    depth: int = 8
    heads: int = 8
    dim_head: int = 64
    memorizing_layers: tuple[int, ...] = (4, 5)
    max_memories: int = 16384
    k: int = 32
    num_tokens: int = 256
    segments: int = 5
    prefill: int = 0
    """Random unit key/values added to every memory before the first segment (0: none)."""
    index: str = "flat"
    """memtrans index kind (the seed always uses its HNSW)."""
    server_threads: int | None = None
    """memory-server --threads for the unpinned remote row (None: the server's default)."""
    device: str = "cpu"
    """Where the model runs: ``cpu`` or ``cuda`` (the memories are on the host either way)."""

    def describe(self) -> str:
        layers = ",".join(map(str, self.memorizing_layers))
        return (f"batch {self.batch}, {self.seq_len}-token segments, dim {self.dim}, depth "
                f"{self.depth}, {self.heads} heads x {self.dim_head}, memorizing layers ({layers}), "
                f"{self.max_memories} memories per row, k={self.k}, {self.segments} consecutive "
                f"segments per row, prefill {self.prefill}, memtrans index {self.index}, "
                f"model on {self.device}")


QUICK = dict(batch=2, seq_len=64, dim=64, depth=4, heads=4, dim_head=16, memorizing_layers=(2, 3),
             max_memories=1024, segments=3)


# -----------------------------------------------------------------------------
# memory stand-ins


class ZeroMemory:
    """The ``KNNMemory`` interface at no cost: every search finds nothing, adds are dropped.

    ``retrieved`` gives a compact retrieval of one zero key/value row and all-zero positions
    (every neighbour masked) on the queries' device, built once per shape, so the model does all
    of its memory-layer work and the memory none.
    """

    def __init__(self, batch: int, dim: int):
        self.dim = dim
        self.num_indices = batch
        self.scoped_indices = list(range(batch))
        self._retrievals: dict[tuple, TensorRetrieval] = {}

    def search_async(self, queries: torch.Tensor, topk: int):
        return (queries.shape[0], queries[0].numel() // self.dim, topk), queries.device

    def retrieved(self, pending) -> TensorRetrieval:
        shape, device = pending
        if (shape, device) not in self._retrievals:
            zero = torch.zeros((1, self.dim), device=device)
            positions = torch.zeros(shape, dtype=torch.int32, device=device)
            self._retrievals[shape, device] = TensorRetrieval(zero, zero, positions)
        return self._retrievals[shape, device]

    def add(self, memories: torch.Tensor) -> None:
        pass

    def collect_adds(self) -> None:
        pass


class SyncMemory:
    """A memtrans memory that blocks: a search returns once its result is there, an add once the
    store applied it. The model's overlap has nothing to overlap."""

    def __init__(self, memory):
        self._memory = memory

    def __getattr__(self, name):
        return getattr(self._memory, name)

    def search_async(self, queries, topk):
        pending = self._memory.search_async(queries, topk)
        pending.future.result()
        return pending

    def add(self, memories) -> None:
        self._memory.add(memories)
        self._memory.collect_adds()


class Meter:
    """Wraps a memory and adds the wall time spent in its calls to ``seconds``."""

    CALLS = ("search_async", "retrieved", "add", "collect_adds", "search")

    def __init__(self, memory, clock: list):
        self._memory = memory
        self._clock = clock

    def __getattr__(self, name):
        attr = getattr(self._memory, name)
        if name not in self.CALLS:
            return attr

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._clock[0] += time.perf_counter() - start

        return timed


# -----------------------------------------------------------------------------
# one row


def _model_kwargs(cfg: StepConfig, memorizing_layers) -> dict:
    return dict(num_tokens=cfg.num_tokens, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
                dim_head=cfg.dim_head, memorizing_layers=memorizing_layers,
                max_knn_memories=cfg.max_memories, num_retrieved_memories=cfg.k)


def _prefill(memories, cfg: StepConfig) -> None:
    if cfg.prefill <= 0:
        return
    gen = torch.Generator().manual_seed(1)
    for memory in memories:
        for start in range(0, cfg.prefill, cfg.seq_len):
            n = min(cfg.seq_len, cfg.prefill - start)
            keys = torch.nn.functional.normalize(torch.randn(cfg.batch, n, cfg.dim_head,
                                                             generator=gen), dim=-1)
            values = torch.randn(cfg.batch, n, cfg.dim_head, generator=gen)
            memory.add(torch.stack((keys, values), dim=-2))
        if hasattr(memory, "collect_adds"):
            memory.collect_adds()


def run_row(name: str, cfg: StepConfig, *, profile: bool = False) -> dict:
    """Train ``cfg.segments`` segments in this process; per-segment step and memory-call seconds."""
    from memory_server.local import start_servers
    from memtrans import MemorizingTransformer

    device = torch.device(cfg.device)
    note = ""
    if name == "remote-pinned":
        # Before any thread exists, so every thread of this process (torch, ZeroMQ) inherits it.
        os.sched_setaffinity(0, {1})
        torch.set_num_threads(1)
        note = "server: taskset -c 0, --threads 1; trainer: core 1, 1 torch thread"
    torch.manual_seed(0)
    with ExitStack() as stack:
        if name == "seed":
            from .seed import seed_model

            model = stack.enter_context(seed_model(**_model_kwargs(cfg, cfg.memorizing_layers)))
            memories = model.create_knn_memories(batch_size=cfg.batch)
        elif name == "none":
            model = MemorizingTransformer(**_model_kwargs(cfg, ()))
            memories = []
        elif name == "zeros":
            model = MemorizingTransformer(**_model_kwargs(cfg, cfg.memorizing_layers))
            memories = [ZeroMemory(cfg.batch, cfg.dim_head) for _ in cfg.memorizing_layers]
        else:
            model = MemorizingTransformer(**_model_kwargs(cfg, cfg.memorizing_layers))
            servers = None
            if name in ("remote", "remote-pinned"):
                flags, prefix = (), ()
                if name == "remote-pinned":
                    flags, prefix = ("--threads", "1"), ("taskset", "-c", "0")
                elif cfg.server_threads:
                    flags = ("--threads", str(cfg.server_threads))
                running = start_servers(1, *flags, prefix=prefix)
                for server in running:
                    stack.callback(server.stop)
                servers = [s.endpoint for s in running]
            memories = model.create_knn_memories(batch_size=cfg.batch, servers=servers,
                                                 index=cfg.index, timeout=600)
            stack.callback(memories.cleanup)
            if name == "inproc-sync":
                memories = [SyncMemory(m) for m in memories]
        model.to(device)
        _prefill(memories, cfg)
        clock = [0.0]
        metered = [Meter(m, clock) for m in memories]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        times, waits = [], []
        profiler = None
        for segment in range(cfg.segments):
            if profile and segment == 1:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if device.type == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                profiler = torch.profiler.profile(activities=activities)
                profiler.start()
            tokens = torch.randint(1, cfg.num_tokens, (cfg.batch, cfg.seq_len + 1),
                                   generator=gen).to(device)
            clock[0] = 0.0
            start = time.perf_counter()
            loss = model(tokens[:, :-1], metered, labels=tokens[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for memory in metered:
                if hasattr(memory, "collect_adds"):
                    memory.collect_adds()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            waits.append(clock[0])
        if profiler is not None:
            profiler.stop()
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        return dict(row=name, times=times, memory_calls=waits, note=note,
                    threads=torch.get_num_threads())


# -----------------------------------------------------------------------------
# driver


def _worker_argv(name: str, cfg: StepConfig) -> list[str]:
    return [sys.executable, "-m", "bench.step", "--worker", name,
            "--config", json.dumps(dataclasses.asdict(cfg))]


def run_in_subprocess(name: str, cfg: StepConfig) -> dict:
    proc = subprocess.run(_worker_argv(name, cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"row {name!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def warm(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def report(cfg: StepConfig, results: dict[str, dict], load=None) -> str:
    base = warm(results["none"]["times"]) if "none" in results else None
    rows = []
    for name, res in results.items():
        step = warm(res["times"])
        rows.append([name, ROWS[name] + (f" ({res['note']})" if res["note"] else ""),
                     f"{step:.2f}", f"{step / base:.2f}" if base else "-",
                     f"{warm(res['memory_calls']):.2f}" if name != "none" else "-",
                     " ".join(f"{t:.2f}" for t in res["times"])])
    load = f", load average {load[0]:.1f} before / {load[1]:.1f} after" if load else ""
    gpu = f", GPU {torch.cuda.get_device_name()}" if cfg.device == "cuda" else ""
    lines = [machine_line(f"torch threads per row as set (remote-pinned: 1), no pinning unless "
                          f"noted; each row a fresh process{load}{gpu}"),
             cfg.describe() + ".",
             f"Step = forward + backward + AdamW step (+ collecting add replies); median of "
             f"segments 2-{cfg.segments} (memories warm), seconds.\n",
             table(["row", "configuration", "step s", "/ none", "memory calls s/step",
                    "all segments s"], rows)]
    if "seed" in results:
        seed = warm(results["seed"]["times"])
        for name in ("remote", "remote-pinned", "inproc"):
            if name in results:
                lines.append(f"\nseed step / {name} step: {seed / warm(results[name]['times']):.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--quick", action="store_true", help="tiny configuration (smoke test)")
    parser.add_argument("--segments", type=int)
    parser.add_argument("--prefill", type=int, help="random memories per row added before timing")
    parser.add_argument("--max-memories", type=int, help="memories per row (default 16384)")
    parser.add_argument("--index", choices=["flat", "hnsw", "ivf"])
    parser.add_argument("--batch", type=int)
    parser.add_argument("--server-threads", type=int)
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="where the model runs (default cpu); the memories stay on the host")
    parser.add_argument("--profile", choices=list(ROWS),
                        help="run this one row in this process under torch.profiler (segments "
                             "2..) and print its op table")
    parser.add_argument("--worker", choices=list(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        config = json.loads(args.config)
        config["memorizing_layers"] = tuple(config["memorizing_layers"])
        print("RESULT " + json.dumps(run_row(args.worker, StepConfig(**config))), flush=True)
        return

    cfg = StepConfig(**(QUICK if args.quick else {}))
    for field in ("segments", "prefill", "max_memories", "index", "batch", "server_threads",
                  "device"):
        if getattr(args, field) is not None:
            setattr(cfg, field, getattr(args, field))
    if cfg.prefill + cfg.segments * cfg.seq_len > cfg.max_memories:
        parser.error("prefill + segments x seq_len must fit in max_memories (the seed wipes a "
                     "full memory)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: CUDA is not available here (torch {torch.__version__}, "
                     f"built with CUDA {torch.version.cuda}): run it on a GPU host with a CUDA "
                     f"build of torch, or use --device cpu")
    if args.profile:
        res = run_row(args.profile, cfg, profile=True)
        print(report(cfg, {args.profile: res}))
        return
    results, load = {}, [os.getloadavg()[0]]
    for name in args.rows:
        started = time.perf_counter()
        results[name] = run_in_subprocess(name, cfg)
        print(f"[{name}] {warm(results[name]['times']):.2f} s/step "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    load.append(os.getloadavg()[0])
    print(report(cfg, results, load))


if __name__ == "__main__":
    main()
