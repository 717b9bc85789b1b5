"""The rotated-copy task: what is predictable is exactly what copying decides."""

import numpy as np
import pytest

from memtrans.copy_task import SEPARATOR, copy_batch, warmup_rng
from memtrans.data import EOS_ID, PAD_ID, SOS_ID


@pytest.mark.parametrize("seq_len", [6, 65, 128])
def test_predictable_labels_are_the_rotation_of_the_first_half(seq_len):
    x, labels, predictable = copy_batch(np.random.default_rng(0), 16, seq_len)
    assert x.shape == labels.shape == predictable.shape == (16, seq_len)
    n = (seq_len - 2) // 2
    for row, label, mask in zip(x.tolist(), labels.tolist(), predictable.tolist()):
        tokens = row + label[-1:]
        letters, rotated = tokens[1:n + 1], tokens[n + 2:2 * n + 2]
        assert tokens[0] == SOS_ID and tokens[n + 1] == SEPARATOR
        assert tokens[2 * n + 2] == EOS_ID and set(tokens[2 * n + 3:]) <= {PAD_ID}
        shifts = [s for s in range(1, n) if rotated == letters[s:] + letters[:s]]
        assert shifts, (letters, rotated)
        assert [i for i, m in enumerate(mask) if m] == list(range(n + 2, 2 * n + 1))
        s = shifts[0]
        for i in range(n + 2, 2 * n + 1):  # the letter after the previous one in the first half
            j = i - n - 1
            assert label[i] == rotated[j] == letters[(j + s) % n]
            assert row[i] == letters[(j - 1 + s) % n]


def test_warmup_batches_depend_on_seed_rank_and_step_only():
    def batch(*key):
        return copy_batch(warmup_rng(*key), 4, 32)[0]
    assert (batch(0, 0, 5, 0) == batch(0, 0, 5, 0)).all()
    assert not (batch(0, 0, 5, 0) == batch(0, 1, 5, 0)).all()
    assert not (batch(0, 0, 5, 0) == batch(0, 0, 6, 0)).all()


def test_too_short_a_sequence_is_refused():
    with pytest.raises(ValueError, match="seq_len >= 6"):
        copy_batch(np.random.default_rng(0), 1, 5)
