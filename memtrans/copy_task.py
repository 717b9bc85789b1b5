"""A rotated-copy task: the dense copy signal that teaches a model to copy from its context.

A sequence is SOS, ``n`` random lowercase letters, ``|``, the same letters rotated by a random
amount, EOS. From the second rotated letter on, every letter is predictable only by finding where
the previous letter stood in the first half and copying what followed it: an induction head, the
circuit that copying from context and from kNN memory needs. Half the tokens reward it, against a
few per cent of a natural or recall document's, so the circuit forms here in a few hundred steps
where on the recall task it had not formed after 12,000 (README, the recall task); a model that
has it uses it on recall documents at once. ``memtrans-train --copy-warmup-steps`` trains on it
first; ``bench.copy`` measures how fast it is learned.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import BYTE_OFFSET, EOS_ID, PAD_ID, SOS_ID

SEPARATOR = ord("|") + BYTE_OFFSET
CHANCE = 1 / 26


def copy_batch(rng: np.random.Generator, rows: int, seq_len: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, labels, predictable) of ``rows`` sequences of ``seq_len`` inputs.

    ``predictable`` marks the labels that copying decides (the rotated letters after the first);
    labels past EOS, when ``seq_len`` is even, are ``PAD_ID``.
    """
    if seq_len < 6:
        raise ValueError(f"the copy task needs seq_len >= 6 (two letters each side), got {seq_len}")
    n = (seq_len - 2) // 2
    letters = rng.integers(0, 26, size=(rows, n)) + ord("a") + BYTE_OFFSET
    shifts = rng.integers(1, n, size=rows)
    rotated = np.stack([np.roll(row, -s) for row, s in zip(letters, shifts)])
    column = np.ones((rows, 1), dtype=np.int64)
    tokens = np.full((rows, seq_len + 1), PAD_ID, dtype=np.int64)
    tokens[:, :2 * n + 3] = np.concatenate(
        [column * SOS_ID, letters, column * SEPARATOR, rotated, column * EOS_ID], axis=1)
    tokens = torch.from_numpy(tokens)
    predictable = torch.zeros(rows, seq_len, dtype=torch.bool)
    predictable[:, n + 2:2 * n + 1] = True  # labels of the 2nd to the last rotated letter
    return tokens[:, :-1], tokens[:, 1:], predictable


def warmup_rng(seed: int, rank: int, step: int, micro: int) -> np.random.Generator:
    """The generator of one warm-up batch: a function of the run's seed, the rank and the step,
    so a resumed run trains on the same batches."""
    return np.random.default_rng([seed, rank, step, micro])
