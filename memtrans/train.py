"""`memtrans-train`: train a Memorizing Transformer on document streams, alone or under torchrun.

Every batch row reads one long document in consecutive segments (``memtrans.data``); a row that
starts a new document has its kNN memories cleared and its Transformer-XL memories zeroed before
the segment is used, so a row's memories only ever hold the document it is reading (the paper's
setup). One optimizer step takes ``grad_accum`` consecutive segments of the same documents, in
order, because memory order matters. Losses are in bits per byte: the cross entropy over the
non-pad next tokens (the bytes of a document and its EOS) divided by ln 2.

Memory (``--memory``):

- ``remote`` (default): memories on ``memory-server`` processes: the endpoints of
  ``--memory-servers`` or ``MEMTRANS_SERVERS``, else ``--num-servers`` local servers this command
  starts on loopback (rank 0 starts them and broadcasts their endpoints) and stops at exit, also
  on Ctrl-C, SIGTERM or an error.
- ``inproc``: memories in this process (the same ``MemoryStore``, so the same numbers).
- ``off``: the same model, its memories never filled (retrieval finds nothing): the baseline.

Validation runs the first ``--eval-batches`` segments of the validation split twice with fresh
memories, with retrieval and without (``add_knn_memory=False`` on empty memories), and appends both
bits-per-byte figures to ``<out>/log.jsonl``.

Checkpoints (``<out>/checkpoint.pt``, written atomically) hold the model, optimizer, step, config,
and per rank the data position, RNG state, XL memories and, with ``--memory inproc``, the kNN
memories, so ``--resume`` continues with exactly the losses of an uninterrupted run. With
``remote`` memory, once every rank's adds are acknowledged, rank 0 has the servers snapshot the
namespace (each server its own shard, into its ``--data-dir``; auto-started servers use
``<out>/memory``) and the checkpoint records namespace, tag and server count; ``--resume`` restores
that snapshot into the same namespace on the same number of servers. Snapshot tags alternate
between two slots (``ckpt-0``, ``ckpt-1``), so the disk holds at most two snapshots per run and a
crash while one is written leaves the one the checkpoint names intact. The learning rate is
constant after warmup: a run extended with ``--resume --steps N`` is the run that had been asked
for ``N`` steps.

A memory server that fails mid-run is handled by ``--on-memory-failure`` (``recovery.py``):
``stop`` (default) ends the run naming the endpoint, ``skip`` goes on without memory for the
failed segment, ``wait`` waits for the server and restores the last snapshot. Auto-started servers
are supervised (``servers.py``): one that dies is restarted on its port from the last snapshot.

Under torchrun (``RANK`` set): gloo on CPU, nccl on CUDA, DDP; global batch row
``rank * batch_size + row``; each rank streams a disjoint share of the documents; rank 0 logs,
evaluates into the log, checkpoints and starts local servers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from memory_server import MemoryServerError
from memory_server.client import MemoryClient

from .data import NUM_TOKENS, PAD_ID, Corpus, CorpusError, load_corpus
from .memory import KNNMemoryList, servers_from_env
from .model import MemorizingTransformer
from .recovery import FAILURES, POLICIES, MemoryFailure, MemoryRecovery
from .servers import LocalServers, ServerStartError

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
MEMORY_MODES = ("remote", "inproc", "off")
INDEX_KINDS = ("flat", "hnsw")
SNAPSHOT_SLOTS = ("ckpt-0", "ckpt-1")
"""Snapshot tags of remote memories, used in turn by successive checkpoints."""


class TrainError(Exception):
    """A run cannot start or go on; the message says what was wrong and what to do."""


# -----------------------------------------------------------------------------
# config


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """One training run. The defaults train a ~0.8M-parameter model on the standard library in a
    few minutes on 2 CPU cores: small enough to be the README demo, with documents (~100
    segments each) far longer than the segment, so memory has something to remember."""

    data: str | None = None
    """Corpus: a directory of text files or one text / .gz file; None: the Python stdlib sources."""
    val_fraction: float = 0.05
    """Share of the documents held out for validation (chosen by a hash of their names)."""
    steps: int = 200
    """Optimizer steps in all (a resumed run continues up to this many)."""
    batch_size: int = 4
    """Batch rows per rank: documents read in parallel, each with its own memories."""
    seq_len: int = 256
    """Tokens (bytes) per segment. The paper uses 512; 256 halves the attention cost on CPU and
    still gives a document of the default corpus ~100 segments."""
    dim: int = 128
    """Model width."""
    depth: int = 4
    """Transformer layers."""
    heads: int = 4
    """Attention heads."""
    dim_head: int = 32
    """Width of each head, and of the keys and values in the kNN memory."""
    memorizing_layers: tuple[int, ...] = (3,)
    """1-based layers with kNN attention; the paper puts one near the top."""
    max_memories: int = 4096
    """kNN memory per row and layer, in tokens (16 segments of 256); oldest evicted first."""
    num_retrieved: int = 32
    """Top-k memories each query retrieves (the paper's 32)."""
    xl_max_memories: int = 256
    """Transformer-XL memory per layer, in tokens (one segment, as in the paper); 0 disables it."""
    memory: str = "remote"
    """Where the kNN memory lives: ``remote`` (memory servers), ``inproc``, or ``off``."""
    memory_servers: tuple[str, ...] = ()
    """Endpoints of running memory servers; empty: ``MEMTRANS_SERVERS``, else start local ones."""
    num_servers: int = 1
    """Local memory servers to start when none are named."""
    memory_timeout: float = 60.0
    """Seconds a memory server may take to answer before it counts as failed."""
    on_memory_failure: str = "stop"
    """When a memory server fails: ``stop`` the run, ``skip`` memory for the failed segment, or
    ``wait`` for the server and restore the last snapshot (see ``recovery.py``)."""
    memory_wait_timeout: float = 300.0
    """Seconds ``wait`` waits for a failed memory server to answer again."""
    index: str = "flat"
    """kNN index: ``flat`` (exact, the paper's) or ``hnsw`` (approximate)."""
    grad_accum: int = 1
    """Consecutive segments per optimizer step (gradients summed over them)."""
    lr: float = 1e-3
    """AdamW learning rate, reached after ``warmup_steps`` and then held constant."""
    warmup_steps: int = 20
    """Steps of linear learning-rate warmup."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices and embeddings; biases, norm gains and scales get none."""
    clip: float = 1.0
    """Gradient norm clip; 0 disables clipping."""
    eval_every: int = 50
    """Validate every this many steps (and at the end); 0: only at the end."""
    eval_batches: int = 16
    """Validation segments per evaluation (the same ones every time): 16 x 256 tokens, so the
    memory holds real history for most of them."""
    out: str | None = None
    """Run directory (checkpoint, log.jsonl, plot, server logs); None: ``runs/<timestamp>``, or
    the resumed checkpoint's directory."""
    resume: str | None = None
    """Checkpoint file, or run directory holding ``checkpoint.pt``, to continue."""
    seed: int = 0
    """Seeds the model initialisation and the document order."""
    checkpoint_every: int = 50
    """Write the checkpoint every this many steps (and at the end); 0: only at the end."""
    log_every: int = 10
    """Log the training loss every this many steps."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "dim", "depth", "heads", "dim_head",
                     "max_memories", "num_retrieved", "num_servers", "grad_accum", "eval_batches",
                     "log_every"):
            _require(name, getattr(self, name), lambda v: _is_int(v) and v >= 1,
                     "a positive integer")
        for name in ("xl_max_memories", "warmup_steps", "eval_every", "checkpoint_every", "seed"):
            _require(name, getattr(self, name), lambda v: _is_int(v) and v >= 0,
                     "a non-negative integer")
        _require("memory", self.memory, lambda v: v in MEMORY_MODES, f"one of {MEMORY_MODES}")
        _require("index", self.index, lambda v: v in INDEX_KINDS, f"one of {INDEX_KINDS}")
        _require("val_fraction", self.val_fraction, lambda v: 0 < v < 1, "in (0, 1)")
        _require("lr", self.lr, lambda v: v > 0, "a positive number")
        _require("weight_decay", self.weight_decay, lambda v: v >= 0, "a non-negative number")
        _require("clip", self.clip, lambda v: v >= 0, "a non-negative number (0: no clipping)")
        _require("memory_timeout", self.memory_timeout, lambda v: v > 0, "positive seconds")
        _require("on_memory_failure", self.on_memory_failure, lambda v: v in POLICIES,
                 f"one of {POLICIES}")
        _require("memory_wait_timeout", self.memory_wait_timeout, lambda v: v > 0,
                 "positive seconds")
        if not self.memorizing_layers or not all(_is_int(l) and 1 <= l <= self.depth
                                                 for l in self.memorizing_layers):
            raise ValueError(f"memorizing_layers must be 1-based layer numbers in [1, depth="
                             f"{self.depth}], got {self.memorizing_layers!r} (use --memory off "
                             f"to train without retrieval)")
        if self.num_retrieved > self.max_memories:
            raise ValueError(f"num_retrieved ({self.num_retrieved}) cannot exceed max_memories "
                             f"({self.max_memories}): a query retrieves from one row's memory")
        if self.memory_servers and self.memory != "remote":
            raise ValueError(f"memory_servers applies to memory 'remote' only, but memory is "
                             f"{self.memory!r}: drop --memory-servers or use --memory remote")
        bad = [s for s in self.memory_servers if "://" not in s]
        if bad:
            raise ValueError(f"memory_servers must be ZeroMQ endpoints like tcp://host:5555, got "
                             f"{', '.join(bad)}")


RUN_FIELDS = ("steps", "eval_every", "eval_batches", "out", "resume", "checkpoint_every",
              "log_every", "memory_servers", "num_servers", "memory_timeout",
              "on_memory_failure", "memory_wait_timeout")
"""What a resumed run may change; every other field is fixed by its checkpoint."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(name: str, value, ok, expected: str) -> None:
    try:
        valid = ok(value)
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 3 or 2,3, "
                                         f"got {text!r}") from None


