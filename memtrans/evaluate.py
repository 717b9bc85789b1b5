"""A thorough evaluation of trained checkpoints: whole validation documents, bits per byte by
history length, and 95% intervals (``memtrans.bootstrap``) for every difference.

    memtrans-evaluate RUN [RUN ...] [--tokens N] [--repeat] [--max-memories N] [--index KIND]
                      [--num-retrieved K] [--compare-index KIND] [--edges 2048,8192,32768]
                      [--json PATH]

The trainer's own validation reads a fixed number of segments, which covers a few documents and
gives one number with no error bar. This reads whole documents (all of the validation split, or
the first documents of a fixed order until at least ``--tokens``), keeps each document's sums of
nats and tokens per history bucket, and so can resample documents:

- **retrieval on / off**: a memory model reads each document with its kNN memory (cleared when a
  document starts, as in training), and again with retrieval off (empty memory; the
  Transformer-XL memory is kept in both). ``on - off`` is what the memory does for that model.
- **history buckets**: a token's history is its position in its document (the tokens before
  it); the buckets are ``<2K, 2K-8K, 8K-32K, >=32K`` (``EDGES``), where a larger memory has
  more to offer. Their sums add up to the whole.
- **several checkpoints**: each one's figures minus the first one's, on the same documents (for
  memory arms against the arm without memory).
- **the repeat probe** (``--repeat``): each document read twice in a row by the same batch row,
  its kNN memory kept from the first pass to the second; the second pass starts like a fresh
  read (Transformer-XL memory empty), so everything it knows of the first pass it retrieves. A
  model that can copy what it retrieves drops sharply on the second pass; one that retrieves but
  cannot copy does not. With retrieval off the second pass *is* a fresh read (neither memory
  holds the first pass), so the off read stands for it. The last ``xl_max_memories`` tokens of
  the first pass are still in XL when it ends and never enter the kNN memory (as at any
  document's end), so the second pass can retrieve all of the first but its tail. Under the probe
  a table says where the chain breaks (``memtrans.repeat_trace``): per kNN layer and query head,
  how often the second pass retrieves the first pass's entry aligned with it, and how much
  attention goes to it and to memory.

Memory is in this process (as ``memtrans-generate``), with the checkpoint's kNN settings
unless ``--max-memories``, ``--index`` or ``--num-retrieved`` say otherwise (fewer retrieved
entries leave the kNN layer's attention fewer look-alikes to spread over); ``--compare-index
ivf`` reads the same checkpoint through a second index too, which measures what the approximate
index costs in bits per byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .bootstrap import RESAMPLES, SEED, Interval, bpb_difference
from .build import build_model, make_memories, open_corpus
from .checkpoint import load_checkpoint, resolve_config
from .config import (INDEX_KINDS, RECALL, TrainConfig, TrainError,
                     comma_separated_ints)
from .data import PAD_ID, CorpusError, Document
from .memory import KNNMemoryList
from .model import MemorizingTransformer
from .repeat_trace import RepeatTrace

EDGES = (2048, 8192, 32768)
"""History bucket bounds in tokens: bucket ``i`` holds histories in ``[EDGES[i-1], EDGES[i])``."""


def bucket_names(edges: Sequence[int]) -> list[str]:
    def k(tokens: int) -> str:
        return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)
    return ([f"<{k(edges[0])}"] + [f"{k(a)}-{k(b)}" for a, b in zip(edges, edges[1:])]
            + [f">={k(edges[-1])}"])


def document_order(docs: Sequence[Document]) -> list[Document]:
    """The validation documents in a fixed order that does not follow their names (so a token
    budget takes documents from every package, not the alphabet's first ones)."""
    return sorted(docs, key=lambda d: hashlib.blake2b(d.name.encode(), digest_size=8).digest())


def choose_documents(docs: Sequence[Document], tokens: int | None) -> list[tuple[str, np.ndarray]]:
    """``(name, tokens)`` of whole documents in ``document_order``: all of them, or the first
    ones until at least ``tokens`` tokens (scored: one less than a document's length)."""
    chosen, total = [], 0
    for doc in document_order(docs):
        if tokens is not None and total >= tokens:
            break
        ids = doc.tokens()
        chosen.append((doc.name, ids))
        total += len(ids) - 1
    return chosen


@dataclass(frozen=True, slots=True)
class Reading:
    """Per-document sums of one read: ``nats`` and ``tokens`` of shape ``(documents, passes,
    buckets)``, documents in the order given to ``read``."""

    documents: tuple[str, ...]
    nats: np.ndarray
    tokens: np.ndarray

    def bpb(self, pass_: int = 0, bucket: int | None = None) -> float:
        """Bits per byte of one pass, over all buckets or one; NaN for no tokens."""
        nats, tokens = self.nats[:, pass_], self.tokens[:, pass_]
        if bucket is not None:
            nats, tokens = nats[:, bucket], tokens[:, bucket]
        n = tokens.sum()
        return float(nats.sum() / n / math.log(2)) if n else math.nan

    def sums(self, pass_: int = 0, bucket: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per document: nats and tokens of one pass, all buckets or one."""
        nats, tokens = self.nats[:, pass_], self.tokens[:, pass_]
        if bucket is None:
            return nats.sum(-1), tokens.sum(-1)
        return nats[:, bucket], tokens[:, bucket]

    def to_json(self) -> dict:
        return {"documents": list(self.documents), "nats": self.nats.tolist(),
                "tokens": self.tokens.astype(int).tolist()}

    @classmethod
    def from_json(cls, data: dict) -> Reading:
        return cls(tuple(data["documents"]), np.array(data["nats"], dtype=np.float64),
                   np.array(data["tokens"], dtype=np.float64))


@dataclass(slots=True)
class _Row:
    document: int = -1
    """Index into the documents; -1: nothing left."""
    pass_: int = 0
    offset: int = 0
    """Next input position in the document's tokens."""


def _segments(documents: Sequence[np.ndarray], batch_size: int, seq_len: int,
              passes: int) -> Iterator[tuple[list[_Row], list[int], np.ndarray, np.ndarray]]:
    """Segments for ``batch_size`` rows, each row reading whole documents, each ``passes``
    times in a row: per segment the rows' states, the rows that start a new document (clear
    their kNN memory), inputs and labels. A pass starts at a segment boundary at offset 0."""
    rows = [_Row() for _ in range(batch_size)]
    upcoming = iter(range(len(documents)))
    while True:
        x = np.full((batch_size, seq_len), PAD_ID, dtype=np.int64)
        labels = np.full_like(x, PAD_ID)
        started = []
        for r, row in enumerate(rows):
            if row.document < 0 or row.offset >= len(documents[row.document]) - 1:
                if row.document >= 0 and row.pass_ + 1 < passes:
                    row.pass_, row.offset = row.pass_ + 1, 0
                else:
                    row.document, row.pass_, row.offset = next(upcoming, -1), 0, 0
                    if row.document < 0:
                        continue
                    started.append(r)
            ids = documents[row.document]
            k = min(seq_len, len(ids) - 1 - row.offset)
            x[r, :k] = ids[row.offset:row.offset + k]
            labels[r, :k] = ids[row.offset + 1:row.offset + 1 + k]
        if all(row.document < 0 for row in rows):
            return
        yield [dataclasses.replace(row) for row in rows], started, x, labels
        for row in rows:
            if row.document >= 0:
                row.offset = min(row.offset + seq_len, len(documents[row.document]) - 1)


@torch.no_grad()
def read(model: MemorizingTransformer, documents: Sequence[tuple[str, np.ndarray]],
         memories: KNNMemoryList, *, retrieval: bool, batch_size: int, seq_len: int,
         passes: int = 1, edges: Sequence[int] = EDGES,
         trace: RepeatTrace | None = None) -> Reading:
    """Read ``documents`` (``choose_documents``) ``passes`` times each, with ``memories`` (and
    adding to them) when ``retrieval``, else with ``memories`` as an empty memory that stays so;
    per document, pass and history bucket, the sums of nats and tokens. ``trace`` (entered by
    the caller) sees each segment. A progress bar on stderr counts the tokens scored."""
    was_training = model.training
    model.eval()
    shape = (len(documents), passes, len(edges) + 1)
    nats, tokens = np.zeros(shape), np.zeros(shape)
    memories.clear_memory()
    xl = None
    bar = tqdm(total=passes * sum(len(ids) - 1 for _, ids in documents), unit="tok",
               unit_scale=True, mininterval=2, leave=False, file=sys.stderr,
               desc=f"reading, retrieval {'on' if retrieval else 'off'}"
                    + (f", {passes} passes" if passes > 1 else ""))
    try:
        for rows, started, x, labels in _segments([ids for _, ids in documents], batch_size,
                                                  seq_len, passes):
            if started:
                memories.clear_memory(started)
            offsets = torch.tensor([row.offset for row in rows])
            out = model(torch.from_numpy(x), knn_memories=memories, xl_memories=xl,
                        add_knn_memory=retrieval, xl_valid=offsets)
            logits, xl = out if isinstance(out, tuple) else (out, None)
            loss = F.cross_entropy(logits.transpose(1, 2).float(), torch.from_numpy(labels),
                                   ignore_index=PAD_ID, reduction="none").numpy()
            scored = labels != PAD_ID
            if trace is not None:
                trace.segment(rows, scored)
            history = offsets.numpy()[:, None] + np.arange(seq_len)
            bucket = np.searchsorted(edges, history, side="right")
            for r, row in enumerate(rows):
                if row.document < 0:
                    continue
                np.add.at(nats[row.document, row.pass_], bucket[r, scored[r]], loss[r, scored[r]])
                np.add.at(tokens[row.document, row.pass_], bucket[r, scored[r]], 1)
            bar.update(int(scored.sum()))
        memories.collect_adds()
    finally:
        bar.close()
        model.train(was_training)
    return Reading(tuple(name for name, _ in documents), nats, tokens)


@dataclass(frozen=True, slots=True)
class EvaluationSettings:
    tokens: int | None = None
    """Read whole validation documents until at least this many tokens; None: all of them."""
    repeat: bool = False
    """Also run the repeat probe."""
    edges: tuple[int, ...] = EDGES
    batch_size: int | None = None
    """Rows read at once; None: the checkpoint's batch size."""
    max_memories: int | None = None
    """kNN memory per row and layer for this reading; None: the checkpoint's. The memory is
    a reading-time setting (the weights do not depend on it), so a larger one can be tried on
    a trained model, as the repeat probe needs when documents are longer than the memory."""
    index: str | None = None
    """kNN index for this reading (``flat``, ``ivf``, ...); None: the checkpoint's."""
    num_retrieved: int | None = None
    """Entries retrieved per query for this reading; None: the checkpoint's. Like the memory's
    size, not a weight: a trained model can be read with fewer or more."""
    compare_index: str | None = None
    """Also read with retrieval on through this index (reading ``on-<index>``), to set against
    ``on``: what an approximate index costs in bits per byte on the same model."""

    def __post_init__(self):
        if self.tokens is not None and self.tokens < 1:
            raise TrainError(f"--tokens must be a positive token count, got {self.tokens}")
        if not self.edges or list(self.edges) != sorted(set(self.edges)) or self.edges[0] < 1:
            raise TrainError(f"history bucket edges must be increasing positive token counts, "
                             f"got {','.join(map(str, self.edges))}")
        if self.batch_size is not None and self.batch_size < 1:
            raise TrainError(f"--batch-size must be a positive integer, got {self.batch_size}")
        if self.max_memories is not None and self.max_memories < 1:
            raise TrainError(f"--max-memories must be a positive token count, got "
                             f"{self.max_memories}")
        if self.num_retrieved is not None and self.num_retrieved < 1:
            raise TrainError(f"--num-retrieved must be a positive integer, got "
                             f"{self.num_retrieved}")
        for flag, kind in (("--index", self.index), ("--compare-index", self.compare_index)):
            if kind is not None and kind not in INDEX_KINDS:
                raise TrainError(f"{flag} must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")


def has_retrieval(config: TrainConfig) -> bool:
    return config.memory != "off" and bool(config.memorizing_layers)


def evaluate_run(run: str, settings: EvaluationSettings) -> dict:
    """The readings of one checkpoint (file or run directory): ``off`` always; ``on`` for a
    memory model; ``repeat`` (two passes, retrieval on) with ``settings.repeat``. With the
    repeat probe, ``on`` is the repeat read's first pass: that pass is a plain read with
    retrieval, and reading it again would only repeat it."""
    path, state = load_checkpoint(run)
    config = resolve_config({}, state, path)
    try:
        config = dataclasses.replace(
            config, max_memories=settings.max_memories or config.max_memories,
            index=settings.index or config.index,
            num_retrieved=settings.num_retrieved or config.num_retrieved)
    except ValueError as exc:  # the overrides clash with each other or with the checkpoint
        raise TrainError(f"{run}: --max-memories/--index/--num-retrieved: {exc}") from exc
    if config.data == RECALL:
        raise TrainError(f"{run} was trained on the recall task; its evaluation is the "
                         f"trainer's (memtrans-train --data recall logs it)")
    model = build_model(config)
    model.load_state_dict(state["model"])
    documents = choose_documents(open_corpus(config).val, settings.tokens)
    if not documents:
        raise TrainError(f"{run}: its corpus has no validation documents (val_fraction "
                         f"{config.val_fraction}); nothing to evaluate")
    batch_size = min(settings.batch_size or config.batch_size, len(documents))
    kwargs = dict(batch_size=batch_size, seq_len=config.seq_len, edges=settings.edges)
    retrieval = has_retrieval(config)
    readings, trace = {}, None
    memories = make_memories(model, dataclasses.replace(config, batch_size=batch_size), None)
    try:
        readings["off"] = read(model, documents, memories, retrieval=False, **kwargs)
        if retrieval and settings.repeat:
            with RepeatTrace(model, [len(ids) for _, ids in documents], 2,
                             settings.edges) as tracing:
                repeat = read(model, documents, memories, retrieval=True, passes=2,
                              trace=tracing, **kwargs)
            trace = tracing.result()
            readings["repeat"] = repeat
            readings["on"] = Reading(repeat.documents, repeat.nats[:, :1], repeat.tokens[:, :1])
        elif retrieval:
            readings["on"] = read(model, documents, memories, retrieval=True, **kwargs)
    finally:
        memories.cleanup()
    if retrieval and settings.compare_index:
        other = make_memories(model, dataclasses.replace(
            config, batch_size=batch_size, index=settings.compare_index), None)
        try:
            readings[f"on-{settings.compare_index}"] = read(model, documents, other,
                                                            retrieval=True, **kwargs)
        finally:
            other.cleanup()
    label = f"{run} ({config.max_memories:,} kNN memories, {config.index}, top " \
            f"{config.num_retrieved})" if retrieval else \
        f"{run} (no kNN memory)"
    return {"run": run, "label": label, "config": dataclasses.asdict(config),
            "readings": readings, "trace": trace}


def difference(a: Reading, b: Reading, bucket: int | None = None, *, pass_a: int = 0,
               pass_b: int = 0) -> Interval:
    """``a - b`` with its interval; the readings must be of the same documents."""
    if a.documents != b.documents:
        raise TrainError("the two readings are of different documents: evaluate checkpoints "
                         "of the same corpus, split and --tokens together")
    nats_a, tokens = a.sums(pass_a, bucket)
    nats_b, tokens_b = b.sums(pass_b, bucket)
    if not np.array_equal(tokens, tokens_b):
        raise TrainError("the two readings scored different tokens of the same documents")
    return bpb_difference(nats_a, nats_b, tokens, resamples=RESAMPLES, seed=SEED)


def main_reading(result: dict) -> Reading:
    """A checkpoint's own figures: with retrieval for a memory model."""
    return result["readings"].get("on", result["readings"]["off"])


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def tables(results: list[dict], edges: Sequence[int] = EDGES) -> list[str]:
    """The printed tables: bits per byte by history with the differences and their intervals
    (on - off per memory model; each checkpoint - the first), then the repeat probe's."""
    tokens = main_reading(results[0]).tokens[:, 0]
    columns = [(name, bucket) for name, bucket in zip(["all", *bucket_names(edges)],
                                                      [None, *range(len(edges) + 1)])
               if (tokens if bucket is None else tokens[:, bucket]).sum()]
    rows = []
    for result in results:
        readings, label = result["readings"], result["label"]
        for side in ("on", "off") if "on" in readings else ("off",):
            rows.append([f"{label}, retrieval {side}"]
                        + [f"{readings[side].bpb(0, b):.4f}" for _, b in columns])
        if "on" in readings:
            rows.append([f"{label}: on - off"]
                        + [str(difference(readings["on"], readings["off"], b)) for _, b in columns])
        index = result["config"]["index"]
        for name in (n for n in readings if n.startswith("on-")):
            other = name.removeprefix("on-")
            rows.append([f"{label}, retrieval on with {other}"]
                        + [f"{readings[name].bpb(0, b):.4f}" for _, b in columns])
            rows.append([f"{label}: {other} - {index}"]
                        + [str(difference(readings[name], readings["on"], b)) for _, b in columns])
    first = results[0]
    for result in results[1:]:
        rows.append([f"{result['label']} - {first['label']}"] + [
            str(difference(main_reading(result), main_reading(first), b)) for _, b in columns])
    in_bucket = [(tokens if b is None else tokens[:, b]) for _, b in columns]
    rows.append(["tokens"] + [f"{int(t.sum()):,}" for t in in_bucket])
    rows.append(["documents"] + [int(((t.sum(-1) if t.ndim > 1 else t) > 0).sum())
                                 for t in in_bucket])
    out = [_table(["bits/byte, differences with 95% interval"] + [n for n, _ in columns], rows)]
    probes = [r for r in results if "repeat" in r["readings"]]
    if probes:
        rows = []
        for result in probes:
            repeat, off = result["readings"]["repeat"], result["readings"]["off"]
            once, twice = repeat.bpb(0), repeat.bpb(1)
            rows.append([result["label"], f"{once:.4f}", f"{twice:.4f}",
                         str(difference(repeat, repeat, pass_a=1, pass_b=0)),
                         f"{100 * (twice / once - 1):+.1f}%", f"{off.bpb(0):.4f}",
                         str(difference(repeat, off, pass_a=1))])
        out += ["", _table(["repeat probe (retrieval on)", "first pass", "second pass",
                            "second - first", "change", "retrieval off (a fresh read)",
                            "second pass - retrieval off"], rows)]
        out += [line for result in probes if result.get("trace") is not None
                for line in ("", chain_table(result, columns))]
    return out


def chain_table(result: dict, columns: list[tuple[str, int | None]]) -> str:
    """The repeat probe's chain per kNN layer (``memtrans.repeat_trace``): how often the second
    pass retrieves the first pass's aligned entry, and how much attention it gives it."""
    trace = result["trace"]
    figures = [("first pass: attention on memory", 0, "on_memory"),
               ("second pass: aligned entry retrieved", 1, "retrieved"),
               ("second pass: attention on the aligned entry", 1, "on_aligned"),
               ("second pass: attention on its neighbours (+-1, 2)", 1, "on_neighbours"),
               ("second pass: attention on memory", 1, "on_memory")]
    rows = [[f"layer {layer}{'' if head is None else f' head {head}'}: {name}"]
            + [f"{100 * trace.rate(figure, pass_, layer, b, head):.1f}%" for _, b in columns]
            for layer in trace.layers for head in (None, *range(trace.heads))
            for name, pass_, figure in figures]
    return _table([f"{result['label']}: where the chain breaks (all heads, then each)"]
                  + [n for n, _ in columns], rows)


def token_counts(text: str) -> tuple[int, ...]:
    return comma_separated_ints(text, "comma-separated token counts like 2048,8192")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memtrans-evaluate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="checkpoint files or run directories; the second and later are "
                             "compared with the first")
    parser.add_argument("--tokens", type=int, default=None,
                        help="read whole validation documents until at least this many tokens "
                             "(default: all of the validation split)")
    parser.add_argument("--repeat", action="store_true", help="also run the repeat probe")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows read at once (default: the checkpoint's)")
    parser.add_argument("--max-memories", type=int, default=None,
                        help="kNN memory per row and layer for this reading (default: the "
                             "checkpoint's; the repeat probe needs one at least as long as the "
                             "documents)")
    parser.add_argument("--index", default=None, help=f"kNN index for this reading, one of "
                        f"{', '.join(INDEX_KINDS)} (default: the checkpoint's)")
    parser.add_argument("--num-retrieved", type=int, default=None,
                        help="entries retrieved per query for this reading (default: the "
                             "checkpoint's)")
    parser.add_argument("--compare-index", default=None,
                        help="also read with retrieval on through this index and give its "
                             "difference from the checkpoint's (or --index's) index")
    parser.add_argument("--edges", type=token_counts, default=EDGES,
                        help=f"history bucket bounds in tokens (default "
                             f"{','.join(map(str, EDGES))})")
    parser.add_argument("--json", default=None, help="also write the per-document sums here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = EvaluationSettings(tokens=args.tokens, repeat=args.repeat,
                                      batch_size=args.batch_size, edges=args.edges,
                                      max_memories=args.max_memories, index=args.index,
                                      num_retrieved=args.num_retrieved,
                                      compare_index=args.compare_index)
        results = [evaluate_run(run, settings) for run in args.runs]
        lines = tables(results, settings.edges)
    except (TrainError, CorpusError) as exc:
        print(f"memtrans-evaluate: error: {exc}", file=sys.stderr)
        return 2
    first = main_reading(results[0])
    print(f"{len(first.documents)} validation documents, {int(first.tokens.sum()):,} tokens; "
          f"intervals: {RESAMPLES} bootstrap resamples of documents (seed {SEED})")
    for line in lines:
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps([
            {**r, "readings": {k: v.to_json() for k, v in r["readings"].items()},
             "trace": r["trace"] and r["trace"].to_json()}
            for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
