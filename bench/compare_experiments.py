"""Two finished ``bench.experiment`` directories set against each other, arm by arm: the same
arms and seeds trained two ways (for example with and without ``--copy-warmup-steps``), each
arm's final reads pooled over seeds, and ``first - second`` with its 95% interval (bootstrap
over documents), over all tokens and over tokens with at least ``--from`` tokens of history.

    python -m bench.compare_experiments runs/exp12 runs/exp12_nocopy [--from 8192]

Reads each run's ``final_evaluation.json``; both experiments must have read the same
validation documents (the same corpus, split and ``--eval-tokens``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from bench.common import table
from memtrans.bootstrap import bpb_difference


def pooled_reading(out: Path, arm: str, seeds: list[int], side: str):
    """``arm``'s seeds read together: per document and history bucket, the nats and tokens of
    all of them, with the documents and the bucket edges of the experiment's reads."""
    nats = tokens = documents = edges = None
    for seed in seeds:
        saved = json.loads((out / f"{arm}-s{seed}" / "final_evaluation.json").read_text())
        edges, reading = saved["key"]["edges"], saved["readings"][side]
        if documents is not None and reading["documents"] != documents:
            raise ValueError(f"{out}: the seeds' reads are of different documents")
        documents = reading["documents"]
        n, t = np.array(reading["nats"])[:, 0], np.array(reading["tokens"])[:, 0]
        nats, tokens = (n, t) if nats is None else (nats + n, tokens + t)
    return nats, tokens, documents, edges


def from_history(out: Path, nats, tokens, edges, history: int):
    """Per document, the nats and tokens on tokens with at least ``history`` tokens before them
    (0, or a bucket edge of the experiment's reads)."""
    if history and history not in edges:
        raise ValueError(f"{out} read its history buckets at {edges}, not at {history}: "
                         f"choose --from among them (or 0)")
    first = edges.index(history) + 1 if history else 0
    return nats[:, first:].sum(-1), tokens[:, first:].sum(-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare_experiments",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--from", dest="history", type=int, default=8192,
                        help="also compare on tokens with at least this much history, a bucket "
                             "edge of both experiments (default 8192)")
    args = parser.parse_args(argv)
    try:
        configs = [json.loads((Path(d) / "results.json").read_text())["config"]
                   for d in (args.first, args.second)]
        seeds = sorted(set(configs[0]["seeds"]) & set(configs[1]["seeds"]))
        arms = [a for a in ["off", *map(str, configs[0]["sizes"])]
                if a == "off" or int(a) in configs[1]["sizes"]]
        rows = []
        for arm in arms:
            side = "off" if arm == "off" else "on"
            read = {Path(d): pooled_reading(Path(d), arm, seeds, side)
                    for d in (args.first, args.second)}
            for history in (0, args.history):
                ((na, ta), da), ((nb, tb), db) = (
                    (from_history(out, nats, tokens, edges, history), documents)
                    for out, (nats, tokens, documents, edges) in read.items())
                if da != db or not np.array_equal(ta, tb):
                    raise ValueError("the two experiments read different validation documents")
                bpb = [n.sum() / ta.sum() / math.log(2) for n in (na, nb)]
                rows.append(["none" if arm == "off" else f"{int(arm):,} tokens",
                             "all" if not history else f">={history:,}", f"{bpb[0]:.4f}",
                             f"{bpb[1]:.4f}", str(bpb_difference(na, nb, ta))])
    except (OSError, KeyError, ValueError) as exc:
        print(f"bench.compare_experiments: error: {exc}", file=sys.stderr)
        return 2
    print(f"seeds {','.join(map(str, seeds))} pooled; 95% intervals by bootstrap over documents")
    print(table(["kNN memory per row", "history", args.first, args.second,
                 "first - second"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