def _str_tuple(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    """Flags of ``TrainConfig``; only the flags given end up in the namespace (see ``main``)."""
    d = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="memtrans-train", argument_default=argparse.SUPPRESS,
        description="Train a Memorizing Transformer on document streams (alone or under "
                    "torchrun). With no flags: a small model on the Python standard library, "
                    "memory on a local memory server.")
    add = parser.add_argument
    add("--data", help="corpus directory or text/.gz file (default: the Python stdlib sources)")
    add("--val-fraction", type=float,
        help=f"share of documents held out for validation (default {d.val_fraction:g})")
    add("--steps", type=int, help=f"optimizer steps in all (default {d.steps})")
    add("--batch-size", type=int, help=f"rows per rank (default {d.batch_size})")
    add("--seq-len", type=int, help=f"tokens per segment (default {d.seq_len})")
    add("--dim", type=int, help=f"model width (default {d.dim})")
    add("--depth", type=int, help=f"layers (default {d.depth})")
    add("--heads", type=int, help=f"attention heads (default {d.heads})")
    add("--dim-head", type=int, help=f"head width (default {d.dim_head})")
    add("--memorizing-layers", type=_int_tuple,
        help=f"1-based kNN layers, comma-separated (default {','.join(map(str, d.memorizing_layers))})")
    add("--max-memories", type=int, help=f"kNN memory per row and layer (default {d.max_memories})")
    add("--num-retrieved", type=int, help=f"top-k retrieved (default {d.num_retrieved})")
    add("--xl-max-memories", type=int, help=f"XL memory tokens, 0: none (default {d.xl_max_memories})")
    add("--memory", choices=MEMORY_MODES, help=f"kNN memory (default {d.memory})")
    add("--memory-servers", type=_str_tuple,
        help="comma-separated memory server endpoints (default: $MEMTRANS_SERVERS, else start "
             "--num-servers local servers)")
    add("--num-servers", type=int, help=f"local servers to start (default {d.num_servers})")
    add("--memory-timeout", type=float,
        help=f"seconds a memory server may take to answer (default {d.memory_timeout:g})")
    add("--on-memory-failure", choices=POLICIES,
        help=f"when a memory server fails: stop the run, skip memory for that segment, or wait "
             f"for it and restore the last snapshot (default {d.on_memory_failure})")
    add("--memory-wait-timeout", type=float,
        help=f"seconds --on-memory-failure wait waits for a server (default "
             f"{d.memory_wait_timeout:g})")
    add("--index", choices=INDEX_KINDS, help=f"kNN index (default {d.index})")
    add("--grad-accum", type=int, help=f"segments per optimizer step (default {d.grad_accum})")
    add("--lr", type=float, help=f"learning rate (default {d.lr:g})")
    add("--warmup-steps", type=int, help=f"linear warmup steps (default {d.warmup_steps})")
    add("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay:g})")
    add("--clip", type=float, help=f"gradient norm clip, 0: none (default {d.clip:g})")
    add("--eval-every", type=int, help=f"validate every N steps, 0: at the end (default {d.eval_every})")
    add("--eval-batches", type=int, help=f"validation segments (default {d.eval_batches})")
    add("--out", help="run directory (default: runs/<timestamp>, or the resumed run's)")
    add("--resume", help="checkpoint file or run directory to continue")
    add("--seed", type=int, help=f"seed (default {d.seed})")
    add("--checkpoint-every", type=int,
        help=f"checkpoint every N steps, 0: at the end (default {d.checkpoint_every})")
    add("--log-every", type=int, help=f"log the loss every N steps (default {d.log_every})")
    return parser


