"""`memtrans-train`: train a Memorizing Transformer on document streams, alone or under torchrun.

Every batch row reads one long document in consecutive segments (``memtrans.data``); a row that
starts a new document has its kNN memories cleared, and its Transformer-XL memories are masked out
of that segment's attention and kept out of its kNN memory, so a row's memories only ever hold
the document it is reading (the paper's setup). One optimizer step takes ``grad_accum``
consecutive segments of the same documents, in order, because memory order matters. Losses are in bits per byte: the cross entropy over the
non-pad next tokens (the bytes of a document and its EOS) divided by ln 2. Each training log
record also says how much of the corpus the run has read (``coverage``: documents started,
epochs covered, tokens).

Memory (``--memory``):

- ``remote`` (default): memories on ``memory-server`` processes: the endpoints of
  ``--memory-servers`` or ``MEMTRANS_SERVERS``, else ``--num-servers`` local servers this command
  starts on loopback (rank 0 starts them and broadcasts their endpoints) and stops at exit, also
  on Ctrl-C, SIGTERM or an error.
- ``inproc``: memories in this process (the same ``MemoryStore``, so the same numbers).
- ``off``: the same model, its memories never filled (retrieval finds nothing): the baseline.

Validation runs the first ``--eval-batches`` segments of the validation split twice with fresh
memories, with retrieval and without (``add_knn_memory=False`` on empty memories), and appends both
bits-per-byte figures to ``<out>/log.jsonl`` (``evaluation.py``), with the learned temperatures
(and gates) of the kNN layers. On ``--data recall`` (``recall.py``) it adds the answer accuracy and
bits per answer token of in-context and memory-only queries, and the retrieval hit rate.

Checkpoints and ``--resume``: ``checkpoint.py``.

A memory server that fails mid-run is handled by ``--on-memory-failure`` (``recovery.py``):
``stop`` (default) ends the run naming the endpoint, ``skip`` goes on without memory for the
failed segment, ``wait`` waits for the server and restores the last snapshot. Auto-started servers
are supervised (``servers.py``): one that dies is restarted on its port from the last snapshot.

Under torchrun (``RANK`` set): gloo on CPU, nccl on CUDA, DDP; global batch row
``rank * batch_size + row``; each rank streams a disjoint share of the documents; rank 0 logs,
evaluates into the log, checkpoints and starts local servers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from memory_server import MemoryServerError
from memory_server.client import MemoryClient
from memory_server.tenants import TOKEN_ENV

from .checkpoint import (CHECKPOINT, SNAPSHOT_SLOTS, export_memories, import_memories,
                         load_checkpoint, load_weights, resolve_config, restore_remote,
                         save_checkpoint, servers_persist, snapshot_remote)
from .config import RECALL, TrainConfig, TrainError, build_parser
from .copy_task import copy_batch, warmup_rng
from .data import (NUM_TOKENS, PAD_ID, Corpus, CorpusError, DocumentStream, Segment,
                   load_corpus)
from .evaluation import (EvalSettings, evaluate, knn_layer_parameters, recall_line,
                         sum_over_ranks, xl_valid)
from .memory import KNNMemoryList, servers_from_env
from .model import MemorizingTransformer
from .recall import RecallCorpus, RecallTask
from .recovery import FAILURES, MemoryFailure, MemoryRecovery
from .servers import LocalServers, ServerStartError

LOG = "log.jsonl"


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


def _reset_rows(segment, memories: KNNMemoryList, wait: MemoryWait) -> None:
    """Clear the kNN memories of rows that start a new document (``_forward`` masks their XL)."""
    rows = segment.reset.nonzero(as_tuple=True)[0]
    if rows.numel():
        with wait.measure():
            memories.clear_memory(rows.tolist())


def _forward(model, segment, memories, xl, *, add_knn_memory: bool, device):
    out = model(segment.x.to(device), knn_memories=memories, xl_memories=xl,
                labels=segment.labels.to(device), add_knn_memory=add_knn_memory,
                xl_valid=xl_valid(segment))
    return out if isinstance(out, tuple) else (out, None)


def _copy_segment(config: TrainConfig, rank: int, step: int, micro: int) -> Segment:
    """One micro-batch of the copy warm-up, as a segment of fresh one-segment documents."""
    x, labels, _ = copy_batch(warmup_rng(config.seed, rank, step, micro), config.batch_size,
                              config.seq_len)
    return Segment(x=x, labels=labels, reset=torch.ones(config.batch_size, dtype=torch.bool),
                   offsets=(0,) * config.batch_size)


def eval_settings(config: TrainConfig, rank: int = 0, world_size: int = 1) -> EvalSettings:
    return EvalSettings(batch_size=config.batch_size, seq_len=config.seq_len,
                        segments=config.eval_batches, rank=rank, world_size=world_size)


def build_model(config: TrainConfig) -> MemorizingTransformer:
    return MemorizingTransformer(
        num_tokens=NUM_TOKENS, dim=config.dim, depth=config.depth, heads=config.heads,
        dim_head=config.dim_head, memorizing_layers=config.memorizing_layers,
        max_knn_memories=config.max_memories, num_retrieved_memories=config.num_retrieved,
        xl_max_memories=config.xl_max_memories, pad_id=PAD_ID, knn_combine=config.knn_combine,
        smear_keys=config.smear_keys, qk_conv=config.qk_conv,
        qk_conv_layers=config.qk_conv_layers)


def open_corpus(config: TrainConfig):
    """The run's corpus: the recall task for ``--data recall``, else files (``load_corpus``)."""
    if config.data == RECALL:
        task = RecallTask(bindings=config.recall_bindings, distance=config.recall_distance,
                          in_context_fraction=config.recall_in_context_fraction)
        task.check_window(config.seq_len, config.xl_max_memories)
        return RecallCorpus.create(task)
    return load_corpus(config.data, val_fraction=config.val_fraction, documents=config.documents,
                       max_document_bytes=config.max_document_bytes)


