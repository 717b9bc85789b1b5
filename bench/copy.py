"""How fast does the model learn to copy from its context, and in which layer? The rotated copy.

    python -m bench.copy [--steps 1000] [--eval-every 250] [--depth 3]
                         [--arms plain,smeared,conv] [--memorizing-layers 2]

The task is ``memtrans.copy_task``'s (random letters, then the same letters rotated by a random
amount): every rotated letter after the first is predictable only by an induction head, the
circuit a Memorizing Transformer needs before its memory can help (the kNN layer copies from
retrieved entries the same way). Accuracy is over those letters (chance 1/26). Arms are the
memtrans model built and optimised as ``memtrans-train`` does it, with:

- ``plain``: plain keys;
- ``smeared``: smeared keys (``KeySmear``) in every layer;
- ``knn-smeared``: smeared keys in the kNN layers only;
- ``conv``: the query/key convolutions (``qk_conv=3``) in the kNN layers only.

With ``--memorizing-layers`` the model has kNN layers (their memory stays empty, as in the
trainer's copy warm-up), so the table shows whether *that* layer can learn to copy; the memory can
only extend what the kNN layer copies. Without, the arms that name kNN layers need them.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bench.common import machine_line, table
from memtrans.build import build_model, make_memories
from memtrans.config import TrainConfig, _int_tuple
from memtrans.copy_task import CHANCE, copy_batch
from memtrans.train import _optimizer, learning_rate

ARMS = {"plain": {}, "smeared": {"smear_keys": True}, "knn-smeared": {"smear_keys": True},
        "conv": {"qk_conv": 3}}
KNN_ONLY = {"knn-smeared", "conv"}


def _model(arm: str, config: TrainConfig):
    model = build_model(config)
    if arm == "knn-smeared":  # the trainer has no flag for it: drop the other layers' smears
        for number, layer in enumerate(model.layers, 1):
            if number not in config.memorizing_layers:
                layer[0].fn.key_smear = None
    return model


def train_arm(arm: str, args, val) -> list[tuple[int, float]]:
    """Accuracy on ``val`` every ``eval_every`` steps, with the trainer's model, optimizer and
    schedule."""
    options = {"qk_conv": 0, **ARMS[arm]}
    config = TrainConfig(dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head,
                         memorizing_layers=args.memorizing_layers,
                         memory="inproc" if args.memorizing_layers else "off",
                         **options, lr=args.lr, steps=args.steps, warmup_steps=100,
                         batch_size=args.batch_size, xl_max_memories=0, seed=args.seed)
    torch.manual_seed(args.seed)
    model = _model(arm, config)
    optimizer = _optimizer(model, config)
    blank = make_memories(model, config, None) if args.memorizing_layers else []
    rng = np.random.default_rng(args.seed)
    curve = []
    try:
        for step in tqdm(range(1, args.steps + 1), desc=arm):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step - 1, config)
            x, y, _ = copy_batch(rng, args.batch_size, args.seq_len)
            loss = F.cross_entropy(model(x, blank, add_knn_memory=False).transpose(1, 2), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            optimizer.step()
            if step % args.eval_every == 0 or step == args.steps:
                curve.append((step, _accuracy(model.eval(), blank, val, args.batch_size)))
                model.train()
    finally:
        if blank:
            blank.cleanup()
    return curve


@torch.no_grad()
def _accuracy(model, memories, val, rows: int) -> float:
    vx, vy, vm = val
    predicted = torch.cat([model(vx[s:s + rows], memories, add_knn_memory=False).argmax(-1)
                           for s in range(0, len(vx), rows)])
    return (predicted == vy)[vm].float().mean().item()


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
    parser.add_argument("--memorizing-layers", type=_int_tuple, default=(),
                        help="1-based kNN layers, comma-separated (default: none)")
    parser.add_argument("--arms", default="plain,smeared",
                        help=f"comma-separated, of {', '.join(ARMS)} (default: plain,smeared)")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        parser.error(f"--arms takes {', '.join(ARMS)}, got {args.arms!r}")
    if not args.memorizing_layers and KNN_ONLY & set(arms):
        parser.error("the knn-smeared and conv arms need kNN layers: give --memorizing-layers")
    if args.batch_size > 64 or 64 % args.batch_size:
        parser.error(f"--batch-size must divide the 64 validation rows, got {args.batch_size}")
    val = copy_batch(np.random.default_rng(args.seed + 1), 64, args.seq_len)
    curves = {arm: train_arm(arm, args, val) for arm in arms}
    print(machine_line())
    knn = (f"kNN layers {','.join(map(str, args.memorizing_layers))} (empty memory)"
           if args.memorizing_layers else "no kNN layer")
    print(f"Rotated copy, {args.steps} steps of {args.batch_size} x {args.seq_len} tokens, "
          f"width {args.dim}, depth {args.depth}, {knn}, {args.heads} heads of {args.dim_head}, "
          f"AdamW {args.lr:g}; accuracy on predictable letters (chance {CHANCE:.1%}):")
    steps = [s for s, _ in next(iter(curves.values()))]
    print(table(["keys", *(f"step {s}" for s in steps)],
                [[arm, *(f"{acc:.1%}" for _, acc in curves[arm])] for arm in arms]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