# -----------------------------------------------------------------------------
# checkpoints


def _checkpoint_path(resume: str) -> Path:
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise TrainError(f"no checkpoint at {path}: pass a checkpoint file or a run directory "
                         f"holding {CHECKPOINT}")
    return path


def load_checkpoint(resume: str) -> tuple[Path, dict]:
    path = _checkpoint_path(resume)
    try:
        return path, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise TrainError(f"cannot read checkpoint {path}: {exc}") from None


def resolve_config(given: dict, checkpoint: dict | None, checkpoint_path: Path | None) -> TrainConfig:
    """The run's config: the flags given, over the checkpoint's config when resuming."""
    if checkpoint is None:
        return TrainConfig(**given)
    saved = checkpoint["config"]
    saved = {**saved, "memorizing_layers": tuple(saved["memorizing_layers"]),
             "memory_servers": tuple(saved["memory_servers"])}
    differing = [f"{name}: checkpoint {saved[name]!r}, now {value!r}"
                 for name, value in given.items()
                 if name not in RUN_FIELDS and saved.get(name) != value]
    if differing:
        raise TrainError(f"checkpoint {checkpoint_path} is of a different run config ("
                         + "; ".join(differing) + "); drop these flags to continue it, or start "
                         "a new run without --resume")
    config = TrainConfig(**{**saved, "out": None, "memory_servers": (), **given})
    if config.out is None:
        config.out = str(checkpoint_path.parent)
    return config


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file and rename it over the old one: a crash leaves one or the other."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _export_memories(memories: KNNMemoryList, config: TrainConfig) -> dict | None:
    """In-process kNN memories as tensors (so the checkpoint loads with ``weights_only``)."""
    if config.memory != "inproc":
        return None
    memories.collect_adds()
    state = memories.backend.store.export_namespace(memories.backend.namespace)
    for item in state["memories"]:
        item["keys"] = torch.from_numpy(item["keys"])
        item["values"] = torch.from_numpy(item["values"])
    return state


