"""Checkpoints of a training run.

Checkpoints (``<out>/checkpoint.pt``, written atomically) hold the model, optimizer, step, config,
and per rank the data position, RNG state, XL memories and, with ``--memory inproc``, the kNN
memories, so ``--resume`` continues with exactly the losses of an uninterrupted run. With
``remote`` memory, once every rank's adds are acknowledged, rank 0 has the servers snapshot the
namespace (each server its own shard, into its ``--data-dir``; auto-started servers use
``<out>/memory``) and the checkpoint records namespace, tag and server count; ``--resume`` restores
that snapshot into the same namespace on the same number of servers. Snapshot tags alternate
between two slots (``ckpt-0``, ``ckpt-1``), so the disk holds at most two snapshots per run and a
crash while one is written leaves the one the checkpoint names intact. With the default constant
learning rate, a run extended with ``--resume --steps N`` is the run that had been asked for ``N``
steps.

``CheckpointManager`` owns all of it for a run: ``start`` (fresh, from ``--init-from`` weights,
or from a checkpoint) and ``save``. ``load_checkpoint`` and ``resolve_config`` also serve
``memtrans-evaluate`` and ``memtrans-generate``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from memory_server import MemoryServerError

from .config import RUN_FIELDS, TrainConfig, TrainError
from .data import DocumentStream
from .memory import KNNMemoryList
from .place import Place
from .recovery import FAILURES, MemoryRecovery
from .servers import LocalServers

CHECKPOINT = "checkpoint.pt"
SNAPSHOT_SLOTS = ("ckpt-0", "ckpt-1")
"""Snapshot tags of remote memories, used in turn by successive checkpoints."""


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


def resolve_config(given: dict, checkpoint: dict | None,
                   checkpoint_path: Path | None) -> TrainConfig:
    """The run's config: the flags given, over the checkpoint's config when resuming."""
    if checkpoint is None:
        return TrainConfig(**given)
    # Checkpoints from before smeared keys, kNN convolutions and the copy warm-up existed have
    # none of them; those from before package documents read uncut files; none of them was
    # initialised from another run, read spans twice or stored float16 keys.
    saved = {"smear_keys": False, "qk_conv": 0, "qk_conv_layers": None, "copy_warmup_steps": 0,
             "documents": "file", "max_document_bytes": 0, "init_from": None,
             "key_dtype": "float32", "repeat_spans": 0.0,
             "repeat_span": None,
             **checkpoint["config"]}
    saved = {**saved, "memorizing_layers": tuple(saved["memorizing_layers"]),
             "qk_conv_layers": None if saved["qk_conv_layers"] is None
             else tuple(saved["qk_conv_layers"]),
             "memory_servers": tuple(saved["memory_servers"])}
    differing = [f"{name}: checkpoint {saved.get(name)!r}, now {value!r}"
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


def load_weights(model: torch.nn.Module, weights: dict, source: str) -> list[str]:
    """Load ``weights`` (a checkpoint's ``model``) into ``model`` for ``--init-from``; returns
    the names of the model's parameters and buffers the weights lack, which keep their
    initialisation. Weights the model has no place for, or of another shape, are refused: they
    are a different architecture, and loading around them would train a silently broken model."""
    own = model.state_dict()
    unexpected = sorted(set(weights) - set(own))
    mismatched = [f"{name}: checkpoint {tuple(weights[name].shape)}, this model "
                  f"{tuple(own[name].shape)}" for name in weights
                  if name in own and weights[name].shape != own[name].shape]
    if unexpected or mismatched:
        raise TrainError(f"--init-from {source}: its weights do not fit this model ("
                         + "; ".join(mismatched + [f"{name}: not in this model"
                                                   for name in unexpected[:5]])
                         + (f"; and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
                         + "); start from a run of the same --dim, --depth, --heads, --dim-head "
                         "and --memorizing-layers (to fine-tune with memory, one trained with "
                         "--memory off: its kNN layers are plain attention without retrieval)")
    model.load_state_dict(weights, strict=False)
    return sorted(set(own) - set(weights))


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file and rename it over the old one: a crash leaves one or the other."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def memory_namespace(checkpoint: dict | None) -> str | None:
    """The namespace of a checkpoint's remote memories: a resumed run keeps it, so that the
    snapshot restores into the namespace its clients use."""
    remote = (checkpoint or {}).get("remote_memory")
    return remote["namespace"] if remote else None


@dataclass(slots=True)
class TrainState:
    """Where the loop is: what a checkpoint holds besides model, optimizer, data and memories."""

    step: int = 0
    train_seconds: float = 0.0
    """Wall seconds spent in training steps; validation and checkpoints excluded."""
    xl: list[torch.Tensor] | None = None
    """This rank's Transformer-XL memories, carried from one segment to the next."""


class CheckpointManager:
    """Saves and restores all that a run needs to go on exactly: model, optimizer, step and config
    (rank 0 writes the file), and per rank the data position, RNG state, XL memories and kNN
    memories (in the file for ``inproc``, as a server snapshot named in it for ``remote``).
    Every rank calls ``start`` and ``save`` together: they hold collectives."""

    def __init__(self, out: Path | None, config: TrainConfig, place: Place, *,
                 model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 stream: DocumentStream, memories: KNNMemoryList, recovery: MemoryRecovery,
                 local: LocalServers | None, log: Callable[[dict], None]):
        """``out`` and ``local`` (the auto-started servers, told of each snapshot so that they
        restart from it) are None on every rank but 0."""
        self.path = out / CHECKPOINT if out is not None else None
        self.config, self.place = config, place
        self.model, self.optimizer, self.stream = model, optimizer, stream
        self.memories, self.recovery, self.local, self.log = memories, recovery, local, log
        self.remote = config.memory == "remote"
        self.persistent = True
        """Whether the memory servers can snapshot (``start`` asks them)."""

    # -- starting

    def start(self, checkpoint: dict | None, init_weights: dict | None = None) -> TrainState:
        """The state the run starts from: the checkpoint's (``--resume``), else step 0 with the
        weights of ``init_weights`` (``--init-from``) or fresh ones; then asks whether the memory
        servers can snapshot the checkpoints to come."""
        if checkpoint is not None:
            state = self._load(checkpoint)
        else:
            state = TrainState()
            if init_weights is not None:
                self._init_weights(init_weights)
        if self.remote:
            self.persistent = self._servers_persist()
        return state

    def _init_weights(self, weights: dict) -> None:
        source = self.config.init_from
        new = load_weights(self.model, weights, source)
        self.log({"kind": "init", "init_from": source, "new_parameters": new})
        if self.place.master:
            tqdm.write(f"memtrans-train: weights from {source}; initialised here: "
                       f"{', '.join(new) or 'nothing'}")

    def _load(self, checkpoint: dict) -> TrainState:
        ranks = checkpoint["ranks"]
        if len(ranks) != self.place.world_size:
            raise TrainError(f"the checkpoint was written by {len(ranks)} ranks, this run has "
                             f"{self.place.world_size}: resume with the same number of ranks")
        mine = ranks[self.place.rank]
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.stream.load_state_dict(mine["stream"])
        torch.set_rng_state(mine["rng"])
        if mine["knn"] is not None:
            self._import_memories(mine["knn"])
        remote = checkpoint.get("remote_memory")
        if self.remote and remote is not None and remote["tag"] is None:
            if self.place.master:
                tqdm.write("memtrans-train: warning: the checkpoint holds no kNN memories "
                           "(its servers ran without --data-dir); they start empty")
        elif self.remote:
            self._restore_servers(remote, checkpoint["step"])
            self._snapshot_taken(remote["namespace"], remote["tag"])
        return TrainState(step=checkpoint["step"],
                          train_seconds=checkpoint.get("train_seconds", 0.0),
                          xl=[m.to(self.place.device) for m in mine["xl"]]
                          if mine["xl"] is not None else None)

    # -- saving

    def save(self, state: TrainState) -> None:
        """The checkpoint of ``state``, over the previous one; with remote memory, once the
        servers have snapshot it (if they cannot and the policy goes on, the previous
        checkpoint is kept, saying so)."""
        remote_memory = None
        if self.remote:
            remote_memory = self._snapshot(state.step)
            if remote_memory is None:
                return
        mine = {"stream": self.stream.state_dict(), "rng": torch.get_rng_state(),
                "xl": [m.cpu() for m in state.xl] if state.xl is not None else None,
                "knn": self._export_memories()}
        place = self.place
        ranks = [None] * place.world_size if place.master else None
        if place.ddp:
            dist.gather_object(mine, ranks, dst=0)
        else:
            ranks = [mine]
        if place.master:
            save_checkpoint(self.path, {
                "config": dataclasses.asdict(self.config), "step": state.step,
                "world_size": place.world_size, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "ranks": ranks,
                "remote_memory": remote_memory, "train_seconds": state.train_seconds})

    def _snapshot(self, step: int) -> dict | None:
        """What the checkpoint records of the remote memories, once the servers have snapshot
        them into the slot the last checkpoint did not use (no tag: they cannot snapshot);
        None if the snapshot failed and the policy goes on without it."""
        backend = self.memories.backend
        record = {"namespace": backend.namespace, "tag": None,
                  "servers": len(backend.client.servers)}
        if not self.persistent:
            return record
        previous = self.recovery.snapshot[1] if self.recovery.snapshot else SNAPSHOT_SLOTS[1]
        tag = SNAPSHOT_SLOTS[1 - SNAPSHOT_SLOTS.index(previous)]
        if not self.recovery.run(step, "snapshot", functools.partial(self._try_snapshot, tag)):
            if self.place.master:
                tqdm.write(f"step {step}: checkpoint skipped: the memory servers could not "
                           f"snapshot; the previous checkpoint is kept")
            return None
        self._snapshot_taken(backend.namespace, tag)
        return {**record, "tag": tag}

    def _try_snapshot(self, tag: str, use_memory: bool) -> bool:
        """One attempt for ``MemoryRecovery.run``: without memory there is nothing to snapshot."""
        if use_memory:
            self._snapshot_servers(tag)
        return use_memory

    def _snapshot_taken(self, namespace: str, tag: str) -> None:
        """The snapshot that a server which fails from now on is restored from."""
        self.recovery.snapshot_taken(namespace, tag)
        if self.local is not None:
            self.local.snapshot_taken(namespace, tag)

    # -- kNN memories

    def _export_memories(self) -> dict | None:
        """In-process kNN memories as tensors (so the checkpoint loads with ``weights_only``)."""
        if self.config.memory != "inproc":
            return None
        self.memories.collect_adds()
        backend = self.memories.backend
        state = backend.store.export_namespace(backend.namespace)
        for item in state["memories"]:  # keys, values and an ivf index's centroids
            for name, value in item.items():
                if isinstance(value, np.ndarray):
                    item[name] = torch.from_numpy(value)
        return state

    def _import_memories(self, state: dict) -> None:
        state = {**state, "memories": [{name: value.numpy() if isinstance(value, torch.Tensor)
                                        else value for name, value in item.items()}
                                       for item in state["memories"]]}
        backend = self.memories.backend
        backend.store.import_namespace(backend.namespace, state)

    def _snapshot_servers(self, tag: str) -> None:
        """Once every rank's adds are acknowledged, rank 0 has each server snapshot its shard of
        the namespace; no rank goes on (and adds) before it returns. A memory failure of any rank
        (its adds, or rank 0's snapshot) is raised on every rank, so all apply the failure policy
        to the snapshot together and none is left waiting in a collective the others skipped."""
        ddp, backend = self.place.ddp, self.memories.backend
        failures: list = [None]
        try:
            self.memories.collect_adds()
        except FAILURES as exc:
            failures = [exc]
        if ddp:  # also the barrier: every rank's adds are in before rank 0 snapshots
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, failures[0])
            failures = [next((exc for exc in gathered if exc is not None), None)]
        if failures[0] is not None:
            raise failures[0]
        box: list = [None]
        if self.place.master:
            try:
                backend.client.snapshot(backend.namespace, tag)
            except MemoryServerError as exc:
                box = [exc]
        if ddp:
            dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise box[0]

    def _servers_persist(self) -> bool:
        """Whether every memory server can snapshot (was started with --data-dir); says so if
        not."""
        client = self.memories.backend.client
        volatile = [endpoint for endpoint, s in zip(client.servers, client.stats())
                    if not s["config"].get("persistent")]
        if volatile and self.place.master:
            tqdm.write(f"memtrans-train: warning: memory servers {', '.join(volatile)} run "
                       f"without --data-dir, so checkpoints cannot hold their kNN memories and "
                       f"--resume starts them empty; start the servers with --data-dir DIR to "
                       f"resume exactly")
        return not volatile

    def _restore_servers(self, remote: dict | None, step: int) -> None:
        """Rank 0 restores the checkpoint's snapshot on every server; no rank starts before."""
        if remote is None:
            raise TrainError(f"the checkpoint of step {step} holds no snapshot of its remote "
                             f"memories (written by an older memtrans-train), so the run cannot "
                             f"continue exactly; start a new run")
        client = self.memories.backend.client
        if remote["servers"] != len(client.servers):
            raise TrainError(f"the checkpoint's memories are {remote['servers']} server shards, "
                             f"but this run has {len(client.servers)} memory servers: resume "
                             f"with --num-servers {remote['servers']} or {remote['servers']} "
                             f"--memory-servers")
        box: list = [None]
        if self.place.master:
            try:
                client.restore(remote["namespace"], remote["tag"])
            except MemoryServerError as exc:
                box = [f"cannot restore the kNN memories of the checkpoint of step {step} "
                       f"(snapshot {remote['tag']!r} of namespace {remote['namespace']!r}): "
                       f"{exc}. Resume with servers that see the data directory the snapshot "
                       f"was written to"]
        if self.place.ddp:
            dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise TrainError(box[0])
