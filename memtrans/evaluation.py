"""Validation: bits per byte on the validation split and, for the recall task, what the memory
does for the answers.

Recall figures (``--data recall``, see ``memtrans.recall``), for in-context and memory-only
answer tokens separately: accuracy (the argmax is the answer) and bits per answer token. For the
memory-only ones also, per memorizing layer:

- **hit rate**: the share whose binding's own entry (the key the layer stored at the binding's
  value token) is among the k retrieved by at least one head. A low hit rate means the search
  does not find the binding; a high one with low accuracy means the model does not use it.
- **binding attention**: the attention weight the layer's output puts on that entry, at the
  head that puts the most (with the gate: ``g * weight``), averaged over the answer tokens.

Entries are recognised by their key: the store keeps float32 keys exactly as added.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import PAD_ID
from .memory import KNNMemoryList
from .model import KNNAttention, MemorizingTransformer
from .recall import IN_CONTEXT, KINDS, MEMORY_ONLY, RecallDocument


def sum_over_ranks(values: list[float], ddp: bool, device) -> list[float]:
    if not ddp:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def xl_valid(segment) -> torch.Tensor:
    """Per row, the tokens of its document read before this segment: the most recent XL entries
    that belong to that document (the model caps it at the XL length; documents start at a
    segment boundary, so a row starting one has none)."""
    return torch.tensor(segment.offsets, dtype=torch.long)


class OtherRowsMemory:
    """Leak control: a memory whose rows add to their own memories but search the memory of
    the row ``shift`` places on (which reads another document)."""

    def __init__(self, memory, shift: int = 1):
        self._memory = memory
        self._shift = shift

    def search_async(self, queries, topk):
        rows = self._memory.scoped_indices
        s = self._shift % len(rows)
        with self._memory.at_batch_indices(rows[s:] + rows[:s]):
            return self._memory.search_async(queries, topk)

    def __getattr__(self, name):
        return getattr(self._memory, name)


def other_rows(memories: KNNMemoryList) -> KNNMemoryList:
    if len(memories) and len(memories[0].scoped_indices) < 2:
        raise ValueError("the leak control reads another row's memory: it needs batch size >= 2")
    return KNNMemoryList([OtherRowsMemory(m) for m in memories])


_FIELDS = ("tokens", "correct", "nats")


class RecallProbe:
    """Collects the recall figures over an evaluation (see the module docstring)."""

    def __init__(self, model: MemorizingTransformer):
        self.layers = [(number, layer[0].fn) for number, layer in enumerate(model.layers, 1)
                       if isinstance(layer[0].fn, KNNAttention)]
        self.sums = {f"{kind}_{f}": 0.0 for kind in KINDS for f in _FIELDS}
        for number, _ in self.layers:
            self.sums[f"hits_layer{number}"] = 0.0
            self.sums[f"binding_attention_layer{number}"] = 0.0
        self._calls: dict[int, list[dict]] = {}
        self._keys: list[dict[int, dict[int, torch.Tensor]]] = []  # layer -> row -> pos -> key

    def __enter__(self):
        for number, attn in self.layers:
            attn.probe = lambda number=number, **seen: self._calls.setdefault(number, []).append(seen)
        return self

    def __exit__(self, *exc):
        for _, attn in self.layers:
            attn.probe = None

    def reset_rows(self, rows) -> None:
        for keys in self._keys:
            for row in rows:
                keys.pop(row, None)

    def segment(self, segment, logits: torch.Tensor) -> None:
        """Account the answer tokens of one segment, whose forward has just run."""
        if not self._keys:
            self._keys = [{} for _ in self.layers]
        seq_len = segment.x.shape[1]
        losses = F.cross_entropy(logits.transpose(1, 2).float(), segment.labels.to(logits.device),
                                 ignore_index=PAD_ID, reduction="none").cpu()
        predicted = logits.argmax(-1).cpu()
        seen = [self._calls.pop(number)[-1] for number, _ in self.layers]
        for row, doc in enumerate(segment.documents):
            if not isinstance(doc, RecallDocument):
                continue
            offset = segment.offsets[row]
            answers = doc.answers()
            window = (answers.positions > offset) & (answers.positions <= offset + seq_len)
            index = answers.positions[window] - offset - 1  # the input that predicts each
            kinds, sources = answers.kinds[window], answers.sources[window]
            for kind in (IN_CONTEXT, MEMORY_ONLY):
                at = index[kinds == kind]
                name = KINDS[kind]
                self.sums[f"{name}_tokens"] += len(at)
                self.sums[f"{name}_correct"] += float(
                    (predicted[row, at] == segment.labels[row, at]).sum())
                self.sums[f"{name}_nats"] += float(losses[row, at].sum())
            memory_only = kinds == MEMORY_ONLY
            here = (answers.sources >= offset) & (answers.sources < offset + seq_len) & \
                (answers.kinds == MEMORY_ONLY)  # memory-only bindings read in this segment
            for (number, attn), keys, call in zip(self.layers, self._keys, seen):
                self._hits(number, attn, keys.setdefault(row, {}), call, row,
                           index[memory_only], sources[memory_only])
                for pos in answers.sources[here].tolist():
                    keys[row][pos] = call["local_keys"][row, pos - offset]

    def _hits(self, number: int, attn: KNNAttention, keys: dict, call: dict, row: int,
              at: np.ndarray, sources: np.ndarray) -> None:
        gate = None if attn.combine_gate is None else attn.combine_gate.detach().sigmoid().cpu()
        for j, source in zip(at.tolist(), sources.tolist()):
            target = keys.get(source)
            if target is None:
                continue
            slots = call["positions"][row, :, j]                       # (heads, k)
            retrieved = call["mem_keys"][slots]                        # (heads, k, d)
            match = (retrieved - target).abs().amax(-1) < 1e-6         # (heads, k)
            match &= slots > 0
            if bool(match.any()):
                self.sums[f"hits_layer{number}"] += 1
            weight = (call["mem_attn"][row, :, j] * match).sum(-1).cpu()  # per head
            if gate is not None:
                weight = weight * gate
            self.sums[f"binding_attention_layer{number}"] += float(weight.max())

    def figures(self, ddp: bool, device) -> dict:
        names = list(self.sums)
        totals = dict(zip(names, sum_over_ranks([self.sums[n] for n in names], ddp, device)))
        out = {}
        for kind in KINDS:
            n = totals[f"{kind}_tokens"]
            out[f"{kind}_tokens"] = int(n)
            out[f"{kind}_accuracy"] = totals[f"{kind}_correct"] / n if n else None
            out[f"{kind}_bits"] = totals[f"{kind}_nats"] / n / math.log(2) if n else None
        n = totals["memory_only_tokens"]
        for number, _ in self.layers:
            out[f"hit_rate_layer{number}"] = totals[f"hits_layer{number}"] / n if n else None
            out[f"binding_attention_layer{number}"] = \
                totals[f"binding_attention_layer{number}"] / n if n else None
        return out


@dataclass(frozen=True, slots=True)
class EvalSettings:
    batch_size: int
    seq_len: int
    segments: int
    rank: int = 0
    world_size: int = 1


@torch.no_grad()
def evaluate(model: MemorizingTransformer, corpus, settings: EvalSettings,
             memories: KNNMemoryList, *, retrieval: bool, ddp: bool = False,
             device=torch.device("cpu"), recall: bool = False) -> dict:
    """Validation figures on the first ``settings.segments`` segments, from empty memories:
    ``bpb`` and, with ``recall``, the recall task's figures (module docstring)."""
    was_training = model.training
    model.eval()
    stream = corpus.val_stream(batch_size=settings.batch_size, seq_len=settings.seq_len,
                               rank=settings.rank, world_size=settings.world_size)
    memories.clear_memory()
    probe = RecallProbe(model) if recall else None
    xl, nats, tokens = None, 0.0, 0
    try:
        if probe is not None:
            probe.__enter__()
        for segment in itertools.islice(stream, settings.segments):
            rows = segment.reset.nonzero(as_tuple=True)[0].tolist()
            if rows:
                memories.clear_memory(rows)
                if probe is not None:
                    probe.reset_rows(rows)
            out = model(segment.x.to(device), knn_memories=memories, xl_memories=xl,
                        add_knn_memory=retrieval, xl_valid=xl_valid(segment))
            logits, xl = out if isinstance(out, tuple) else (out, None)
            labels = segment.labels.to(device)
            n = int((labels != PAD_ID).sum())
            loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=PAD_ID,
                                   reduction="sum")
            nats, tokens = nats + float(loss), tokens + n
            if probe is not None:
                probe.segment(segment, logits)
        memories.collect_adds()
    finally:
        if probe is not None:
            probe.__exit__()
        model.train(was_training)
    nats, tokens = sum_over_ranks([nats, tokens], ddp, device)
    figures = {"bpb": nats / max(tokens, 1) / math.log(2)}
    if probe is not None:
        figures.update(probe.figures(ddp, device))
    return figures


