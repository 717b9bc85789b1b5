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
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from memory_server import MemoryServerError

from .config import RUN_FIELDS, TrainConfig, TrainError
from .memory import KNNMemoryList
from .recovery import FAILURES

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
    # Checkpoints from before smeared keys and kNN convolutions existed have neither; those from
    # before package documents read uncut files; none of them was initialised from another run.
    saved = {"smear_keys": False, "qk_conv": 0, "qk_conv_layers": None, "documents": "file",
             "max_document_bytes": 0, "init_from": None, **checkpoint["config"]}
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


def export_memories(memories: KNNMemoryList, config: TrainConfig) -> dict | None:
    """In-process kNN memories as tensors (so the checkpoint loads with ``weights_only``)."""
    if config.memory != "inproc":
        return None
    memories.collect_adds()
    state = memories.backend.store.export_namespace(memories.backend.namespace)
    for item in state["memories"]:  # keys, values and an ivf index's centroids
        for name, value in item.items():
            if isinstance(value, np.ndarray):
                item[name] = torch.from_numpy(value)
    return state


def import_memories(memories: KNNMemoryList, state: dict) -> None:
    state = {**state, "memories": [{name: value.numpy() if isinstance(value, torch.Tensor)
                                    else value for name, value in item.items()}
                                   for item in state["memories"]]}
    memories.backend.store.import_namespace(memories.backend.namespace, state)


def snapshot_remote(memories: KNNMemoryList, tag: str, master: bool, ddp: bool) -> None:
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


def servers_persist(memories: KNNMemoryList, master: bool) -> bool:
    """Whether every memory server can snapshot (was started with --data-dir); says so if not."""
    stats = memories.backend.client.stats()
    volatile = [endpoint for endpoint, s in zip(memories.backend.client.servers, stats)
                if not s["config"].get("persistent")]
    if volatile and master:
        tqdm.write(f"memtrans-train: warning: memory servers {', '.join(volatile)} run without "
                   f"--data-dir, so checkpoints cannot hold their kNN memories and --resume "
                   f"starts them empty; start the servers with --data-dir DIR to resume exactly")
    return not volatile


def restore_remote(memories: KNNMemoryList, remote: dict | None, step: int, master: bool,
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
