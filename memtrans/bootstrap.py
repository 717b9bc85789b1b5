"""95% confidence intervals for differences in bits per byte, by bootstrap over documents.

Tokens of one document are not independent draws: a file of character tables is easy all
through, a file of prose hard all through. So the unit of resampling is the document: a
resample draws as many documents as there are, with replacement, and the statistic is computed
from their summed nats and tokens (a ratio, as the figure itself is). Both sides of a difference
are read on the same documents, so a resample takes the same documents for both (a paired
bootstrap): what varies between the documents cancels, what the models do differently stays.

The interval is the percentile interval of ``resamples`` resamples drawn from a fixed seed, so
the same sums always give the same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
SEED = 0


@dataclass(frozen=True, slots=True)
class Interval:
    """A difference in bits per byte (``a - b``) and its 95% bootstrap interval."""

    estimate: float
    low: float
    high: float
    documents: int
    """Documents with tokens in the figure (the sample size that sets the width)."""

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        if math.isnan(self.estimate):
            return "-"
        return f"{self.estimate:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def bpb_difference(nats_a, nats_b, tokens, *, resamples: int = RESAMPLES, seed: int = SEED,
                   level: float = 0.95) -> Interval:
    """``a - b`` in bits per byte from per-document sums (one entry per document: the nats of
    side ``a``, of side ``b``, and the tokens both were scored on), with its bootstrap interval.

    Documents without tokens take no part; with none at all the figure is NaN."""
    nats_a, nats_b, tokens = (np.asarray(v, dtype=np.float64) for v in (nats_a, nats_b, tokens))
    if not nats_a.shape == nats_b.shape == tokens.shape or nats_a.ndim != 1:
        raise ValueError(f"expected one sum per document on each side, got shapes "
                         f"{nats_a.shape}, {nats_b.shape} and {tokens.shape}")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples must be positive and level in (0, 1), got {resamples} "
                         f"and {level}")
    present = tokens > 0
    diff, tokens = (nats_a - nats_b)[present], tokens[present]
    n = len(tokens)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    estimate = diff.sum() / tokens.sum() / math.log(2)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=resamples)
    samples = (counts @ diff) / (counts @ tokens) / math.log(2)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high), n)