def knn_layer_parameters(model: MemorizingTransformer) -> dict:
    """Per memorizing layer, the learned per-head temperature and (``gate``) memory share."""
    out = {}
    for number, layer in enumerate(model.layers, 1):
        attn = layer[0].fn
        if isinstance(attn, KNNAttention):
            entry = {"temperature": [round(v, 3) for v in attn.scale.detach().exp().flatten().tolist()]}
            if attn.combine_gate is not None:
                entry["gate"] = [round(v, 4) for v in attn.combine_gate.detach().sigmoid().tolist()]
            out[str(number)] = entry
    return out


def recall_line(with_memory: dict | None, without: dict) -> str:
    """One line of recall figures for the console."""
    def pct(figures, key):
        value = figures.get(key) if figures else None
        return "-" if value is None else f"{100 * value:.1f}%"
    hits = ", ".join(f"hit rate (layer {key.removeprefix('hit_rate_layer')}) {pct(with_memory, key)}"
                     for key in (with_memory or {}) if key.startswith("hit_rate_layer"))
    return (f"memory-only accuracy {pct(with_memory, 'memory_only_accuracy')} (retrieval off "
            f"{pct(without, 'memory_only_accuracy')}), in-context "
            f"{pct(with_memory or without, 'in_context_accuracy')}"
            + (f"; {hits}" if hits else ""))
