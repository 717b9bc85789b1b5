"""`memtrans-train`: train a Memorizing Transformer on document streams, alone or under torchrun.

Every batch row reads one long document in consecutive segments (``memtrans.data``); a row that
starts a new document has its kNN memories cleared, and its Transformer-XL memories are masked out
of that segment's attention and kept out of its kNN memory, so a row's memories only ever hold
the document it is reading (the paper's setup). One optimizer step takes ``grad_accum``
consecutive segments of the same documents, in order, because memory order matters. Losses are
in bits per byte: the cross entropy over the non-pad next tokens (the bytes of a document and its
EOS) divided by ln 2. Each training log record also says how much of the corpus the run has read
(``coverage``: documents started, epochs covered, tokens).

The shape of a run: ``main`` parses the flags, places the process (``Place``), starts or finds
the memory servers, and runs a ``Trainer``. The ``Trainer`` builds the model, corpus stream and
memories (``build.py``), its ``CheckpointManager`` (``checkpoint.py``) starts it fresh, from
``--init-from`` weights or from a checkpoint, and ``Trainer.train`` runs ``train_step`` after
``train_step``, each followed by what is due: ``log_train``, ``validate``, a checkpoint.

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

Checkpoints, ``--resume`` and ``--init-from``: ``checkpoint.py``.

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
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from memory_server import MemoryServerError
from memory_server.client import MemoryClient
from memory_server.tenants import TOKEN_ENV

from .build import build_model, make_memories, open_corpus
from .checkpoint import (CHECKPOINT, CheckpointManager, load_checkpoint, memory_namespace,
                         resolve_config)
from .config import TrainConfig, TrainError, build_parser
from .copy_task import copy_batch, warmup_rng
from .data import PAD_ID, CorpusError, DocumentStream, DocumentStreams, Segment
from .evaluation import (EvalSettings, evaluate, knn_layer_parameters, recall_line,
                         sum_over_ranks, xl_valid)
from .memory import KNNMemoryList, servers_from_env
from .place import Place
from .recall import RecallCorpus
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


def memory_servers(config: TrainConfig, out: Path, place: Place, stack: contextlib.ExitStack
                   ) -> tuple[list[str] | None, LocalServers | None]:
    """The endpoints of the run's memory servers (None: memory in this process), and on rank 0
    the servers this run starts itself when none are named (``stack`` stops them)."""
    if config.memory != "remote":
        return None, None
    servers = list(config.memory_servers) or servers_from_env()
    if servers is not None:
        check_servers(servers, config.memory_timeout)
        return servers, None
    local = None

    def start_local():
        nonlocal local
        local = stack.enter_context(LocalServers(config.num_servers, out,
                                                 supervise=config.on_memory_failure != "stop"))
        return local.endpoints, str(local.token_file)

    servers, token_file = _broadcast(start_local, place.ddp, place.master)
    # Every rank's clients present the token of the servers (same host).
    stack.enter_context(_environment(TOKEN_ENV, token_file))
    return servers, local


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


@dataclass(slots=True)
class LogWindow:
    """What this rank's steps since the last training log record did."""

    nats: float = 0.0
    tokens: float = 0.0
    seconds: float = 0.0
    """Wall seconds spent in those steps."""
    steps: int = 0


