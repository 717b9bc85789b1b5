"""What a corpus gives the memory: its documents, and how many tokens have long history.

    python -m bench.corpus [--data PATH] [--documents package|file] [--max-document-bytes N]
                           [--val-fraction F] [--rows R]

A token's history is the number of tokens of its document before it (the most a row's memory
can hold when it predicts the token). For train and validation: documents, tokens (a document
of ``n`` bytes is ``n + 1`` predicted tokens: its bytes and EOS), and the tokens with at least
2K, 8K and 32K tokens of history. For training also the largest document's share of what one of
``--rows`` rows (world size x batch size) reads in an epoch: the most of an epoch a row can
spend in one document. The defaults are ``memtrans-train``'s.
"""

from __future__ import annotations

import argparse

from bench.common import table
from memtrans.config import TrainConfig
from memtrans.data import load_corpus

HISTORIES = (2048, 8192, 32768)


def with_history(lengths: list[int], at_least: int) -> int:
    """Predicted tokens with at least ``at_least`` tokens of their document before them."""
    return sum(max(0, n + 1 - at_least) for n in lengths)


def main(argv: list[str] | None = None) -> int:
    d = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--data", default=d.data, help="corpus (default: the stdlib sources)")
    parser.add_argument("--documents", default=d.documents, choices=("package", "file"))
    parser.add_argument("--max-document-bytes", type=int, default=d.max_document_bytes)
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction)
    parser.add_argument("--rows", type=int, default=d.batch_size,
                        help=f"training rows, world size x batch size (default {d.batch_size})")
    args = parser.parse_args(argv)
    corpus = load_corpus(args.data, val_fraction=args.val_fraction, documents=args.documents,
                         max_document_bytes=args.max_document_bytes)
    print(corpus.description)
    rows = []
    for split, docs in (("train", corpus.train), ("validation", corpus.val)):
        lengths = [len(doc.read()) for doc in docs]
        tokens = sum(n + 1 for n in lengths)
        share = max(lengths) / (sum(lengths) / args.rows) if split == "train" else None
        rows.append([split, len(docs), f"{tokens:,}",
                     *(f"{with_history(lengths, h):,}" for h in HISTORIES),
                     f"{100 * share:.0f}%" if share is not None else "-"])
    print(table(["split", "documents", "tokens",
                 *(f">= {h // 1024}K history" for h in HISTORIES),
                 f"largest document / a row's epoch ({args.rows} rows)"], rows))
    print("validation documents: " + ", ".join(doc.name for doc in corpus.val))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
