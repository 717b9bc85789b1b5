"""``memtrans.repeat_trace``: the repeat probe's chain figures, fed through the kNN layer's probe
hook with retrievals whose answers are known (one head retrieves each position's aligned entry,
one its own position's, the aligned entry's neighbour), over the segments ``memtrans.evaluate``
reads."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memtrans.build import build_model
from memtrans.config import TrainConfig
from memtrans.data import PAD_ID
from memtrans.evaluate import _segments
from memtrans.repeat_trace import RepeatTrace

SEQ, XL, LENGTH, K = 4, 2, 14, 3
EDGES = (4, 8)


@pytest.fixture
def model():
    return build_model(TrainConfig(dim=16, depth=1, heads=2, dim_head=8, memorizing_layers=(1,),
                                   num_retrieved=K, xl_max_memories=XL, seq_len=SEQ,
                                   batch_size=1, memory="inproc"))


def test_counts_the_aligned_entry_per_head_and_leaves_out_what_never_entered_memory(model):
    keys = F.normalize(torch.randn(LENGTH, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    mem_keys = torch.cat((torch.zeros(1, 8), keys))  # row 0: "nothing found"
    attn = model.layers[0][0].fn
    with RepeatTrace(model, [LENGTH], passes=2, edges=EDGES) as trace:
        for rows, _, x, labels in _segments([np.arange(LENGTH)], 1, SEQ, passes=2):
            (row,) = rows
            history = row.offset + np.arange(SEQ)
            # The entry after the query's: its key carries the query's tokens (key conv one wider).
            aligned = np.minimum(history + 1, LENGTH - 1) + 1  # into mem_keys
            own = np.minimum(history, LENGTH - 1) + 1
            positions = torch.zeros(1, 2, SEQ, K, dtype=torch.long)
            positions[0, 0, :, 0] = torch.from_numpy(aligned)
            positions[0, 1, :, 1] = torch.from_numpy(own)
            mem_attn = torch.full((1, 2, SEQ, K), 0.1)
            mem_attn[0, 0, :, 0] = 0.6
            local = keys[np.minimum(history, LENGTH - 1)].unsqueeze(0)
            attn.probe(local_keys=local, positions=positions, mem_keys=mem_keys,
                       mem_attn=mem_attn)
            trace.segment(rows, labels != PAD_ID)
    result = trace.result()
    assert result.layers == (1,) and result.heads == 2
    counted = result.sums["counted"][0]  # (passes, layers, heads, buckets)
    # The first pass counts every scored position; the second only those whose aligned entry
    # (position + 1) is below LENGTH - 1 - XL, the first pass's entries that left XL for kNN.
    assert counted[0, 0, 0].tolist() == [4, 4, LENGTH - 1 - 8]
    in_memory = LENGTH - 1 - XL
    assert counted[1, 0, 0].sum() == in_memory - 1
    assert result.rate("retrieved", 1, 1, head=0) == 1.0
    assert result.rate("retrieved", 1, 1, head=1) == 0.0
    assert result.rate("retrieved", 1, 1) == 0.5
    assert result.rate("on_aligned", 1, 1, head=0) == pytest.approx(0.6)
    assert result.rate("on_aligned", 1, 1, head=1) == 0.0
    # Head 1's entry is the aligned one's left neighbour: a copy off by one place.
    assert result.rate("on_neighbours", 1, 1, head=1) == pytest.approx(0.1)
    assert result.rate("on_neighbours", 1, 1, head=0) == 0.0
    assert result.rate("on_memory", 0, 1, head=0) == pytest.approx(0.8)
    assert result.rate("retrieved", 0, 1) == 0.0  # nothing to retrieve on a first pass
    assert attn.probe is None  # unhooked on leaving


def test_unit_keys_that_differ_are_not_the_same_entry(model):
    """A retrieved key near but not equal to the aligned one does not count."""
    keys = F.normalize(torch.randn(LENGTH, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    near = F.normalize(keys + 0.05 * torch.randn(LENGTH, 8), dim=-1)
    mem_keys = torch.cat((torch.zeros(1, 8), near))
    attn = model.layers[0][0].fn
    with RepeatTrace(model, [LENGTH], passes=2, edges=EDGES) as trace:
        for rows, _, x, labels in _segments([np.arange(LENGTH)], 1, SEQ, passes=2):
            (row,) = rows
            history = row.offset + np.arange(SEQ)
            positions = torch.zeros(1, 2, SEQ, K, dtype=torch.long)
            positions[0, :, :, 0] = torch.from_numpy(np.minimum(history + 1, LENGTH - 1) + 1)
            attn.probe(local_keys=keys[np.minimum(history, LENGTH - 1)].unsqueeze(0),
                       positions=positions, mem_keys=mem_keys,
                       mem_attn=torch.full((1, 2, SEQ, K), 0.2))
            trace.segment(rows, labels != PAD_ID)
    assert trace.result().rate("retrieved", 1, 1) == 0.0
