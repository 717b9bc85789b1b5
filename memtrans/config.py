"""The training run's settings: ``TrainConfig`` (validated on construction) and the
``memtrans-train`` flags that fill it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from .data import DOCUMENT_KINDS, MAX_DOCUMENT_BYTES
from .recovery import POLICIES

MEMORY_MODES = ("remote", "inproc", "off")
KNN_COMBINES = ("joint", "gate")
RECALL = "recall"
"""``--data recall``: the built-in long-range recall task (``memtrans.recall``)."""
INDEX_KINDS = ("flat", "hnsw", "ivf")
KEY_DTYPES = ("float32", "float16")
LR_SCHEDULES = ("constant", "cosine")


class TrainError(Exception):
    """A run cannot start or go on; the message says what was wrong and what to do."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """One training run. The defaults train a ~0.8M-parameter model on the standard library in a
    few minutes on 2 CPU cores: small enough to be the README demo, with documents (packages
    of up to 256 KiB, hundreds of segments each) far longer than the segment, so memory has
    something to remember."""

    data: str | None = None
    """Corpus: a directory of text files or one text / .gz file; ``recall``: the built-in recall
    task (a directory of that name: ``./recall``); None: the Python stdlib sources."""
    recall_bindings: int = 128
    """Recall task: key -> value bindings per document (~18 tokens each)."""
    recall_distance: int = 512
    """Recall task: tokens from a memory-only binding to its query, at least; must be at least
    ``seq_len + xl_max_memories``."""
    recall_in_context_fraction: float = 0.5
    """Recall task: share of bindings queried while still in the local + XL context (these
    train the copying that memory-only queries need); the rest are queried from memory only."""
    documents: str = "package"
    """What a document of a directory corpus is (``memtrans.data``): ``package``, a top-level
    directory's files concatenated with separator lines (the paper's repositories: the memory
    holds the sibling files a file uses), or ``file``, one file each (shorter histories)."""
    max_document_bytes: int = MAX_DOCUMENT_BYTES
    """Directory documents longer than this are cut into pieces (256 KiB), so no row spends most
    of an epoch in one document; 0: no limit."""
    val_fraction: float = 0.1
    """Share of the split units (packages, or files with ``documents='file'``) held out for
    validation, chosen by a hash of their names. 0.1: on the stdlib's ~190 packages and top-level
    modules, 0.05 would hold out 3 documents (180 KB), fewer than the 4 rows that evaluate."""
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
    memorizing_layers: tuple[int, ...] = (1,)
    """1-based layers with kNN attention; empty: none (a plain Transformer-XL, memory off). The
    first layer by default: the only placement that learned to copy from its memory here (the
    paper's, three quarters up, left the memory unused; README, the recall task)."""
    knn_combine: str = "joint"
    """How a kNN layer mixes memory and local attention: ``joint`` (one softmax over both, the
    seed's) or ``gate`` (separate softmaxes mixed by a learned per-head gate, the paper's)."""
    smear_keys: bool = False
    """Smeared keys in every layer (``memtrans.model.KeySmear``): each key mixes in the previous
    token's. Off: a plain layer that can copy in one step learns to copy before the kNN layer
    does, and then the memory goes unused (README, the recall task)."""
    qk_conv: int = 8
    """Causal convolutions over the last this many queries and one more keys
    (``memtrans.model.ShortConv``) in the ``qk_conv_layers``, so one layer alone matches the last
    tokens and copies what followed them, from context and, in a kNN layer, from memory; 0: none.
    8 by default: keys over 9 tokens find this place in a document, where keys over 4 find any
    earlier occurrence of a common 4-gram (README, the experiment's repeat probe)."""
    qk_conv_layers: tuple[int, ...] | None = None
    """1-based layers with ``qk_conv``; None: the memorizing layers."""
    copy_warmup_steps: int = 0
    """The first this many of ``steps`` train on the rotated-copy task (``memtrans.copy_task``),
    without kNN or XL memory, before the corpus: a dense copy signal from which the model learns
    to copy from context in a few hundred steps; the corpus then starts at its beginning. Off
    by default, since it changes what a run of a given ``--steps`` reads; without it the memory
    went unused here (README: the experiment), so give a few hundred steps to any run with
    memory."""
    repeat_spans: float = 0.0
    """Share of the spans of training documents read twice in a row, the second read with the
    first in its memories (``DocumentStream``'s ``repeat``): the copy-from-memory signal that a
    corpus of distinct documents rarely gives. 0 (off) by default."""
    repeat_span: int | None = None
    """Tokens per span for ``repeat_spans``, a multiple of ``seq_len``; 0: whole documents;
    None: ``max_memories`` rounded down to ``seq_len``, the longest whose first read the second
    can retrieve to its end."""
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
    """kNN index: ``flat`` (exact, the paper's), ``ivf`` (approximate, fast at full memories) or
    ``hnsw`` (approximate, slower than ``flat`` here)."""
    key_dtype: str = "float32"
    """How the memory stores keys: ``float32``, or ``float16`` (about twice the memories per GiB;
    ``flat`` stays exact over the stored keys, ``ivf`` rescores its candidates in float32)."""
    grad_accum: int = 1
    """Consecutive segments per optimizer step (gradients summed over them)."""
    lr: float = 1e-3
    """AdamW peak learning rate, reached after ``warmup_steps``."""
    warmup_steps: int = 20
    """Steps of linear learning-rate warmup."""
    lr_schedule: str = "constant"
    """After warmup: ``constant``, or ``cosine`` down to ``lr / 10`` at ``steps`` (lower-noise
    final figures; ``--resume --steps N`` then stretches the rest of the schedule to ``N``)."""
    weight_decay: float = 0.1
    """AdamW weight decay on the weights of linear layers only; embeddings, position biases,
    biases, norm gains, kNN temperatures and gates get none."""
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
    init_from: str | None = None
    """Checkpoint file or run directory whose model weights start this (new) run, e.g. a model
    trained without memory, to fine-tune with memory (the paper's Fig. 6): parameters of the
    same name and shape are loaded, the ones the checkpoint lacks (a kNN layer's own) keep
    their initialisation; optimizer, step and data position start fresh."""
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
        for name in ("xl_max_memories", "warmup_steps", "copy_warmup_steps", "eval_every",
                     "checkpoint_every", "seed"):
            _require(name, getattr(self, name), lambda v: _is_int(v) and v >= 0,
                     "a non-negative integer")
        _require("memory", self.memory, lambda v: v in MEMORY_MODES, f"one of {MEMORY_MODES}")
        _require("smear_keys", self.smear_keys, lambda v: isinstance(v, bool), "True or False")
        _require("qk_conv", self.qk_conv, lambda v: _is_int(v) and 0 <= v <= 16,
                 "an integer in [0, 16]")
        _require("knn_combine", self.knn_combine, lambda v: v in KNN_COMBINES,
                 f"one of {KNN_COMBINES}")
        for name in ("recall_bindings", "recall_distance"):
            _require(name, getattr(self, name), lambda v: _is_int(v) and v >= 1,
                     "a positive integer")
        _require("recall_in_context_fraction", self.recall_in_context_fraction,
                 lambda v: 0 <= v <= 1, "in [0, 1]")
        _require("documents", self.documents, lambda v: v in DOCUMENT_KINDS,
                 f"one of {DOCUMENT_KINDS}")
        _require("max_document_bytes", self.max_document_bytes, lambda v: _is_int(v) and v >= 0,
                 "a non-negative integer (0: no limit)")
        _require("index", self.index, lambda v: v in INDEX_KINDS, f"one of {INDEX_KINDS}")
        _require("key_dtype", self.key_dtype, lambda v: v in KEY_DTYPES, f"one of {KEY_DTYPES}")
        _require("repeat_spans", self.repeat_spans, lambda v: 0 <= v <= 1, "in [0, 1]")
        _require("repeat_span", self.repeat_span,
                 lambda v: v is None or (_is_int(v) and v >= 0 and v % self.seq_len == 0),
                 f"a multiple of seq_len={self.seq_len} tokens (0: whole documents)")
        _require("val_fraction", self.val_fraction, lambda v: 0 < v < 1, "in (0, 1)")
        _require("lr", self.lr, lambda v: v > 0, "a positive number")
        _require("lr_schedule", self.lr_schedule, lambda v: v in LR_SCHEDULES,
                 f"one of {LR_SCHEDULES}")
        _require("weight_decay", self.weight_decay, lambda v: v >= 0, "a non-negative number")
        _require("clip", self.clip, lambda v: v >= 0, "a non-negative number (0: no clipping)")
        _require("memory_timeout", self.memory_timeout, lambda v: v > 0, "positive seconds")
        _require("on_memory_failure", self.on_memory_failure, lambda v: v in POLICIES,
                 f"one of {POLICIES}")
        _require("memory_wait_timeout", self.memory_wait_timeout, lambda v: v > 0,
                 "positive seconds")
        _require_layers("memorizing_layers", self.memorizing_layers, self.depth, "layer 1")
        if self.qk_conv_layers is not None:
            _require_layers("qk_conv_layers", self.qk_conv_layers, self.depth,
                            "the memorizing layers")
        if not self.memorizing_layers and self.memory != "off":
            raise ValueError(f"a model without memorizing layers has no kNN memory: use --memory "
                             f"off with it, not {self.memory!r}")
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

    @property
    def repeat_span_tokens(self) -> int:
        """``repeat_span`` with None resolved (``DocumentStream``'s ``repeat_span``)."""
        if self.repeat_span is not None:
            return self.repeat_span
        return max(self.seq_len, self.max_memories // self.seq_len * self.seq_len)


def _require_layers(name: str, layers, depth: int, default: str) -> None:
    if not all(_is_int(l) and 1 <= l <= depth for l in layers):
        raise ValueError(f"{name} must be 1-based layer numbers in [1, depth={depth}], got "
                         f"{layers!r} (leave it out for {default})")


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


def comma_separated_ints(text: str, expected: str) -> tuple[int, ...]:
    """``"2,3"`` as ``(2, 3)`` for an argparse type; ``expected`` says what the flag takes."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _int_tuple(text: str) -> tuple[int, ...]:
    return comma_separated_ints(text, "comma-separated integers like 3 or 2,3")


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
    add("--val-fraction", type=float,
        help=f"share of packages (or files) held out for validation (default "
             f"{d.val_fraction:g})")
    add("--steps", type=int, help=f"optimizer steps in all (default {d.steps})")
    add("--batch-size", type=int, help=f"rows per rank (default {d.batch_size})")
    add("--seq-len", type=int, help=f"tokens per segment (default {d.seq_len})")
    add("--dim", type=int, help=f"model width (default {d.dim})")
    add("--depth", type=int, help=f"layers (default {d.depth})")
    add("--heads", type=int, help=f"attention heads (default {d.heads})")
    add("--dim-head", type=int, help=f"head width (default {d.dim_head})")
    add("--data", help="corpus directory or text/.gz file, or 'recall' for the built-in recall "
        "task (default: the Python stdlib sources)")
    add("--documents", choices=DOCUMENT_KINDS,
        help=f"a directory corpus's documents: one per top-level package (its files joined with "
             f"separator lines, the paper's repositories) or one per file (default "
             f"{d.documents})")
    add("--max-document-bytes", type=int,
        help=f"cut longer documents into pieces; 0: no limit (default {d.max_document_bytes})")
    add("--recall-bindings", type=int,
        help=f"recall task: bindings per document (default {d.recall_bindings})")
    add("--recall-distance", type=int,
        help=f"recall task: tokens from a memory-only binding to its query (default "
             f"{d.recall_distance})")
    add("--recall-in-context-fraction", type=float,
        help=f"recall task: share of bindings queried in context, the rest from memory only "
             f"(default {d.recall_in_context_fraction})")
    add("--memorizing-layers", type=_int_tuple,
        help=f"1-based kNN layers, comma-separated; '' for none (default "
             f"{','.join(map(str, d.memorizing_layers))})")
    add("--knn-combine", choices=KNN_COMBINES,
        help=f"mix memory and local attention in one softmax (joint) or by a learned per-head "
             f"gate (gate, the paper's) (default {d.knn_combine})")
    add("--smear-keys", action=argparse.BooleanOptionalAction,
        help=f"mix each attention key with the previous token's, in every layer (Olsson et al.'s "
             f"smeared keys; default {'on' if d.smear_keys else 'off'})")
    add("--qk-conv", type=int, metavar="W",
        help=f"causal convolutions over the last W queries and W+1 keys, so one layer matches the "
             f"last W tokens; 0: none (default {d.qk_conv})")
    add("--qk-conv-layers", type=_int_tuple,
        help="1-based layers with --qk-conv, comma-separated (default: the memorizing layers)")
    add("--copy-warmup-steps", type=int,
        help=f"train the first N steps on a rotated-copy task (no memory), then the corpus: "
             f"teaches copying from context fast; without it the memory went unused here, so "
             f"give a few hundred (default {d.copy_warmup_steps})")
    add("--repeat-spans", type=float,
        help=f"share of spans of training documents read twice in a row, memory kept: teaches "
             f"copying from memory (default {d.repeat_spans:g})")
    add("--repeat-span", type=int,
        help="tokens per span, a multiple of --seq-len; 0: whole documents (default: "
             "--max-memories rounded down to --seq-len)")
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
    add("--key-dtype", choices=KEY_DTYPES,
        help=f"how the memory stores keys; float16 holds about twice the memories per GiB "
             f"(default {d.key_dtype})")
    add("--grad-accum", type=int, help=f"segments per optimizer step (default {d.grad_accum})")
    add("--lr", type=float, help=f"learning rate (default {d.lr:g})")
    add("--warmup-steps", type=int, help=f"linear warmup steps (default {d.warmup_steps})")
    add("--lr-schedule", choices=LR_SCHEDULES,
        help=f"after warmup: constant, or cosine to lr/10 at --steps (default {d.lr_schedule})")
    add("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay:g})")
    add("--clip", type=float, help=f"gradient norm clip, 0: none (default {d.clip:g})")
    add("--eval-every", type=int, help=f"validate every N steps, 0: at the end (default {d.eval_every})")
    add("--eval-batches", type=int, help=f"validation segments (default {d.eval_batches})")
    add("--out", help="run directory (default: runs/<timestamp>, or the resumed run's)")
    add("--resume", help="checkpoint file or run directory to continue")
    add("--init-from", help="start a new run from this checkpoint's model weights (file or run "
                            "directory); new parameters initialised, optimizer fresh")
    add("--seed", type=int, help=f"seed (default {d.seed})")
    add("--checkpoint-every", type=int,
        help=f"checkpoint every N steps, 0: at the end (default {d.checkpoint_every})")
    add("--log-every", type=int, help=f"log the loss every N steps (default {d.log_every})")
    return parser
