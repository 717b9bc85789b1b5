"""Sample from a trained checkpoint, with kNN memories filled by a priming document.

The priming document is read the way training reads one: segment by segment, each segment's
key/values entering the Transformer-XL and kNN memories as they leave the local window. Sampling
then extends an open segment one byte at a time; the open segment is only *read* (no memory
writes) until it is full, when it is committed like a training segment. So every token enters
the memories exactly once, in order, as in training, and the continuation can retrieve from the
whole priming document, however much longer than the context it is.

    memtrans-generate --checkpoint runs/x --prime some_module.py --length 400
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from .build import build_model, make_memories
from .checkpoint import load_checkpoint, resolve_config
from .config import TrainError
from .data import SOS_ID, decode, encode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memtrans-generate",
        description="Read a priming document into a checkpoint's memories, then sample a "
                    "continuation (in-process memory).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    parser.add_argument("--prime", required=True, help="text file read into the memories first")
    parser.add_argument("--length", type=int, default=256, help="bytes to sample (default 256)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature; 0 picks the most likely byte (default 0.8)")
    parser.add_argument("--top-k", type=int, default=40,
                        help="sample among the k most likely bytes, 0: all (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    return parser


class Reader:
    """One document row of the model: committed segments in the memories, one open segment."""

    def __init__(self, model, memories, seq_len: int):
        self.model, self.memories, self.seq_len = model, memories, seq_len
        self.xl = None
        self.open: list[int] = []

    def _run(self, tokens: list[int], *, commit: bool) -> torch.Tensor:
        x = torch.tensor([tokens])
        out = self.model(x, knn_memories=self.memories, xl_memories=self.xl,
                         add_knn_memory=commit)
        logits, xl = out if isinstance(out, tuple) else (out, None)
        if commit:
            self.xl = xl
        return logits[0, -1]

    def read(self, tokens: list[int]) -> None:
        for token in tokens:
            self.open.append(token)
            if len(self.open) == self.seq_len:
                self._run(self.open, commit=True)
                self.open = []

    def next_logits(self, last: int) -> torch.Tensor:
        """Logits for the token after ``last``, which is read (and committed if it fills)."""
        self.open.append(last)
        logits = self._run(self.open, commit=len(self.open) == self.seq_len)
        if len(self.open) == self.seq_len:
            self.open = []
        return logits


def sample(logits: torch.Tensor, temperature: float, top_k: int,
           generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(checkpoint: str, prime: str, *, length: int, temperature: float, top_k: int,
             seed: int) -> bytes:
    path, state = load_checkpoint(checkpoint)
    config = resolve_config({"resume": checkpoint}, state, path)
    config = dataclasses.replace(config, batch_size=1, memory="inproc", memory_servers=())
    model = build_model(config)
    model.load_state_dict(state["model"])
    model.eval()
    try:
        primer = Path(prime).read_bytes()
    except OSError as exc:
        raise TrainError(f"cannot read priming document {prime}: {exc.strerror}") from None
    tokens = [SOS_ID, *encode(primer).tolist()]
    memories = make_memories(model, config, None)
    try:
        reader = Reader(model, memories, config.seq_len)
        reader.read(tokens[:-1])
        generator = torch.Generator().manual_seed(seed)
        last, out = tokens[-1], []
        for _ in range(length):
            last = sample(reader.next_logits(last), temperature, top_k, generator)
            out.append(last)
        return decode(out)
    finally:
        memories.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.length < 1 or args.temperature < 0 or args.top_k < 0:
        print("memtrans-generate: error: --length must be positive, --temperature and --top-k "
              "non-negative", file=sys.stderr)
        return 2
    try:
        text = generate(args.checkpoint, args.prime, length=args.length,
                        temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    except TrainError as exc:
        print(f"memtrans-generate: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(text)
    sys.stdout.buffer.write(b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
