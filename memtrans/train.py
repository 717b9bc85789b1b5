"""`memtrans-train`: the torchrun trainer. Not built yet: it says so instead of pretending to train."""

import sys


def main(argv=None) -> int:
    print("memtrans-train: the trainer is not built yet (issue: distributed training on real "
          "documents). Use the model and memories from Python meanwhile; see README.md, Usage.",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