def _import_memories(memories: KNNMemoryList, state: dict) -> None:
    state = {**state, "memories": [{**item, "keys": item["keys"].numpy(),
                                    "values": item["values"].numpy()}
                                   for item in state["memories"]]}
    memories.backend.store.import_namespace(memories.backend.namespace, state)


def _snapshot_remote(memories: KNNMemoryList, tag: str, master: bool, ddp: bool) -> None:
    """Once every rank's adds are acknowledged, rank 0 has each server snapshot its shard of the
    namespace; no rank goes on (and adds) before it returns. A memory failure of any rank (its
    adds, or rank 0's snapshot) is raised on every rank, so all apply the failure policy to the
    snapshot together and none is left waiting in a collective the others skipped."""
    failures: list = [None]
    try:
        memories.collect_adds()
    except FAILURES as exc:
        failures = [exc]
    if ddp:  # also the barrier: every rank's adds are in before rank 0 snapshots
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, failures[0])
        failures = [next((exc for exc in gathered if exc is not None), None)]
    if failures[0] is not None:
        raise failures[0]
    box: list = [None]
    if master:
        try:
            memories.backend.client.snapshot(memories.backend.namespace, tag)
        except MemoryServerError as exc:
            box = [exc]
    if ddp:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]


def _servers_persist(memories: KNNMemoryList, master: bool) -> bool:
    """Whether every memory server can snapshot (was started with --data-dir); says so if not."""
    stats = memories.backend.client.stats()
    volatile = [endpoint for endpoint, s in zip(memories.backend.client.servers, stats)
                if not s["config"].get("persistent")]
    if volatile and master:
        tqdm.write(f"memtrans-train: warning: memory servers {', '.join(volatile)} run without "
                   f"--data-dir, so checkpoints cannot hold their kNN memories and --resume "
                   f"starts them empty; start the servers with --data-dir DIR to resume exactly")
    return not volatile


