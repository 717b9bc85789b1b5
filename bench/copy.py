"""How fast does the model learn to copy from its context? The rotated-copy task.

    python -m bench.copy [--steps 1000] [--eval-every 250] [--arms plain,smeared]

The task is ``memtrans.copy_task``'s (random letters, then the same letters rotated by a random
amount): every rotated letter after the first is predictable only by an induction head, the
circuit a Memorizing Transformer needs before its memory can help (the kNN layer copies from
retrieved entries the same way). Accuracy is over those letters (chance 1/26). Arms are the
memtrans model without memorizing layers, with plain or smeared keys (``KeySmear``), built and
optimised as ``memtrans-train`` does it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.common import machine_line, table
from memtrans.config import TrainConfig
from memtrans.copy_task import CHANCE, copy_batch
from memtrans.train import _optimizer, build_model, learning_rate

ARMS = {"plain": False, "smeared": True}


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
        x, y, _ = copy_batch(rng, args.batch_size, args.seq_len)
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
    parser.add_argument("--seq-len", type=int, default=128)
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
    val = copy_batch(np.random.default_rng(args.seed + 1), 64, args.seq_len)
    curves = {arm: train_arm(ARMS[arm], args, val) for arm in arms}
    print(machine_line())
    print(f"Rotated copy, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
          f"width {args.dim}, depth {args.depth}, {args.heads} heads of {args.dim_head}, "
          f"AdamW {args.lr:g}; accuracy on predictable letters (chance {CHANCE:.1%}):")
    steps = [s for s, _ in next(iter(curves.values()))]
    print(table(["keys", *(f"step {s}" for s in steps)],
                [[arm, *(f"{acc:.1%}" for _, acc in curves[arm])] for arm in arms]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
