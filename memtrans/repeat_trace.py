"""Where the repeat probe's chain breaks: retrieval, or the use of what is retrieved.

On the repeat probe's second pass (``memtrans.evaluate``) every position ``p`` has an *aligned
entry* in the kNN memory: the first pass's entry at ``p + 1``, whose key carries the tokens up
to ``p`` (the key convolution reaches one token further back than the query's) and whose value
is the token to predict. A model that copies retrieves that entry and attends to it. For each
kNN layer, query head and history bucket this counts, over scored positions:

- ``retrieved``: the aligned entry is among the ``num_retrieved_memories`` found (an entry whose
  key is the aligned key: keys are unit vectors, so a dot product of 1; a repeated passage's
  identical keys count too, since they carry the same tokens);
- ``on_aligned``: the layer's attention on those entries;
- ``on_neighbours``: its attention on the entries next to the aligned one (the first pass's at
  ``p + 1 +- 1, 2``, ``NEIGHBOURS``), not the aligned key: their keys carry nearly the same
  tokens shifted by one or two, and their values the tokens around the one to predict, so
  attention here is a copy off by a place;
- ``on_memory``: its attention on all retrieved entries (``knn_combine="joint"``: the memory's
  share of one softmax with the local context; with ``gate`` it is 1 and the gate weighs it).

Positions whose aligned entry never entered the kNN memory (the first pass's last
``xl_max_memories`` tokens, which stay in the Transformer-XL memory) are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .model import KNNAttention, MemorizingTransformer

SAME_KEY = 1 - 1e-3
"""Dot product of two unit keys above which they are the same key (float16 round trips pass)."""

AHEAD = 1
"""The aligned entry of position ``p`` is the first pass's at ``p + AHEAD``."""

NEIGHBOURS = (-2, -1, 1, 2)
"""Offsets from the aligned entry whose attention ``on_neighbours`` counts."""

FIGURES = ("counted", "retrieved", "on_aligned", "on_neighbours", "on_memory")


@dataclass
class TraceSums:
    """Per figure, sums of shape ``(documents, passes, layers, heads, buckets)`` (see the
    module)."""

    layers: tuple[int, ...]
    sums: dict[str, np.ndarray]

    @property
    def heads(self) -> int:
        return self.sums["counted"].shape[3]

    def rate(self, figure: str, pass_: int, layer: int, bucket: int | None = None,
             head: int | None = None) -> float:
        """A figure's mean per counted query (of one head, or of all); NaN where none was
        counted."""
        i = self.layers.index(layer)
        sums = {f: s[:, pass_, i] for f, s in self.sums.items()}
        sums = {f: s.sum(1) if head is None else s[:, head] for f, s in sums.items()}
        if bucket is not None:
            sums = {f: s[:, bucket] for f, s in sums.items()}
        counted = sums["counted"].sum()
        return float(sums[figure].sum() / counted) if counted else float("nan")

    def to_json(self) -> dict:
        return {"layers": list(self.layers), **{f: s.tolist() for f, s in self.sums.items()}}


class RepeatTrace:
    """Hooks a model's kNN layers during the repeat read (``read(..., trace=...)``)."""

    def __init__(self, model: MemorizingTransformer, lengths: Sequence[int], passes: int,
                 edges: Sequence[int]):
        self.attns = [(number, layer[0].fn) for number, layer in enumerate(model.layers, 1)
                      if isinstance(layer[0].fn, KNNAttention)]
        self.lengths, self.edges = list(lengths), np.asarray(edges)
        heads = {attn.heads for _, attn in self.attns}.pop() if self.attns else 1
        shape = (len(lengths), passes, len(self.attns), heads, len(edges) + 1)
        self.sums = {f: np.zeros(shape) for f in FIGURES}
        self._calls: dict[int, dict] = {}
        self._first: dict[tuple[int, int], np.ndarray] = {}  # (layer index, doc) -> keys

    def __enter__(self) -> RepeatTrace:
        for i, (_, attn) in enumerate(self.attns):
            attn.probe = lambda i=i, **seen: self._calls.__setitem__(i, seen)
        return self

    def __exit__(self, *exc) -> None:
        for _, attn in self.attns:
            attn.probe = None

    def result(self) -> TraceSums:
        return TraceSums(tuple(number for number, _ in self.attns), self.sums)

    def segment(self, rows, scored: np.ndarray) -> None:
        """Account one segment whose forward just ran: ``rows`` as ``evaluate._segments`` gives
        them, ``scored`` ``(rows, seq_len)`` the positions with a label."""
        for i, (_, attn) in enumerate(self.attns):
            call = self._calls.pop(i)
            xl = attn.xl_max_memories
            for r, row in enumerate(rows):
                if row.document < 0:
                    continue
                n = int(scored[r].sum())
                if row.pass_ == 0:  # the second pass only compares against these
                    keys = call["local_keys"][r, :n].float().numpy()
                    first = self._first.setdefault(
                        (i, row.document), np.zeros((self.lengths[row.document], keys.shape[-1]),
                                                    np.float32))
                    first[row.offset:row.offset + n] = keys
                    self._account(i, row, call, r, n, aligned=None)
                else:
                    self._account(i, row, call, r, n, aligned=self._first[(i, row.document)],
                                  in_memory=self.lengths[row.document] - 1 - xl)
                    if row.offset + n >= self.lengths[row.document] - 1:
                        del self._first[(i, row.document)]

    def _account(self, i: int, row, call: dict, r: int, n: int, *, aligned: np.ndarray | None,
                 in_memory: int = 0) -> None:
        positions = call["positions"][r, :, :n]  # (heads, n, k) into mem_keys, 0: none
        attention = call["mem_attn"][r, :, :n].float()
        history = row.offset + np.arange(n)
        keep = np.ones(n, bool)
        found = near = None
        if aligned is not None:
            target = history + AHEAD
            keep = target < in_memory  # entries the first pass added to the kNN memory
            mem_keys = call["mem_keys"].float()[positions]  # (heads, n, k, dim)
            entries = target + np.array((0, *NEIGHBOURS))[:, None]  # aligned, then neighbours
            wanted = torch.from_numpy(aligned[np.clip(entries, 0, len(aligned) - 1)])
            valid = torch.from_numpy((entries >= 0) & (entries < in_memory))[:, None, :, None]
            same = (torch.einsum("hnkd,ond->ohnk", mem_keys, wanted) > SAME_KEY) & valid & \
                (positions > 0)  # (entries, heads, n, k): a retrieved key is that entry's
            found = same[0]
            near = same[1:].any(0) & ~found
        bucket = np.searchsorted(self.edges, history, side="right")[keep]
        sums = {f: s[row.document, row.pass_, i] for f, s in self.sums.items()}
        for head in range(positions.shape[0]):
            np.add.at(sums["counted"][head], bucket, 1)
            np.add.at(sums["on_memory"][head], bucket, attention[head].sum(-1).numpy()[keep])
            if found is not None:
                np.add.at(sums["retrieved"][head], bucket, found[head].any(-1).numpy()[keep])
                np.add.at(sums["on_aligned"][head], bucket,
                          (attention[head] * found[head]).sum(-1).numpy()[keep])
                np.add.at(sums["on_neighbours"][head], bucket,
                          (attention[head] * near[head]).sum(-1).numpy()[keep])