def _restore_remote(memories: KNNMemoryList, remote: dict | None, step: int, master: bool,
                    ddp: bool) -> None:
    """Rank 0 restores the checkpoint's snapshot on every server; no rank starts before."""
    if remote is None:
        raise TrainError(f"the checkpoint of step {step} holds no snapshot of its remote memories "
                         f"(written by an older memtrans-train), so the run cannot continue "
                         f"exactly; start a new run")
    servers = memories.backend.client.servers
    if remote["servers"] != len(servers):
        raise TrainError(f"the checkpoint's memories are {remote['servers']} server shards, but "
                         f"this run has {len(servers)} memory servers: resume with "
                         f"--num-servers {remote['servers']} or {remote['servers']} "
                         f"--memory-servers")
    box: list = [None]
    if master:
        try:
            memories.backend.client.restore(remote["namespace"], remote["tag"])
        except MemoryServerError as exc:
            box = [f"cannot restore the kNN memories of the checkpoint of step {step} (snapshot "
                   f"{remote['tag']!r} of namespace {remote['namespace']!r}): {exc}. Resume "
                   f"with servers that see the data directory the snapshot was written to"]
    if ddp:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise TrainError(box[0])


# -----------------------------------------------------------------------------
# memory servers


def check_servers(servers: list[str], timeout: float) -> None:
    """Ping each named server once, so an endpoint with nothing on it fails with one clear
    message naming it (the client's own reconnect warning is held back meanwhile)."""
    client_log = logging.getLogger("memory_server.client")
    level = client_log.level
    client_log.setLevel(logging.ERROR)
    clients = [MemoryClient(server, timeout=timeout) for server in servers]
    try:
        pings = [client.ping_async() for client in clients]
        silent = [server for server, ping in zip(servers, pings) if ping.exception() is not None]
    finally:
        for client in clients:
            client.close()
        client_log.setLevel(level)
    if silent:
        raise TrainError(f"memory server {', '.join(silent)} did not answer a ping within "
                         f"{timeout:g} s (--memory-timeout): start it (memory-server --bind "
                         f"ENDPOINT), fix --memory-servers / MEMTRANS_SERVERS, or name no "
                         f"servers to have local ones started")


# -----------------------------------------------------------------------------
# training


