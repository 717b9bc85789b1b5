"""The benchmarks' recall@k counts ties: a copy of a tied key is as good an answer as the one
exact search returned, a worse key is not."""

import numpy as np

from bench.memory import exact_kth, recall


def test_a_tied_copy_counts_and_a_worse_key_does_not():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((64, 8)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    keys[40] = keys[7]  # an identical key in another slot
    query = keys[7:8] + 0.01
    top1 = exact_kth(keys, query, 1)  # exact search returns one of the two copies
    assert recall(keys, query, np.array([[7]]), top1) == 1.0
    assert recall(keys, query, np.array([[40]]), top1) == 1.0
    order = [int(i) for i in np.argsort(-(keys @ query[0])) if i not in (7, 40)]
    assert recall(keys, query, np.array([[order[0]]]), top1) == 0.0
    top2 = exact_kth(keys, query, 2)
    assert recall(keys, query, np.array([[7, order[0]]]), top2) == 0.5
    assert recall(keys, query, np.array([[40, -1]]), top2) == 0.5
    assert recall(keys, query, np.array([order[:2]]), top2) == 0.0
