"""The paper's experiment in miniature: validation bits per byte on held-out files for a model
without kNN memory and for kNN memories of several sizes, trained for the same steps.

    python -m bench.experiment [--steps 3000] [--sizes 2048,8192,32768] [--out runs/experiment]
                               [any memtrans-train flag, e.g. --dim 256 --depth 6]
    python -m bench.experiment --task recall [...]   # the recall task: bench/recall_experiment.py

Each arm is one ``memtrans-train`` run in its own process, one after another, with the same
model, seed and document order; only ``--memory`` and ``--max-memories`` differ. Every arm keeps
its Transformer-XL memory, so "no memory" is the paper's baseline (a Transformer-XL). Flags this
script does not know are passed to every arm.

Writes ``<out>/<arm>/`` (each run: log, checkpoint, its own plot), ``<out>/results.json``,
``<out>/validation.png`` (curves against step and against training wall time) and prints the
README's two tables: the validation figures, and the final models' figures by how much of its
document a token has before it (where a larger memory can help and a smaller one cannot), read
by ``memtrans.evaluate`` on whole validation documents (all, or ``--eval-tokens``), with 95%
intervals by bootstrap over documents for memory arm - none and retrieval on - off. Run it again
with the same ``--out`` to finish an interrupted experiment: a finished arm is kept, an
unfinished one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import machine_line, table
from memtrans.checkpoint import CHECKPOINT
from memtrans.config import TrainError
from memtrans.evaluate import EvaluationSettings, Reading, bucket_names, difference, evaluate_run

OFF = "off"


@dataclass(kw_only=True, slots=True)
class ExperimentConfig:
    steps: int = 3000
    """Optimizer steps per arm."""
    eval_every: int = 500
    """Validate every this many steps (and at the end)."""
    eval_batches: int = 128
    """Validation segments per evaluation: 128 x 256 tokens lets a 32K memory fill on the long
    held-out files, so the largest arm has history the smaller ones do not."""
    sizes: tuple[int, ...] = (2048, 8192, 32768)
    """kNN memory per row and layer, in tokens, one arm each (plus the arm without memory)."""
    eval_tokens: int | None = None
    """The final models' figures by history read whole validation documents until at least
    this many tokens; None: all of them."""
    memory: str = "remote"
    """Where the memory arms keep their memory: ``remote`` (a local memory server) or ``inproc``."""
    out: str = "runs/experiment"
    train_args: tuple[str, ...] = ()
    """Further ``memtrans-train`` flags, the same for every arm."""

    def __post_init__(self):
        for name in ("steps", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got "
                                 f"{getattr(self, name)}")
        if self.eval_tokens is not None and self.eval_tokens < 1:
            raise ValueError(f"--eval-tokens must be a positive integer, got {self.eval_tokens}")
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"--sizes must be positive token counts like 2048,8192, got "
                             f"{','.join(map(str, self.sizes))}")
        if self.memory not in ("remote", "inproc"):
            raise ValueError(f"--memory must be remote or inproc, got {self.memory!r}")
        fixed = {"--memory", "--max-memories", "--steps", "--eval-every", "--eval-batches",
                 "--out", "--resume"}
        clash = sorted(fixed & {arg.split("=")[0] for arg in self.train_args})
        if clash:
            raise ValueError(f"{', '.join(clash)} is set per arm by the experiment; use its own "
                             f"--steps/--eval-every/--eval-batches/--sizes/--memory/--out")

    @property
    def arms(self) -> list[str]:
        return [OFF] + [str(size) for size in self.sizes]


def arm_flags(config: ExperimentConfig) -> dict[str, list[str]]:
    """Each arm's ``memtrans-train`` flags for a fresh start."""
    return {arm: (["--memory", OFF] if arm == OFF else
                  ["--memory", config.memory, "--max-memories", arm]) + list(config.train_args)
            for arm in config.arms}


def read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def finished(run: Path, steps: int) -> bool:
    return any(r["kind"] == "eval" and r["step"] >= steps for r in read_log(run))


