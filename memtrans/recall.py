"""A long-range recall task where the kNN memory must decide the answer (``--data recall``).

Each document is a stream of lines ``=abcWXYZ`` (a newline after each): a *binding* of a key
(three lowercase letters) to a value (four uppercase letters). Keys are unique within a document
and drawn fresh for every document, with their values, so no weights can learn them; the
document is its own only source. A key comes back exactly once later as a *query*, the same line
with ``?`` for ``=``, whose value tokens (the *answer*) can only be predicted by finding the
binding. Two choices make copying learnable by a small model in minutes:

- the marker tells a query from a binding before the value starts, so copying a value only
  ever helps where it is right (a model that copied imperfectly would lose on every binding);
- the value follows the key directly, so the plainest induction circuit (find the earlier
  position after the current token, copy what is there) already answers part of the queries
  from the key's last letter alone, and matching more letters refines it. With a separator
  (``abc:WXYZ``) every value follows the same token and nothing short of matching the whole key
  helps; on this machine a model then stayed at chance for 3,000 steps.

Queries are of two kinds:

- an **in-context** query starts at most ``in_context_span`` tokens after its binding, less than
  the Transformer-XL window, so the binding is in the local + XL context. These
  train the memorizing layer's query and key projections, since nothing backpropagates into
  the memory.
- a **memory-only** query starts at least ``distance`` tokens after its binding's line ends,
  and ``distance >= seq_len + xl_max_memories``, so the whole binding is outside the local + XL
  context of every answer token (documents start at a segment boundary) and only the kNN memory
  holds it.

Schedule: every step emits one new binding, then at most one in-context and one memory-only
query. Half the bindings (``in_context_fraction``) get an in-context query, due a random 1 to
``in_context_lag`` steps later (so which key comes back is not predictable from position); the
rest get a memory-only one, which comes in binding order once it is ``distance`` tokens away. Each
line is 9 tokens and a step emits two lines on average, so a document is about ``18 * bindings``
tokens; the memory-only bindings of its last ``distance`` tokens go unqueried.

Chance: an answer token is one of 26 letters, so guessing gets 1/26 = 3.8% and log2(26) = 4.70
bits per answer token. Documents are a pure function of (task settings, split seed, index):
validation documents use a different seed from training ones.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from .data import BYTE_OFFSET, EOS_ID, SOS_ID, CorpusError, DocumentStreams

KEY_LETTERS = 3
VALUE_LETTERS = 4
LINE = 1 + KEY_LETTERS + VALUE_LETTERS + 1
"""Tokens per line: ``=`` (binding) or ``?`` (query), key, value, newline."""
VALUE_START = 1 + KEY_LETTERS
"""Offset of the first value token in a line."""
VALUE_ALPHABET = 26
CHANCE_ACCURACY = 1 / VALUE_ALPHABET
CHANCE_BITS = math.log2(VALUE_ALPHABET)

IN_CONTEXT, MEMORY_ONLY = 0, 1
KINDS = ("in_context", "memory_only")

TRAIN_SEED, VAL_SEED = 0, 1


@dataclass(frozen=True, kw_only=True, slots=True)
class RecallTask:
    """The task's sizes. ``distance`` must put memory-only bindings outside the local + XL
    window of the model that reads them (``check_window``)."""

    bindings: int = 128
    """Bindings per document (a document is about 18 tokens per binding)."""
    distance: int = 512
    """Tokens between the end of a memory-only binding's line and its query, at least (2 XL
    windows of 256 by default: a segment of local context plus the XL window, so the binding
    has left both)."""
    in_context_fraction: float = 0.5
    """Share of bindings queried in context; the rest are queried from memory only."""
    in_context_lag: int = 4
    """An in-context query is due 1 to this many bindings after its own (one query per step)."""
    in_context_span: int = 112
    """An in-context query starts at most this many tokens after its binding starts (else it is
    dropped), so it is inside any XL window of at least ``in_context_span + LINE`` (9) tokens."""
    train_documents: int = 100_000
    """Distinct training documents (an epoch); far more than an arm reads."""
    val_documents: int = 64
    """Validation documents (drawn with another seed)."""

    def __post_init__(self):
        for name in ("bindings", "distance", "in_context_lag", "in_context_span",
                     "train_documents", "val_documents"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CorpusError(f"recall {name} must be a positive integer, got {value!r}")
        if not 0 <= self.in_context_fraction <= 1:
            raise CorpusError(f"recall in_context_fraction must be in [0, 1], got "
                              f"{self.in_context_fraction!r}")

    def check_window(self, seq_len: int, xl_max_memories: int) -> None:
        """Raise unless memory-only queries are out of, and in-context queries inside, the
        local + XL window of a model with these settings."""
        if self.distance < seq_len + xl_max_memories:
            raise CorpusError(
                f"recall distance {self.distance} is inside the model's local + XL window "
                f"(seq_len {seq_len} + xl_max_memories {xl_max_memories}): memory-only queries "
                f"could be answered without memory; use --recall-distance >= "
                f"{seq_len + xl_max_memories}")
        if self.in_context_span + LINE > xl_max_memories:
            raise CorpusError(
                f"recall in-context queries start up to {self.in_context_span} tokens after their "
                f"binding (--recall-in-context-span), more than the XL window "
                f"({xl_max_memories}) allows for them to be in context: use --xl-max-memories >= "
                f"{self.in_context_span + LINE} or a smaller span")

    def describe(self) -> str:
        return (f"recall task: {self.bindings} bindings per document (~{2 * LINE * self.bindings} "
                f"tokens), memory-only queries >= {self.distance} tokens after their binding, "
                f"{self.in_context_fraction:.0%} in context; {self.train_documents} train / "
                f"{self.val_documents} validation documents")

    def identity(self) -> str:
        return (f"recall:{self.bindings}:{self.distance}:{self.in_context_fraction}:"
                f"{self.in_context_lag}")


@dataclass(frozen=True, slots=True)
class Answers:
    """Where a document's answer tokens are, as token positions (SOS is position 0)."""

    positions: np.ndarray
    """Token position of each answer token."""
    kinds: np.ndarray
    """``IN_CONTEXT`` or ``MEMORY_ONLY`` per answer token."""
    sources: np.ndarray
    """Token position of the same value token in the binding (the entry the query must find)."""


