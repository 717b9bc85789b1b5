"""How fast does the model learn to copy from its context? A rotated-copy task.

    python -m bench.copy [--steps 1000] [--eval-every 250] [--arms plain,smeared]

Each sequence is SOS, 63 random lowercase letters, ``|``, the same letters rotated by a random
amount, EOS (128 tokens). After the first rotated letter every letter is predictable only by
finding where the previous letter stood in the first half and copying what followed it: an
induction head, the circuit a Memorizing Transformer needs before its memory can help (the kNN
layer copies from retrieved entries the same way). Accuracy is over the predictable second-half
letters (chance 1/26 = 3.8%; a model matching only the previous letter gets about 40%, letters
repeat). Arms are the memtrans model without memorizing layers, with plain or smeared keys
(``memtrans.model.KeySmear``), built and optimised as ``memtrans-train`` does it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.common import machine_line, table
from memtrans.config import TrainConfig
from memtrans.data import BYTE_OFFSET, EOS_ID, SOS_ID
from memtrans.train import _optimizer, build_model, learning_rate

LETTERS = 63
SEQUENCE = 2 * LETTERS + 3
ARMS = {"plain": False, "smeared": True}


def copy_batch(rng: np.random.Generator, rows: int) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """(inputs, labels, mask of the predictable labels) of ``rows`` sequences."""
    letters = rng.integers(0, 26, size=(rows, LETTERS)) + ord("a") + BYTE_OFFSET
    shifts = rng.integers(1, LETTERS, size=rows)
    rotated = np.stack([np.roll(row, -s) for row, s in zip(letters, shifts)])
    column = np.ones((rows, 1), dtype=np.int64)
    tokens = torch.from_numpy(np.concatenate(
        [column * SOS_ID, letters, column * (ord("|") + BYTE_OFFSET), rotated, column * EOS_ID],
        axis=1))
    mask = torch.zeros(rows, SEQUENCE - 1, dtype=torch.bool)
    mask[:, LETTERS + 2:SEQUENCE - 2] = True  # labels from the second rotated letter, before EOS
    return tokens[:, :-1], tokens[:, 1:], mask


def train_arm(smear: bool, args, val) -> list[tuple[int, float]]:
    """Accuracy on ``val`` every ``eval_every`` steps, with the trainer's model, optimizer and
    schedule."""
    config = TrainConfig(dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head,
                         memorizing_layers=(), memory="off", smear_keys=smear, lr=args.lr,
                         steps=args.steps, warmup_steps=100, batch_size=args.batch_size,
                         xl_max_memories=0, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model(config)
    optimizer = _optimizer(model, config)
    rng = np.random.default_rng(args.seed)
    curve = []
    for step in tqdm(range(1, args.steps + 1), desc="smeared keys" if smear else "plain keys"):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, config)
        x, y, _ = copy_batch(rng, args.batch_size)
        loss = F.cross_entropy(model(x, []).transpose(1, 2), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            vx, vy, vm = val
            with torch.no_grad():
                correct = model.eval()(vx, []).argmax(-1) == vy
            model.train()
            curve.append((step, correct[vm].float().mean().item()))
    return curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.copy", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim-head", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated, of {', '.join(ARMS)} (default: both)")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(f"--arms takes {', '.join(ARMS)}, got {args.arms!r}")
    val = copy_batch(np.random.default_rng(args.seed + 1), 64)
    curves = {arm: train_arm(ARMS[arm], args, val) for arm in arms}
    print(machine_line())
    print(f"Rotated copy, {args.steps} steps of {args.batch_size} x {SEQUENCE - 1} tokens, "
          f"width {args.dim}, depth {args.depth}, {args.heads} heads of {args.dim_head}, "
          f"AdamW {args.lr:g}; accuracy on predictable letters (chance 3.8%):")
    steps = [s for s, _ in next(iter(curves.values()))]
    print(table(["keys", *(f"step {s}" for s in steps)],
                [[arm, *(f"{acc:.1%}" for _, acc in curves[arm])] for arm in arms]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