def run_arms(out: Path, arms: dict[str, list[str]], *, steps: int, eval_every: int,
             eval_batches: int) -> None:
    """Train each arm in turn as its own ``memtrans-train`` process in ``out/<arm>``: from its
    flags ``arms[arm]``, or resumed from its checkpoint (the rest of its config is in there);
    an arm whose log has the evaluation at ``steps`` is kept."""
    for number, (arm, flags) in enumerate(arms.items(), 1):
        run = out / arm
        if finished(run, steps):
            print(f"arm {number}/{len(arms)} ({arm}): already finished in {run}", flush=True)
            continue
        command = [sys.executable, "-m", "memtrans.train", "--steps", str(steps),
                   "--eval-every", str(eval_every), "--eval-batches", str(eval_batches)]
        command += ["--resume", str(run)] if (run / CHECKPOINT).exists() else \
            [*flags, "--out", str(run)]
        print(f"arm {number}/{len(arms)} ({arm}): {' '.join(command[1:])}", flush=True)
        code = subprocess.call(command)
        if code != 0:
            raise RuntimeError(f"arm {arm} failed (memtrans-train exited with {code}); its run "
                               f"directory {run} is kept: run this command again to resume it")


def _curve(run: Path, arm: str) -> list[dict]:
    """Evaluations of one arm: step, training seconds, bpb with the arm's memory, and (memory
    arms) the same model with retrieval switched off."""
    key = "val_bpb_no_memory" if arm == OFF else "val_bpb_memory"
    by_step = {r["step"]: r for r in read_log(run) if r["kind"] == "eval"}  # resumed: last wins
    return [{"step": r["step"], "train_seconds": r["train_seconds"], "val_bpb": r[key],
             "val_bpb_retrieval_off": None if arm == OFF else r["val_bpb_no_memory"]}
            for _, r in sorted(by_step.items())]