def make_memories(model: MemorizingTransformer, config: TrainConfig, servers: list[str] | None,
                  namespace: str | None = None):
    """The run's kNN memories: on ``servers``, or in this process when that is None."""
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
    """AdamW with weight decay on the weights of linear layers (the matmuls) only. Embeddings,
    relative-position biases, biases, norm gains, kNN temperatures and gates get none: decay
    would pull a temperature of shape (heads, 1, 1) towards 1, whatever its number of dims."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in decayed],
               "weight_decay": config.weight_decay},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


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
          out: Path | None, local: LocalServers | None = None,
          init_weights: dict | None = None) -> None:
    """The training loop; ``out`` is None on every rank but 0, and so is ``local`` (the
    auto-started servers, told of each snapshot so they restart from it)."""
    master = rank == 0
    stream = corpus.train_stream(batch_size=config.batch_size, seq_len=config.seq_len, rank=rank,
                                 world_size=world_size, seed=config.seed)

    torch.manual_seed(config.seed)
    raw_model = build_model(config)
    log = RunLog(out)
    if init_weights is not None:  # --init-from
        new = load_weights(raw_model, init_weights, config.init_from)
        log.write({"kind": "init", "init_from": config.init_from, "new_parameters": new})
        if master:
            tqdm.write(f"memtrans-train: weights from {config.init_from}; initialised here: "
                       f"{', '.join(new) or 'nothing'}")
    raw_model = raw_model.to(device)
    optimizer = _optimizer(raw_model, config)
    step, xl = 0, None
    trained_s = 0.0  # wall seconds spent in training steps, validation and checkpoints excluded

    with contextlib.ExitStack() as stack:
        remote = (checkpoint or {}).get("remote_memory")
        memories = make_memories(raw_model, config, servers,
                                  namespace=remote["namespace"] if remote else None)
        stack.callback(_quietly, memories.cleanup)
        val_memories = make_memories(raw_model, config, servers)
        stack.callback(_quietly, val_memories.cleanup)
        blank = make_memories(raw_model, config, None)  # "without memory": stays empty
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
                import_memories(memories, mine["knn"])
            if servers is not None and remote is not None and remote["tag"] is None:
                if master:
                    tqdm.write("memtrans-train: warning: the checkpoint holds no kNN memories "
                               "(its servers ran without --data-dir); they start empty")
            elif servers is not None:
                restore_remote(memories, remote, checkpoint["step"], master, ddp)
                recovery.snapshot_taken(remote["namespace"], remote["tag"])
                if local is not None:
                    local.snapshot_taken(remote["namespace"], remote["tag"])
            step = checkpoint["step"]
            trained_s = checkpoint.get("train_seconds", 0.0)

        model = raw_model
        if ddp:
            model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=len(config.memorizing_layers) == config.depth)
        wait = MemoryWait()
        wait.watch(memories)
        retrieval = config.memory != "off"

        recall = isinstance(corpus, RecallCorpus)

        def validate() -> None:
            settings = eval_settings(config, rank, world_size)

            def run(knn: KNNMemoryList, with_retrieval: bool) -> dict:
                return evaluate(raw_model, corpus, settings, knn, retrieval=with_retrieval,
                                ddp=ddp, device=device, recall=recall)

            def with_memory_attempt(use_memory: bool):
                if not use_memory:  # skipped: reported as no figure rather than a wrong one
                    run(blank, False)
                    return None
                return run(val_memories, True)

            with_memory = recovery.run(step, "validation", with_memory_attempt) \
                if retrieval else None
            if retrieval and ddp and sum_over_ranks([float(with_memory is None)], ddp, device)[0]:
                with_memory = None  # a rank skipped: its share of the figure had no memory
            without = recovery.run(step, "validation", lambda use_memory: run(
                val_memories if use_memory else blank, False))
            record = {"kind": "eval", "step": step, "train_seconds": trained_s,
                      "val_bpb_memory": with_memory["bpb"] if with_memory else None,
                      "val_bpb_no_memory": without["bpb"]}
            if recall:
                record["recall_memory"] = with_memory
                record["recall_no_memory"] = without
            if raw_model.num_memory_layers:
                record["knn_layers"] = knn_layer_parameters(raw_model)
            log.write(record)
            if master:
                shown = f"{with_memory['bpb']:.4f}" if with_memory is not None else "-"
                tqdm.write(f"step {step}: validation bits/byte with memory {shown}, "
                           f"without {without['bpb']:.4f}")
                if recall:
                    tqdm.write(f"step {step}: recall {recall_line(with_memory, without)}")

        persistent = servers is None or servers_persist(memories, master)

        def checkpoint_now() -> None:
            remote_memory = None
            if servers is not None and not persistent:
                remote_memory = {"namespace": memories.backend.namespace, "tag": None,
                                 "servers": len(memories.backend.client.servers)}
            elif servers is not None:
                previous = recovery.snapshot[1] if recovery.snapshot else SNAPSHOT_SLOTS[1]
                tag = SNAPSHOT_SLOTS[1 - SNAPSHOT_SLOTS.index(previous)]
                if not recovery.run(step, "snapshot", lambda use_memory: use_memory and (
                        snapshot_remote(memories, tag, master, ddp) or True)):
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
                    "knn": export_memories(memories, config)}
            ranks = [None] * world_size if master else None
            if ddp:
                dist.gather_object(mine, ranks, dst=0)
            else:
                ranks = [mine]
            if master:
                save_checkpoint(out / CHECKPOINT, {
                    "config": dataclasses.asdict(config), "step": step, "world_size": world_size,
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "ranks": ranks, "remote_memory": remote_memory, "train_seconds": trained_s})

        bar = tqdm(total=config.steps, initial=step, disable=not master, unit="step",
                   dynamic_ncols=True)
        stack.callback(bar.close)
        nats = tokens = busy = 0.0
        window = 0  # steps since the last log line
        while step < config.steps:
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            for micro in range(config.grad_accum):
                if ddp:
                    model.require_backward_grad_sync = micro == config.grad_accum - 1
                if step < config.copy_warmup_steps:  # no memory: XL stays empty for the corpus
                    segment = _copy_segment(config, rank, step, micro)
                    loss, _ = _forward(model, segment, blank, None, add_knn_memory=False,
                                       device=device)
                else:
                    segment = next(stream)
                    recovery.note_resets(segment.reset.nonzero(as_tuple=True)[0].tolist())

                    def attempt(use_memory: bool, segment=segment, xl=xl):
                        knn = memories if use_memory else blank
                        _reset_rows(segment, knn, wait)
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
            elapsed = time.perf_counter() - started
            busy, trained_s = busy + elapsed, trained_s + elapsed
            bar.update()

            if step % config.log_every == 0 or step == config.steps:
                nats, tokens, waited, skipped = sum_over_ranks(
                    [nats, tokens, wait.take(), recovery.skipped], ddp, device)
                bpb = nats / max(tokens, 1) / math.log(2)
                record = {"kind": "train", "step": step, "train_seconds": trained_s,
                          "data": "copy" if step <= config.copy_warmup_steps else "corpus",
                          "train_bpb": bpb, "tokens_per_s": tokens / busy,
                          "memory_wait_s_per_step": waited / world_size / window,
                          "lr": learning_rate(step - 1, config), "memory_skipped": int(skipped),
                          "coverage": coverage(stream, ddp, device)}
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


def coverage(stream: DocumentStream, ddp: bool, device) -> dict:
    """How much of the training corpus the run has read, over all ranks: documents started
    (counted again in each epoch), the epochs covered (every document before the first position
    of the epoch sequence no row has started; 1.0: every training document read once), and the
    corpus tokens read."""
    mine = stream.coverage()
    started, tokens = sum_over_ranks([mine["started"], mine["tokens"]], ddp, device)
    complete = torch.tensor([mine["complete"]], dtype=torch.float64, device=device)
    if ddp:
        dist.all_reduce(complete, op=dist.ReduceOp.MIN)
    return {"documents_started": int(started), "documents": len(stream.docs),
            "epochs_covered": float(complete.item()) / len(stream.docs), "tokens": int(tokens)}


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
        if ddp and torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

        checkpoint = checkpoint_path = None
        if "resume" in given:
            checkpoint_path, checkpoint = load_checkpoint(given["resume"])
        try:
            config = resolve_config(given, checkpoint, checkpoint_path)
        except ValueError as exc:
            raise TrainError(f"invalid setting: {exc}") from None
        init_weights = None
        if checkpoint is None and config.init_from is not None:  # fail now, not after servers
            init_weights = load_checkpoint(config.init_from)[1]["model"]
        corpus = open_corpus(config)
        corpus.val_stream(batch_size=config.batch_size, seq_len=config.seq_len, rank=rank,
                          world_size=world_size)  # fail now, not at the first evaluation
        out = Path(config.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        if master:
            if checkpoint is None and (out / CHECKPOINT).exists():
                raise TrainError(f"{out} already holds a checkpoint: continue it with --resume "
                                 f"{out}, or choose another --out")
            out.mkdir(parents=True, exist_ok=True)
            config.out = str(out)
        if ddp:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    timeout=collective_timeout(config))

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
                        return local.endpoints, str(local.token_file)

                    servers, token_file = _broadcast(start_local, ddp, master)
                    # Every rank's clients present the token of the servers (same host).
                    stack.enter_context(_environment(TOKEN_ENV, token_file))
                else:
                    check_servers(servers, config.memory_timeout)
            if master:
                print(f"memtrans-train: run directory {out}; memory {config.memory}"
                      + (f" on {', '.join(servers)}" if servers else ""), flush=True)
            if master:
                print(f"memtrans-train: corpus: {corpus.description}", flush=True)
            train(config, corpus, checkpoint, ddp=ddp, rank=rank, world_size=world_size,
                  device=device, servers=servers, out=out if master else None, local=local,
                  init_weights=init_weights)
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


def collective_timeout(config: TrainConfig) -> timedelta:
    """How long a rank waits for the others in a collective: longer than a rank may spend
    waiting for a memory server under ``--on-memory-failure wait`` (torch's 30 minutes by
    default), so a long wait ends by the policy, not by a collective timing out."""
    return timedelta(seconds=max(1800.0, config.memory_wait_timeout + 600.0))


def _peer_gone(exc: RuntimeError) -> bool:
    """Whether a collective failed because another rank's process went away."""
    return isinstance(exc, dist.DistNetworkError) or any(
        text in str(exc) for text in ("Connection closed by peer", "Connection reset by peer"))


@contextlib.contextmanager
def _environment(name: str, value: str):
    """``os.environ[name] = value`` until the block ends (the trainer may run in a caller's
    process, e.g. a test's)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


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