@dataclass(frozen=True, slots=True)
class RecallDocument:
    """Document ``index`` of the task under ``seed``; built on demand, nothing on disk."""

    task: RecallTask
    seed: int
    index: int
    name: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "name", f"recall-{self.seed}-{self.index}")

    @property
    def identity(self) -> str:
        return f"{self.task.identity()}:{self.name}"

    def tokens(self) -> np.ndarray:
        return _built(self)[0]

    def answers(self) -> Answers:
        return _built(self)[1]

    def build(self) -> tuple[np.ndarray, Answers]:
        task = self.task
        digest = hashlib.blake2b(f"{self.identity}".encode(), digest_size=8).digest()
        rng = np.random.default_rng(int.from_bytes(digest, "little"))
        n = task.bindings
        keys = _unique_keys(rng, n)
        values = rng.integers(0, VALUE_ALPHABET, size=(n, VALUE_LETTERS))
        in_context = rng.random(n) < task.in_context_fraction
        lags = rng.integers(1, task.in_context_lag + 1, size=n)

        lines: list[tuple[int, int]] = []  # (binding, query kind or -1 for the binding)
        bound_at = np.zeros(n, dtype=np.int64)  # token position of each binding's line
        booked: dict[int, int] = {}            # step -> binding queried in context then
        waiting: list[int] = []                # memory-only bindings, oldest first
        for b in range(n):
            position = 1 + len(lines) * LINE
            bound_at[b] = position
            lines.append((b, -1))
            if in_context[b]:
                slot = b + int(lags[b])
                while slot in booked:
                    slot += 1
                booked[slot] = b
            else:
                waiting.append(b)
            q = booked.pop(b, None)
            if q is not None and 1 + len(lines) * LINE - bound_at[q] <= task.in_context_span:
                lines.append((q, IN_CONTEXT))
            if waiting and 1 + len(lines) * LINE - bound_at[waiting[0]] - LINE >= task.distance:
                lines.append((waiting.pop(0), MEMORY_ONLY))
        # Bindings whose query would come after the last binding, or (in context) too late to be
        # in context, are left unqueried.
        return self._render(lines, keys, values, bound_at)

    @staticmethod
    def _render(lines, keys, values, bound_at) -> tuple[np.ndarray, Answers]:
        out = np.empty(len(lines) * LINE, dtype=np.uint8)
        positions, kinds, sources = [], [], []
        for i, (b, kind) in enumerate(lines):
            out[i * LINE:(i + 1) * LINE] = _line(b"=" if kind < 0 else b"?", keys[b], values[b])
            if kind >= 0:
                for j in range(VALUE_LETTERS):
                    offset = VALUE_START + j
                    positions.append(1 + i * LINE + offset)
                    kinds.append(kind)
                    sources.append(bound_at[b] + offset)
        tokens = np.concatenate(([SOS_ID], out.astype(np.int64) + BYTE_OFFSET, [EOS_ID]))
        return tokens, Answers(np.array(positions, dtype=np.int64),
                               np.array(kinds, dtype=np.int64),
                               np.array(sources, dtype=np.int64))


@functools.lru_cache(maxsize=64)
def _built(doc: RecallDocument) -> tuple[np.ndarray, Answers]:
    """A document's tokens and answers, kept for the rows reading it (the evaluation asks at
    every segment); read-only, since every caller shares them."""
    tokens, answers = doc.build()
    for array in (tokens, answers.positions, answers.kinds, answers.sources):
        array.flags.writeable = False
    return tokens, answers


def _unique_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    space = 26 ** KEY_LETTERS
    if n > space // 2:
        raise CorpusError(f"recall bindings {n} exceeds what {KEY_LETTERS}-letter keys allow")
    codes = rng.choice(space, size=n, replace=False)
    letters = np.stack([(codes // 26 ** i) % 26 for i in range(KEY_LETTERS)], axis=1)
    return letters.astype(np.uint8) + ord("a")


def _line(marker: bytes, key: np.ndarray, value: np.ndarray) -> np.ndarray:
    return np.concatenate(([ord(marker)], key, value.astype(np.uint8) + ord("A"), [ord("\n")]))


@dataclass(frozen=True, kw_only=True, slots=True)
class RecallCorpus(DocumentStreams):
    """The recall task as a corpus: the same streams as ``memtrans.data.Corpus``."""

    task: RecallTask
    train: tuple[RecallDocument, ...]
    val: tuple[RecallDocument, ...]

    @classmethod
    def create(cls, task: RecallTask) -> RecallCorpus:
        return cls(task=task,
                   train=tuple(RecallDocument(task, TRAIN_SEED, i)
                               for i in range(task.train_documents)),
                   val=tuple(RecallDocument(task, VAL_SEED, i) for i in range(task.val_documents)))

    @property
    def description(self) -> str:
        return self.task.describe()

    def too_few_for_validation(self, rows: int) -> str:
        return (f"the recall task has {len(self.val)} validation documents but evaluation uses "
                f"{rows} rows (world_size x batch_size): evaluate with fewer rows")