def _at_time(curve: list[dict], seconds: float) -> float:
    """Validation bpb at ``seconds`` of training, linear between evaluations."""
    points = [(p["train_seconds"], p["val_bpb"]) for p in curve]
    for t, bpb in points:
        if t == seconds:
            return bpb
    for (t0, b0), (t1, b1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return b0 + (b1 - b0) * (seconds - t0) / (t1 - t0)
    return math.nan  # before the first evaluation: no figure rather than an extrapolated one


def summarize(config: ExperimentConfig) -> dict:
    out = Path(config.out)
    curves = {arm: _curve(out / arm, arm) for arm in config.arms}
    missing = [arm for arm, curve in curves.items() if not curve]
    if missing:
        raise RuntimeError(f"no evaluations logged for arm(s) {', '.join(missing)} in {out}")
    tokens_per_s = {}
    for arm in config.arms:
        train = [r for r in read_log(out / arm) if r["kind"] == "train"]
        tokens_per_s[arm] = sum(r["tokens_per_s"] for r in train) / len(train)
    common_time = min(curve[-1]["train_seconds"] for curve in curves.values())
    edges = tuple(sorted(config.sizes))
    return {"config": asdict(config), "machine": machine_line(), "curves": curves,
            "tokens_per_s": tokens_per_s, "common_seconds": common_time,
            "at_common_seconds": {arm: _at_time(curve, common_time)
                                  for arm, curve in curves.items()},
            "by_history": {arm: _final_readings(out / arm, config, edges)
                           for arm in config.arms}}


def _final_readings(run: Path, config: ExperimentConfig, edges: tuple[int, ...]) -> dict:
    """The final model's per-document sums on whole validation documents (``memtrans.evaluate``),
    as JSON. Kept in ``<run>/final_evaluation.json``: reading all of the validation set takes
    long, and running the experiment again must not repeat it for an arm that has not changed."""
    key = {"step": max(r["step"] for r in read_log(run) if r["kind"] == "eval"),
           "eval_tokens": config.eval_tokens, "edges": list(edges)}
    saved = run / "final_evaluation.json"
    if saved.exists():
        kept = json.loads(saved.read_text())
        if kept["key"] == key:
            return kept["readings"]
    result = evaluate_run(str(run), EvaluationSettings(tokens=config.eval_tokens, edges=edges))
    readings = {name: reading.to_json() for name, reading in result["readings"].items()}
    saved.write_text(json.dumps({"key": key, "readings": readings}))
    return readings


def results_table(results: dict) -> str:
    curves = results["curves"]
    base = curves[OFF][-1]["val_bpb"]
    rows = []
    for arm, curve in curves.items():
        last = curve[-1]
        off = last["val_bpb_retrieval_off"]
        rows.append([
            "none (Transformer-XL)" if arm == OFF else f"{int(arm):,} tokens", last["step"],
            f"{last['train_seconds'] / 60:.1f} min", f"{results['tokens_per_s'][arm]:,.0f}",
            f"{last['val_bpb']:.4f}", f"{last['val_bpb'] - base:+.4f}",
            f"{results['at_common_seconds'][arm]:.4f}",
            "-" if off is None else f"{off:.4f}"])
    return table(["kNN memory per row", "steps", "training time", "tokens/s", "val bits/byte",
                  "vs none", f"at equal time ({results['common_seconds'] / 60:.1f} min)",
                  "same model, retrieval off"], rows)


def history_table(results: dict) -> str:
    """Final models' bits per byte by history length on whole validation documents, with the
    95% intervals (bootstrap over documents) of memory arm - none and retrieval on - off;
    empty buckets left out."""
    readings = {arm: {name: Reading.from_json(r) for name, r in figures.items()}
                for arm, figures in results["by_history"].items()}
    edges = tuple(sorted(results["config"]["sizes"]))
    base = readings[OFF]["off"]
    tokens = base.tokens[:, 0]
    columns = [(name, bucket) for name, bucket in zip(["all", *bucket_names(edges)],
                                                      [None, *range(len(edges) + 1)])
               if (tokens if bucket is None else tokens[:, bucket]).sum()]
    rows = [["none (Transformer-XL)"] + [f"{base.bpb(0, b):.4f}" for _, b in columns]]
    for arm, figures in readings.items():
        if arm == OFF:
            continue
        name = f"{int(arm):,} tokens"
        on, off = figures["on"], figures["off"]
        rows.append([name] + [f"{on.bpb(0, b):.4f}" for _, b in columns])
        rows.append([f"{name} - none"] + [str(difference(on, base, b)) for _, b in columns])
        rows.append([f"{name}, retrieval off"] + [f"{off.bpb(0, b):.4f}" for _, b in columns])
        rows.append([f"{name}, on - off"] + [str(difference(on, off, b)) for _, b in columns])
    rows.append(["tokens in bucket"] + [
        f"{int((tokens if b is None else tokens[:, b]).sum()):,}" for _, b in columns])
    return table(["kNN memory per row / history (tokens)"] + [n for n, _ in columns], rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for arm, curve in results["curves"].items():
        label = "no kNN memory" if arm == OFF else f"kNN memory {int(arm):,}"
        for ax, x in zip(axes, ("step", "train_seconds")):
            xs = [p[x] / (60 if x == "train_seconds" else 1) for p in curve]
            line, = ax.plot(xs, [p["val_bpb"] for p in curve], marker="o", label=label)
            if arm != OFF:
                ax.plot(xs, [p["val_bpb_retrieval_off"] for p in curve], linestyle=":",
                        color=line.get_color(), label=f"{label}, retrieval off")
    axes[0].set(xlabel="step", ylabel="validation bits per byte")
    axes[1].set(xlabel="training wall time (min)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Memorizing Transformer in miniature: held-out standard-library files")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts like "
                                         f"2048,8192, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", choices=("text", "recall"), default="text")
    known, argv = task.parse_known_args(argv)
    if known.task == "recall":
        from bench.recall_experiment import main as recall_main
        return recall_main(argv)
    d = ExperimentConfig()
    parser = argparse.ArgumentParser(prog="python -m bench.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--eval-batches", type=int, default=d.eval_batches)
    parser.add_argument("--sizes", type=_sizes, default=d.sizes,
                        help="kNN memory sizes, tokens per row (default 2048,8192,32768)")
    parser.add_argument("--eval-tokens", type=int, default=d.eval_tokens,
                        help="the final figures by history read whole validation documents "
                             "until at least this many tokens (default: all of them)")
    parser.add_argument("--memory", default=d.memory, help="remote (default) or inproc")
    parser.add_argument("--out", default=d.out)
    args, train_args = parser.parse_known_args(argv)
    try:
        config = ExperimentConfig(**vars(args), train_args=tuple(train_args))
        run_arms(Path(config.out), arm_flags(config), steps=config.steps,
                 eval_every=config.eval_every, eval_batches=config.eval_batches)
        results = summarize(config)
    except (ValueError, RuntimeError, TrainError) as exc:
        print(f"bench.experiment: error: {exc}", file=sys.stderr)
        return 2
    report(results, Path(config.out), plot, "validation.png",
           f"Arms trained one after another; flags for every arm: "
           f"{' '.join(config.train_args) or '(memtrans-train defaults)'}",
           [results_table(results), "", history_table(results)])
    return 0


def report(results: dict, out: Path, plot, png: str, flags: str, lines: list[str]) -> None:
    """Write ``results.json`` and the plot into ``out``, print the tables."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    try:
        plot(results, out / png)
        plotted = f"plot: {out / png}"
    except ImportError:
        plotted = "no plot: matplotlib is not installed (pip install -e '.[bench]')"
    print(results["machine"])
    print(flags)
    for line in lines:
        print(line)
    print(f"results: {out / 'results.json'}; {plotted}")


if __name__ == "__main__":
    sys.exit(main())