class MemoryWait:
    """Seconds the trainer spent blocked on kNN memory: waiting for retrievals (each memory's
    ``retrieved``, wrapped), for outstanding adds, and for clears. Time the memory works while
    the model computes is not counted: that is the overlap the design is for."""

    def __init__(self):
        self.seconds = 0.0

    @contextlib.contextmanager
    def measure(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def watch(self, memories: KNNMemoryList) -> None:
        for memory in memories:
            retrieved = memory.retrieved

            def timed(pending, retrieved=retrieved):
                with self.measure():
                    return retrieved(pending)

            memory.retrieved = timed

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _reset_rows(segment, memories: KNNMemoryList, xl: list | None, wait: MemoryWait):
    """Clear the kNN memories and zero the XL memories of rows that start a new document."""
    rows = segment.reset.nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return xl
    with wait.measure():
        memories.clear_memory(rows.tolist())
    if xl is None:
        return None
    # Zeroed XL keys/values still take a share of the softmax for one segment; masking them
    # would need an XL mask argument in the model.
    keep = (~segment.reset).to(xl[0].dtype).view(-1, 1, 1, 1)
    return [m * keep.to(m.device) for m in xl]


def _forward(model, segment, memories, xl, *, add_knn_memory: bool, device):
    out = model(segment.x.to(device), knn_memories=memories, xl_memories=xl,
                labels=segment.labels.to(device), add_knn_memory=add_knn_memory)
    return out if isinstance(out, tuple) else (out, None)


def _sum_over_ranks(values: list[float], ddp: bool, device) -> list[float]:
    if not ddp:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def evaluate(model: MemorizingTransformer, corpus, config: TrainConfig, memories: KNNMemoryList,
             *, retrieval: bool, rank: int, world_size: int, ddp: bool, device) -> float:
    """Validation bits per byte on the first ``eval_batches`` segments, from empty memories."""
    model.eval()
    stream = corpus.val_stream(batch_size=config.batch_size, seq_len=config.seq_len, rank=rank,
                               world_size=world_size)
    memories.clear_memory()
    xl, nats, tokens = None, 0.0, 0
    for segment in itertools.islice(stream, config.eval_batches):
        xl = _reset_rows(segment, memories, xl, MemoryWait())
        loss, xl = _forward(model, segment, memories, xl, add_knn_memory=retrieval, device=device)
        n = int((segment.labels != PAD_ID).sum())
        nats, tokens = nats + loss.item() * n, tokens + n
    memories.collect_adds()
    model.train()
    nats, tokens = _sum_over_ranks([nats, tokens], ddp, device)
    return nats / max(tokens, 1) / math.log(2)


def build_model(config: TrainConfig) -> MemorizingTransformer:
    return MemorizingTransformer(
        num_tokens=NUM_TOKENS, dim=config.dim, depth=config.depth, heads=config.heads,
        dim_head=config.dim_head, memorizing_layers=config.memorizing_layers,
        max_knn_memories=config.max_memories, num_retrieved_memories=config.num_retrieved,
        xl_max_memories=config.xl_max_memories, pad_id=PAD_ID)


def _make_memories(model: MemorizingTransformer, config: TrainConfig, servers: list[str] | None,
                   namespace: str | None = None):
    if servers is not None:
        return model.create_knn_memories(batch_size=config.batch_size, servers=servers,
                                         namespace=namespace, index=config.index,
                                         timeout=config.memory_timeout)
    # In-process even when MEMTRANS_SERVERS is set (create_knn_memories would follow it).
    return KNNMemoryList.create_memories(batch_size=config.batch_size,
                                         num_memory_layers=model.num_memory_layers)(
        dim=config.dim_head, max_memories=config.max_memories, multiprocessing=False,
        index=config.index)


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT's grouping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def _lr(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


class RunLog:
    """``<out>/log.jsonl`` (one JSON object per line, appended across resumes) and the console."""

    def __init__(self, out: Path | None):
        self.path = out / LOG if out is not None else None

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def plot_validation(out: Path) -> str:
    """``<out>/validation.png`` from the log's evaluations; a note if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    records = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("val_bpb_memory", "kNN memory"), ("val_bpb_no_memory", "no retrieval")):
        points = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set(xlabel="step", ylabel="validation bits per byte", title=out.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "validation.png", dpi=120)
    plt.close(fig)
    return f"plot: {out / 'validation.png'}"


def train(config: TrainConfig, corpus: Corpus, checkpoint: dict | None, *, ddp: bool, rank: int,
          world_size: int, device: torch.device, servers: list[str] | None,
          out: Path | None, local: LocalServers | None = None) -> None:
    """The training loop; ``out`` is None on every rank but 0, and so is ``local`` (the
    auto-started servers, told of each snapshot so they restart from it)."""
    master = rank == 0
    stream = corpus.train_stream(batch_size=config.batch_size, seq_len=config.seq_len, rank=rank,
                                 world_size=world_size, seed=config.seed)

    torch.manual_seed(config.seed)
    raw_model = build_model(config).to(device)
    optimizer = _optimizer(raw_model, config)
    log = RunLog(out)
    step, xl = 0, None

    with contextlib.ExitStack() as stack:
        remote = (checkpoint or {}).get("remote_memory")
        memories = _make_memories(raw_model, config, servers,
                                  namespace=remote["namespace"] if remote else None)
        stack.callback(_quietly, memories.cleanup)
        val_memories = _make_memories(raw_model, config, servers)
        stack.callback(_quietly, val_memories.cleanup)
        blank = _make_memories(raw_model, config, None)  # "without memory": stays empty
        stack.callback(blank.cleanup)
        recovery = MemoryRecovery(config.on_memory_failure, config.memory_wait_timeout,
                                  [memories, val_memories] if servers is not None else [],
                                  rank=rank, on_failure=log.write)

        if checkpoint is not None:
            ranks = checkpoint["ranks"]
            if len(ranks) != world_size:
                raise TrainError(f"the checkpoint was written by {len(ranks)} ranks, this run has "
                                 f"{world_size}: resume with the same number of ranks")
            mine = ranks[rank]
            raw_model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            stream.load_state_dict(mine["stream"])
            torch.set_rng_state(mine["rng"])
            xl = [m.to(device) for m in mine["xl"]] if mine["xl"] is not None else None
            if mine["knn"] is not None:
                _import_memories(memories, mine["knn"])
            if servers is not None and remote is not None and remote["tag"] is None:
                if master:
                    tqdm.write("memtrans-train: warning: the checkpoint holds no kNN memories "
                               "(its servers ran without --data-dir); they start empty")
            elif servers is not None:
                _restore_remote(memories, remote, checkpoint["step"], master, ddp)
                recovery.snapshot_taken(remote["namespace"], remote["tag"])
                if local is not None:
                    local.snapshot_taken(remote["namespace"], remote["tag"])
            step = checkpoint["step"]

        model = raw_model
        if ddp:
            model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=len(config.memorizing_layers) == config.depth)
        wait = MemoryWait()
        wait.watch(memories)
        retrieval = config.memory != "off"

        def validate() -> None:
            args = dict(rank=rank, world_size=world_size, ddp=ddp, device=device)

            def with_memory_attempt(use_memory: bool):
                if not use_memory:  # skipped: reported as no figure rather than a wrong one
                    evaluate(raw_model, corpus, config, blank, retrieval=False, **args)
                    return None
                return evaluate(raw_model, corpus, config, val_memories, retrieval=True, **args)

            with_memory = recovery.run(step, "validation", with_memory_attempt) \
                if retrieval else None
            if retrieval and ddp and _sum_over_ranks([float(with_memory is None)], ddp, device)[0]:
                with_memory = None  # a rank skipped: its share of the figure had no memory
            without = recovery.run(step, "validation", lambda use_memory: evaluate(
                raw_model, corpus, config, val_memories if use_memory else blank,
                retrieval=False, **args))
            log.write({"kind": "eval", "step": step, "val_bpb_memory": with_memory,
                       "val_bpb_no_memory": without})
            if master:
                shown = f"{with_memory:.4f}" if with_memory is not None else "-"
                tqdm.write(f"step {step}: validation bits/byte with memory {shown}, "
                           f"without {without:.4f}")

        persistent = servers is None or _servers_persist(memories, master)

        def checkpoint_now() -> None:
            remote_memory = None
            if servers is not None and not persistent:
                remote_memory = {"namespace": memories.backend.namespace, "tag": None,
                                 "servers": len(memories.backend.client.servers)}
            elif servers is not None:
                previous = recovery.snapshot[1] if recovery.snapshot else SNAPSHOT_SLOTS[1]
                tag = SNAPSHOT_SLOTS[1 - SNAPSHOT_SLOTS.index(previous)]
                if not recovery.run(step, "snapshot", lambda use_memory: use_memory and (
                        _snapshot_remote(memories, tag, master, ddp) or True)):
                    if master:
                        tqdm.write(f"step {step}: checkpoint skipped: the memory servers could "
                                   f"not snapshot; the previous checkpoint is kept")
                    return
                namespace = memories.backend.namespace
                remote_memory = {"namespace": namespace, "tag": tag,
                                 "servers": len(memories.backend.client.servers)}
                recovery.snapshot_taken(namespace, tag)
                if local is not None:
                    local.snapshot_taken(namespace, tag)
            mine = {"stream": stream.state_dict(), "rng": torch.get_rng_state(),
                    "xl": [m.cpu() for m in xl] if xl is not None else None,
                    "knn": _export_memories(memories, config)}
            ranks = [None] * world_size if master else None
            if ddp:
                dist.gather_object(mine, ranks, dst=0)
            else:
                ranks = [mine]
            if master:
                save_checkpoint(out / CHECKPOINT, {
                    "config": dataclasses.asdict(config), "step": step, "world_size": world_size,
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "ranks": ranks, "remote_memory": remote_memory})

        bar = tqdm(total=config.steps, initial=step, disable=not master, unit="step",
                   dynamic_ncols=True)
        stack.callback(bar.close)
        nats = tokens = busy = 0.0
        window = 0  # steps since the last log line
        while step < config.steps:
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, config)
            for micro in range(config.grad_accum):
                segment = next(stream)
                recovery.note_resets(segment.reset.nonzero(as_tuple=True)[0].tolist())
                if ddp:
                    model.require_backward_grad_sync = micro == config.grad_accum - 1

                def attempt(use_memory: bool, segment=segment, xl=xl):
                    knn = memories if use_memory else blank
                    xl = _reset_rows(segment, knn, xl, wait)
                    return _forward(model, segment, knn, xl,
                                    add_knn_memory=retrieval and use_memory, device=device)

                loss, xl = recovery.run(step, "training segment", attempt)
                (loss / config.grad_accum).backward()
                n = int((segment.labels != PAD_ID).sum())
                nats, tokens = nats + loss.item() * n, tokens + n
            if config.clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with wait.measure():
                try:
                    memories.collect_adds()
                except FAILURES as exc:  # adds of this step lost; nothing to redo
                    recovery.handle(exc, step, "collecting adds")
            step, window = step + 1, window + 1
            busy += time.perf_counter() - started
            bar.update()

            if step % config.log_every == 0 or step == config.steps:
                nats, tokens, waited, skipped = _sum_over_ranks(
                    [nats, tokens, wait.take(), recovery.skipped], ddp, device)
                bpb = nats / max(tokens, 1) / math.log(2)
                record = {"kind": "train", "step": step, "train_bpb": bpb,
                          "tokens_per_s": tokens / busy,
                          "memory_wait_s_per_step": waited / world_size / window,
                          "lr": _lr(step - 1, config), "memory_skipped": int(skipped)}
                log.write(record)
                bar.set_postfix(bpb=f"{bpb:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                mem_wait=f"{1000 * record['memory_wait_s_per_step']:.0f}ms/step",
                                **({"mem_skipped": int(skipped)} if skipped else {}))
                nats = tokens = busy = 0.0
                window = 0
            if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                validate()
            if (config.checkpoint_every and step % config.checkpoint_every == 0) \
                    or step == config.steps:
                checkpoint_now()


def _quietly(cleanup) -> None:
    """Run a cleanup that must not hide the error that is ending the run."""
    try:
        cleanup()
    except Exception as exc:  # e.g. a memory server already gone
        print(f"memtrans-train: warning: cleanup failed: {exc}", file=sys.stderr)


# -----------------------------------------------------------------------------
# entry point


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    given = vars(build_parser().parse_args(argv))
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)  # run the finally blocks
    try:
        if ddp:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            if torch.cuda.is_available():
                device = torch.device("cuda", local_rank)
                torch.cuda.set_device(device)
            else:
                device = torch.device("cpu")
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

        checkpoint = checkpoint_path = None
        if "resume" in given:
            checkpoint_path, checkpoint = load_checkpoint(given["resume"])
        try:
            config = resolve_config(given, checkpoint, checkpoint_path)
        except ValueError as exc:
            raise TrainError(f"invalid setting: {exc}") from None
        corpus = load_corpus(config.data, val_fraction=config.val_fraction)
        corpus.val_stream(batch_size=config.batch_size, seq_len=config.seq_len, rank=rank,
                          world_size=world_size)  # fail now, not at the first evaluation
        out = Path(config.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        if master:
            if checkpoint is None and (out / CHECKPOINT).exists():
                raise TrainError(f"{out} already holds a checkpoint: continue it with --resume "
                                 f"{out}, or choose another --out")
            out.mkdir(parents=True, exist_ok=True)
            config.out = str(out)

        with contextlib.ExitStack() as stack:
            servers = local = None
            if config.memory == "remote":
                servers = list(config.memory_servers) or servers_from_env()
                if servers is None:
                    def start_local():
                        nonlocal local
                        local = stack.enter_context(LocalServers(
                            config.num_servers, out,
                            supervise=config.on_memory_failure != "stop"))
                        return local.endpoints

                    servers = _broadcast(start_local, ddp, master)
                else:
                    check_servers(servers, config.memory_timeout)
            if master:
                print(f"memtrans-train: run directory {out}; memory {config.memory}"
                      + (f" on {', '.join(servers)}" if servers else ""), flush=True)
            if master:
                print(f"memtrans-train: corpus: {corpus.description}", flush=True)
            train(config, corpus, checkpoint, ddp=ddp, rank=rank, world_size=world_size, device=device,
                  servers=servers, out=out if master else None, local=local)
            if master:
                print(f"memtrans-train: done; checkpoint {out / CHECKPOINT}; "
                      f"{plot_validation(out)}", flush=True)
        return 0
    except (TrainError, CorpusError, MemoryServerError, MemoryFailure) as exc:
        print(f"memtrans-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memtrans-train: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if not (ddp and _peer_gone(exc)):
            raise
        # Another rank ended the run (e.g. --on-memory-failure stop) while this one waited for
        # it in a collective; that rank's message says why, torchrun stops the rest.
        print(f"memtrans-train: error: rank {rank}: lost contact with another rank, which "
              f"ended (see its message, if any): {str(exc).splitlines()[0][:200]}",
              file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


def _peer_gone(exc: RuntimeError) -> bool:
    """Whether a collective failed because another rank's process went away."""
    return isinstance(exc, dist.DistNetworkError) or any(
        text in str(exc) for text in ("Connection closed by peer", "Connection reset by peer"))


def _broadcast(make, ddp: bool, master: bool):
    """``make()`` on rank 0, its result on every rank; an error on rank 0 stops every rank."""
    box = [None]
    if master:
        try:
            box = [("ok", make())]
        except (TrainError, ServerStartError) as exc:
            box = [("error", str(exc))]
    if ddp:
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise TrainError(value if master else f"rank 0 could not start memory servers: {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