class Trainer:
    """One rank's run: the model, optimizer, data stream, kNN memories, failure recovery and
    checkpoints built from the config and started from a checkpoint or fresh; ``train`` then
    runs ``train_step`` up to ``config.steps``, each step followed by what is due of a log
    record, a validation and a checkpoint. ``stack`` closes the memories when the run ends."""

    def __init__(self, config: TrainConfig, corpus: DocumentStreams, place: Place,
                 stack: contextlib.ExitStack, *, servers: list[str] | None, out: Path | None,
                 local: LocalServers | None = None, checkpoint: dict | None = None,
                 init_weights: dict | None = None):
        """``out`` is None on every rank but 0, and so is ``local`` (the auto-started
        servers); ``checkpoint`` resumes, ``init_weights`` (a checkpoint's model) is
        ``--init-from``."""
        self.config, self.corpus, self.place = config, corpus, place
        self.stream = corpus.train_stream(batch_size=config.batch_size, seq_len=config.seq_len,
                                          rank=place.rank, world_size=place.world_size,
                                          seed=config.seed, repeat=config.repeat_spans,
                                          repeat_span=config.repeat_span_tokens)
        torch.manual_seed(config.seed)
        self.raw_model = build_model(config).to(place.device)
        self.optimizer = _optimizer(self.raw_model, config)
        self.log = RunLog(out)

        self.memories = make_memories(self.raw_model, config, servers,
                                      namespace=memory_namespace(checkpoint))
        stack.callback(_quietly, self.memories.cleanup)
        self.val_memories = make_memories(self.raw_model, config, servers)
        stack.callback(_quietly, self.val_memories.cleanup)
        self.blank = make_memories(self.raw_model, config, None)  # "without memory": stays empty
        stack.callback(self.blank.cleanup)
        self.recovery = MemoryRecovery(
            config.on_memory_failure, config.memory_wait_timeout,
            [self.memories, self.val_memories] if servers is not None else [],
            rank=place.rank, on_failure=self.log.write)
        self.checkpoints = CheckpointManager(
            out, config, place, model=self.raw_model, optimizer=self.optimizer,
            stream=self.stream, memories=self.memories, recovery=self.recovery, local=local,
            log=self.log.write)
        self.state = self.checkpoints.start(checkpoint, init_weights)

        self.model = self.raw_model  # after start: DDP broadcasts rank 0's weights
        if place.ddp:
            self.model = DDP(self.raw_model,
                             device_ids=[place.device.index] if place.device.type == "cuda"
                             else None,
                             find_unused_parameters=len(config.memorizing_layers) == config.depth)
        self.wait = MemoryWait()
        self.wait.watch(self.memories)
        self.retrieval = config.memory != "off"
        self.recall = isinstance(corpus, RecallCorpus)
        self.window = LogWindow()

    def train(self) -> None:
        config = self.config
        with tqdm(total=config.steps, initial=self.state.step, disable=not self.place.master,
                  unit="step", dynamic_ncols=True) as bar:
            while self.state.step < config.steps:
                self.train_step()
                bar.update()
                step, last = self.state.step, self.state.step == config.steps
                if step % config.log_every == 0 or last:
                    self.log_train(bar)
                if (config.eval_every and step % config.eval_every == 0) or last:
                    self.validate()
                if (config.checkpoint_every and step % config.checkpoint_every == 0) or last:
                    self.checkpoints.save(self.state)

    def train_step(self) -> None:
        """One optimizer step over ``grad_accum`` consecutive segments of the rows' documents,
        in order (memory order matters); then this step's adds are collected."""
        config, state, window = self.config, self.state, self.window
        started = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(state.step, config)
        for micro in range(config.grad_accum):
            if self.place.ddp:
                self.model.require_backward_grad_sync = micro == config.grad_accum - 1
            segment, loss = self._micro_batch(micro)
            (loss / config.grad_accum).backward()
            n = int((segment.labels != PAD_ID).sum())
            window.nats, window.tokens = window.nats + loss.item() * n, window.tokens + n
        if config.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), config.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with self.wait.measure():
            try:
                self.memories.collect_adds()
            except FAILURES as exc:  # adds of this step lost; nothing to redo
                self.recovery.handle(exc, state.step, "collecting adds")
        elapsed = time.perf_counter() - started
        state.step, state.train_seconds = state.step + 1, state.train_seconds + elapsed
        window.steps, window.seconds = window.steps + 1, window.seconds + elapsed

    def _micro_batch(self, micro: int) -> tuple[Segment, torch.Tensor]:
        """The next segment and its loss: of the copy warm-up (no memory, and XL stays empty
        for the corpus), else of the corpus, with memory as the failure policy allows."""
        step = self.state.step
        if step < self.config.copy_warmup_steps:
            segment = _copy_segment(self.config, self.place.rank, step, micro)
            loss, _ = _forward(self.model, segment, self.blank, None, add_knn_memory=False,
                               device=self.place.device)
            return segment, loss
        segment = next(self.stream)
        self.recovery.note_resets(segment.reset.nonzero(as_tuple=True)[0].tolist())
        loss, self.state.xl = self.recovery.run(step, "training segment",
                                                functools.partial(self._forward_corpus, segment))
        return segment, loss

    def _forward_corpus(self, segment: Segment, use_memory: bool):
        """One attempt for ``MemoryRecovery.run``: with the run's memories, or from the empty
        ones, adding nothing."""
        knn = self.memories if use_memory else self.blank
        _reset_rows(segment, knn, self.wait)
        return _forward(self.model, segment, knn, self.state.xl,
                        add_knn_memory=self.retrieval and use_memory, device=self.place.device)

    def log_train(self, bar: tqdm) -> None:
        """The training record of the steps since the last one, summed over ranks."""
        config, place, window, step = self.config, self.place, self.window, self.state.step
        nats, tokens, waited, skipped = sum_over_ranks(
            [window.nats, window.tokens, self.wait.take(), self.recovery.skipped], place.ddp,
            place.device)
        bpb = nats / max(tokens, 1) / math.log(2)
        record = {"kind": "train", "step": step, "train_seconds": self.state.train_seconds,
                  "data": "copy" if step <= config.copy_warmup_steps else "corpus",
                  "train_bpb": bpb, "tokens_per_s": tokens / window.seconds,
                  "memory_wait_s_per_step": waited / place.world_size / window.steps,
                  "lr": learning_rate(step - 1, config), "memory_skipped": int(skipped),
                  "coverage": coverage(self.stream, place.ddp, place.device)}
        self.log.write(record)
        bar.set_postfix(bpb=f"{bpb:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                        mem_wait=f"{1000 * record['memory_wait_s_per_step']:.0f}ms/step",
                        **({"mem_skipped": int(skipped)} if skipped else {}))
        self.window = LogWindow()

    def validate(self) -> None:
        """Validation with retrieval and without, into the log (every rank evaluates its share)."""
        step, place = self.state.step, self.place
        with_memory = self.recovery.run(step, "validation", self._validate_with_memory) \
            if self.retrieval else None
        if self.retrieval and place.ddp \
                and sum_over_ranks([float(with_memory is None)], place.ddp, place.device)[0]:
            with_memory = None  # a rank skipped: its share of the figure had no memory
        without = self.recovery.run(step, "validation", lambda use_memory: self._evaluate(
            self.val_memories if use_memory else self.blank, False))
        record = {"kind": "eval", "step": step, "train_seconds": self.state.train_seconds,
                  "val_bpb_memory": with_memory["bpb"] if with_memory else None,
                  "val_bpb_no_memory": without["bpb"]}
        if self.recall:
            record["recall_memory"] = with_memory
            record["recall_no_memory"] = without
        if self.raw_model.num_memory_layers:
            record["knn_layers"] = knn_layer_parameters(self.raw_model)
        self.log.write(record)
        if place.master:
            shown = f"{with_memory['bpb']:.4f}" if with_memory is not None else "-"
            tqdm.write(f"step {step}: validation bits/byte with memory {shown}, "
                       f"without {without['bpb']:.4f}")
            if self.recall:
                tqdm.write(f"step {step}: recall {recall_line(with_memory, without)}")

    def _validate_with_memory(self, use_memory: bool) -> dict | None:
        """One attempt for ``MemoryRecovery.run``; skipped, it still runs the evaluation (the
        ranks' collectives stay in step) and reports no figure rather than a wrong one."""
        if not use_memory:
            self._evaluate(self.blank, False)
            return None
        return self._evaluate(self.val_memories, True)

    def _evaluate(self, knn: KNNMemoryList, retrieval: bool) -> dict:
        return evaluate(self.raw_model, self.corpus,
                        eval_settings(self.config, self.place.rank, self.place.world_size), knn,
                        retrieval=retrieval, ddp=self.place.ddp, device=self.place.device,
                        recall=self.recall)


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

        place = Place(ddp=ddp, rank=rank, world_size=world_size, device=device)
        with contextlib.ExitStack() as stack:
            servers, local = memory_servers(config, out, place, stack)
            if master:
                print(f"memtrans-train: run directory {out}; memory {config.memory}"
                      + (f" on {', '.join(servers)}" if servers else ""), flush=True)
                print(f"memtrans-train: corpus: {corpus.description}", flush=True)
            with contextlib.ExitStack() as run:  # the trainer's memories, closed first
                Trainer(config, corpus, place, run, servers=servers,
                        out=out if master else None, local=local, checkpoint=checkpoint,
                        init_weights=init_weights).train()
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
