"""The paper's experiment in miniature: held-out bits per byte for a model without kNN memory
and for kNN memories of several sizes, trained for the same steps from several seeds, and the
paper's fine-tuning result (a model trained without memory, fine-tuned with it).

    python -m bench.experiment [--steps 3000] [--sizes 2048,8192,32768] [--seeds 0,1]
                               [--finetune-steps N [--finetune-size 32768]] [--jobs 2]
                               [--out runs/experiment] [any memtrans-train flag, e.g. --dim 256]
    python -m bench.experiment --task recall [...]   # the recall task: bench/recall_experiment.py

Each run is one ``memtrans-train`` process in ``<out>/<arm>-s<seed>``; the arms of one seed
share the model, seed and document order, and only ``--memory`` and ``--max-memories`` differ.
Every arm keeps its Transformer-XL memory and has the same layers (the kNN layer of the arm
without memory attends locally only), so "no memory" is the paper's baseline (a Transformer-XL)
and its weights can start a memory model. With ``--finetune-steps``, each seed's arm without
memory is continued for that many steps twice, from its final weights with a fresh optimizer
(``--init-from``) and no copy warmup: without memory (``ft-off``) and with
``--finetune-size`` memory (``ft-<size>``). Flags this script does not know go to every run.

``--jobs`` runs that many at once (each one's output then goes to ``<run>/train.log``). Each
finished run's final model is read by ``memtrans.evaluate`` on whole validation documents (all,
or ``--eval-tokens``), and the figures by history length are pooled over seeds (the sums of the
seeds' reads of the same documents), with 95% intervals by bootstrap over documents for every
difference; each seed's own difference is shown too, since the document bootstrap does not see
seed-to-seed variation. Writes ``<out>/results.json``, ``<out>/validation.png`` and prints the
README's tables. Run it again with the same ``--out`` to finish an interrupted experiment: a
finished run is kept, an unfinished one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import machine_line, table
from memtrans.checkpoint import CHECKPOINT
from memtrans.config import TrainError
from memtrans.evaluate import Reading, bucket_names, difference, token_counts

OFF = "off"
FINETUNE = "ft-"


@dataclass(kw_only=True, slots=True)
class ExperimentConfig:
    steps: int = 3000
    """Optimizer steps per arm."""
    eval_every: int = 500
    """Validate every this many steps (and at the end)."""
    eval_batches: int = 128
    """Validation segments per evaluation: 128 x 256 tokens lets a 32K memory fill on the long
    held-out documents, so the largest arm has history the smaller ones do not."""
    sizes: tuple[int, ...] = (2048, 8192, 32768)
    """kNN memory per row and layer, in tokens, one arm each (plus the arm without memory)."""
    seeds: tuple[int, ...] = (0, 1)
    """A run of every arm per seed."""
    finetune_steps: int = 0
    """Steps of the fine-tuning arms (from each seed's arm without memory); 0: none."""
    finetune_size: int | None = None
    """kNN memory of the fine-tuning arm with memory; None: the largest of ``sizes``."""
    jobs: int = 1
    """Runs trained (and evaluated) at once."""
    eval_tokens: int | None = None
    """The final models' figures by history read whole validation documents until at least
    this many tokens; None: all of them."""
    memory: str = "remote"
    """Where the memory arms keep their memory: ``remote`` (a local memory server) or ``inproc``."""
    out: str = "runs/experiment"
    train_args: tuple[str, ...] = ()
    """Further ``memtrans-train`` flags, the same for every run."""

    def __post_init__(self):
        for name in ("steps", "eval_every", "eval_batches", "jobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got "
                                 f"{getattr(self, name)}")
        if self.finetune_steps < 0:
            raise ValueError(f"--finetune-steps must be 0 (no fine-tuning arms) or a positive "
                             f"step count, got {self.finetune_steps}")
        if self.eval_tokens is not None and self.eval_tokens < 1:
            raise ValueError(f"--eval-tokens must be a positive integer, got {self.eval_tokens}")
        if not self.sizes or min(self.sizes) < 1:
            raise ValueError(f"--sizes must be positive token counts like 2048,8192, got "
                             f"{','.join(map(str, self.sizes))}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct integers like 0,1, got "
                             f"{','.join(map(str, self.seeds))}")
        if self.finetune_size is not None and self.finetune_size < 1:
            raise ValueError(f"--finetune-size must be a positive token count, got "
                             f"{self.finetune_size}")
        if self.memory not in ("remote", "inproc"):
            raise ValueError(f"--memory must be remote or inproc, got {self.memory!r}")
        fixed = {"--memory", "--max-memories", "--steps", "--eval-every", "--eval-batches",
                 "--out", "--resume", "--seed", "--init-from"}
        clash = sorted(fixed & {arg.split("=")[0] for arg in self.train_args})
        if clash:
            raise ValueError(f"{', '.join(clash)} is set per run by the experiment; use its own "
                             f"--steps/--eval-every/--eval-batches/--sizes/--seeds/--memory/"
                             f"--out")

    @property
    def arms(self) -> list[str]:
        return [OFF] + [str(size) for size in self.sizes]

    @property
    def finetune_arms(self) -> list[str]:
        if not self.finetune_steps:
            return []
        return [FINETUNE + OFF, FINETUNE + str(self.finetune_size or max(self.sizes))]


@dataclass(frozen=True, slots=True)
class Run:
    """One ``memtrans-train`` process of the experiment."""

    name: str
    flags: tuple[str, ...]
    """Its flags for a fresh start (a resumed run takes its config from its checkpoint)."""
    steps: int
    after: str | None = None
    """The run whose checkpoint this one starts from: it must finish first."""


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed}"


def memory_flags(arm: str, memory: str) -> list[str]:
    size = arm.removeprefix(FINETUNE)
    return ["--memory", OFF] if size == OFF else ["--memory", memory, "--max-memories", size]


def experiment_runs(config: ExperimentConfig) -> list[Run]:
    """Every run: the arms of each seed, then the fine-tuning arms that start from that seed's
    arm without memory."""
    runs = []
    for seed in config.seeds:
        common = [*config.train_args, "--seed", str(seed)]
        runs += [Run(run_name(arm, seed), (*memory_flags(arm, config.memory), *common),
                     config.steps) for arm in config.arms]
    out = Path(config.out)
    for seed in config.seeds:
        base = run_name(OFF, seed)
        runs += [Run(run_name(arm, seed),
                     (*memory_flags(arm, config.memory), *config.train_args, "--seed", str(seed),
                      "--init-from", str(out / base), "--copy-warmup-steps", "0"),
                     config.finetune_steps, after=base) for arm in config.finetune_arms]
    return runs


def read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def finished(run: Path, steps: int) -> bool:
    return any(r["kind"] == "eval" and r["step"] >= steps for r in read_log(run))


def run_arms(out: Path, arms: dict[str, list[str]], *, steps: int, eval_every: int,
             eval_batches: int) -> None:
    """Train each arm (flags ``arms[arm]``) in turn in ``out/<arm>`` (``train_runs``)."""
    train_runs(out, [Run(arm, tuple(flags), steps) for arm, flags in arms.items()],
               eval_every=eval_every, eval_batches=eval_batches)


def train_runs(out: Path, runs: list[Run], *, eval_every: int, eval_batches: int,
               jobs: int = 1, after_training=None) -> None:
    """Train each run as its own ``memtrans-train`` process in ``out/<name>``, ``jobs`` at a
    time, a run only after the run it starts from: from its flags, or resumed from its
    checkpoint (the rest of its config is in there); a run whose log has the evaluation at its
    steps is kept. ``after_training(run_dir)`` is then called in the same job (the final
    evaluation). A failed run stops the runs that start from it, not the others; the failures
    are raised together at the end."""
    failures: dict[str, str] = {}

    def job(number: int, run: Run) -> None:
        path = out / run.name
        if run.after in failures:
            failures[run.name] = f"not started: {run.after} failed"
            return
        if finished(path, run.steps):
            print(f"run {number}/{len(runs)} ({run.name}): already finished in {path}",
                  flush=True)
        else:
            command = [sys.executable, "-m", "memtrans.train", "--steps", str(run.steps),
                       "--eval-every", str(min(eval_every, run.steps)),
                       "--eval-batches", str(eval_batches)]
            command += ["--resume", str(path)] if (path / CHECKPOINT).exists() else \
                [*run.flags, "--out", str(path)]
            print(f"run {number}/{len(runs)} ({run.name}): {' '.join(command[1:])}", flush=True)
            if jobs > 1:
                path.mkdir(parents=True, exist_ok=True)
                with open(path / "train.log", "a") as log:
                    code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
            else:
                code = subprocess.call(command)
            if code != 0:
                failures[run.name] = f"memtrans-train exited with {code}"
                return
        if after_training is not None:
            try:
                after_training(path)
            except (RuntimeError, TrainError) as exc:
                failures[run.name] = str(exc)

    numbered = list(enumerate(runs, 1))
    for phase in ([r for r in numbered if r[1].after is None],
                  [r for r in numbered if r[1].after is not None]):
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in [pool.submit(job, number, run) for number, run in phase]:
                future.result()
    if failures:
        raise RuntimeError("; ".join(f"{name} failed ({why})" for name, why in failures.items())
                           + f"; the run directories in {out} are kept: run this command "
                             f"again to resume them")


def _curve(log: list[dict], memory: bool) -> list[dict]:
    """Evaluations in one run's log: step, training seconds, bpb with the run's memory, and
    (memory runs) the same model with retrieval switched off."""
    key = "val_bpb_memory" if memory else "val_bpb_no_memory"
    by_step = {r["step"]: r for r in log if r["kind"] == "eval"}  # resumed: last wins
    return [{"step": r["step"], "train_seconds": r["train_seconds"], "val_bpb": r[key],
             "val_bpb_retrieval_off": r["val_bpb_no_memory"] if memory else None}
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


def _arm(name: str) -> str:
    return name.rsplit("-s", 1)[0]


def _has_memory(name: str) -> bool:
    return _arm(name).removeprefix(FINETUNE) != OFF


def summarize(config: ExperimentConfig) -> dict:
    out = Path(config.out)
    names = [run.name for run in experiment_runs(config)]
    logs = {name: read_log(out / name) for name in names}
    curves = {name: _curve(logs[name], _has_memory(name)) for name in names}
    missing = [name for name, curve in curves.items() if not curve]
    if missing:
        raise RuntimeError(f"no evaluations logged for run(s) {', '.join(missing)} in {out}")
    tokens_per_s = {}
    for name in names:
        train = [r for r in logs[name] if r["kind"] == "train"]
        tokens_per_s[name] = sum(r["tokens_per_s"] for r in train) / len(train)
    main_runs = [n for n in names if not n.startswith(FINETUNE)]
    common_time = min(curves[n][-1]["train_seconds"] for n in main_runs)
    return {"config": asdict(config), "machine": machine_line(), "curves": curves,
            "tokens_per_s": tokens_per_s, "common_seconds": common_time,
            "at_common_seconds": {n: _at_time(curves[n], common_time) for n in main_runs},
            "by_history": {n: final_readings(out / n, config, last_eval_step(logs[n]))
                           for n in names}}


def last_eval_step(log: list[dict]) -> int:
    return max(r["step"] for r in log if r["kind"] == "eval")


def final_readings(run: Path, config: ExperimentConfig, step: int) -> dict:
    """The final model's per-document sums on whole validation documents, as JSON: read by a
    ``memtrans-evaluate`` process and kept in ``<run>/final_evaluation.json`` (reading all of
    the validation set takes long, and running the experiment again must not repeat it for a
    run that has not changed)."""
    key = {"step": step, "eval_tokens": config.eval_tokens, "edges": sorted(config.sizes)}
    saved = run / "final_evaluation.json"
    if saved.exists():
        kept = json.loads(saved.read_text())
        if kept["key"] == key:
            return kept["readings"]
    with tempfile.TemporaryDirectory() as tmp:
        sums = Path(tmp) / "sums.json"
        command = [sys.executable, "-m", "memtrans.evaluate", str(run), "--json", str(sums),
                   "--edges", ",".join(map(str, key["edges"]))]
        if config.eval_tokens is not None:
            command += ["--tokens", str(config.eval_tokens)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"memtrans-evaluate {run} exited with {result.returncode}: "
                               f"{result.stderr.strip()[-2000:]}")
        readings = json.loads(sums.read_text())[0]["readings"]
    (run / "evaluation.txt").write_text(result.stdout)
    saved.write_text(json.dumps({"key": key, "readings": readings}))
    return readings


def pooled(readings: list[Reading]) -> Reading:
    """Several reads of the same documents as one: their sums added (the seeds of an arm)."""
    first = readings[0]
    if any(r.documents != first.documents for r in readings):
        raise RuntimeError("the seeds' final readings are of different documents")
    return Reading(first.documents, sum(r.nats for r in readings),
                   sum(r.tokens for r in readings))


def _label(arm: str) -> str:
    size = arm.removeprefix(FINETUNE)
    name = "none (Transformer-XL)" if size == OFF else f"{int(size):,} tokens"
    return f"fine-tuned, {name}" if arm.startswith(FINETUNE) else name


def results_table(results: dict) -> str:
    """The trainer's own validation at the end of each run, by run. With runs one at a time,
    also each main run's validation at the shortest one's training time; with ``--jobs`` above
    1 the runs share the cores unevenly, so their times do not compare and that column is
    left out."""
    curves = results["curves"]
    alone = results["config"]["jobs"] == 1
    rows = []
    for name, curve in curves.items():
        arm, seed = _arm(name), name.rsplit("-s", 1)[1]
        base = curves[run_name(FINETUNE + OFF if arm.startswith(FINETUNE) else OFF, int(seed))]
        last, off = curve[-1], curve[-1]["val_bpb_retrieval_off"]
        at_time = results["at_common_seconds"].get(name)
        rows.append([
            _label(arm), seed, last["step"], f"{last['train_seconds'] / 60:.1f} min",
            f"{results['tokens_per_s'][name]:,.0f}", f"{last['val_bpb']:.4f}",
            f"{last['val_bpb'] - base[-1]['val_bpb']:+.4f}",
            *([("-" if at_time is None else f"{at_time:.4f}")] if alone else []),
            "-" if off is None else f"{off:.4f}"])
    return table(["kNN memory per row", "seed", "steps", "training time", "tokens/s",
                  "val bits/byte", "vs none, same seed",
                  *([f"at equal time ({results['common_seconds'] / 60:.1f} min)"] if alone
                    else []),
                  "same model, retrieval off"], rows)


def _readings(results: dict) -> dict[str, dict[str, list[Reading]]]:
    """Per arm, per side (``on``/``off``), the seeds' readings in seed order."""
    arms: dict[str, dict[str, list[Reading]]] = {}
    for name, figures in results["by_history"].items():
        sides = arms.setdefault(_arm(name), {})
        for side, reading in figures.items():
            sides.setdefault(side, []).append(Reading.from_json(reading))
    return arms


def history_table(results: dict, arms: list[str], base_arm: str) -> str:
    """Final models' bits per byte by history length on whole validation documents, pooled over
    seeds, with the 95% intervals (bootstrap over documents) of each arm - ``base_arm``
    (pooled, then per seed) and of retrieval on - off; empty buckets left out."""
    readings = _readings(results)
    seeds = results["config"]["seeds"]
    edges = tuple(sorted(results["config"]["sizes"]))
    base_runs = readings[base_arm]["off"]
    base = pooled(base_runs)
    tokens = base_runs[0].tokens[:, 0]
    columns = [(name, bucket) for name, bucket in zip(["all", *bucket_names(edges)],
                                                      [None, *range(len(edges) + 1)])
               if (tokens if bucket is None else tokens[:, bucket]).sum()]
    rows = [[_label(base_arm)] + [f"{base.bpb(0, b):.4f}" for _, b in columns]]
    base_name = "none" if base_arm == OFF else "fine-tuned, none"
    for arm in arms:
        if arm == base_arm:
            continue
        name = _label(arm)
        on_runs = readings[arm]["on"]
        on, off = pooled(on_runs), pooled(readings[arm]["off"])
        rows.append([name] + [f"{on.bpb(0, b):.4f}" for _, b in columns])
        rows.append([f"{name} - {base_name}"]
                    + [str(difference(on, base, b)) for _, b in columns])
        if len(seeds) > 1:
            rows += [[f"{name} - {base_name}, seed {seed}"]
                     + [str(difference(run, base_run, b)) for _, b in columns]
                     for seed, run, base_run in zip(seeds, on_runs, base_runs)]
        rows.append([f"{name}, retrieval off"] + [f"{off.bpb(0, b):.4f}" for _, b in columns])
        rows.append([f"{name}, on - off"] + [str(difference(on, off, b)) for _, b in columns])
    rows.append(["tokens in bucket, per seed"] + [
        f"{int((tokens if b is None else tokens[:, b]).sum()):,}" for _, b in columns])
    return table([f"kNN memory per row / history (tokens), {len(seeds)} seed(s) pooled"]
                 + [n for n, _ in columns], rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = {}
    for name, curve in results["curves"].items():
        arm = _arm(name)
        if arm.startswith(FINETUNE):
            continue
        label = None if arm in colours else (
            "no kNN memory" if arm == OFF else f"kNN memory {int(arm):,}")
        for ax, x in zip(axes, ("step", "train_seconds")):
            xs = [p[x] / (60 if x == "train_seconds" else 1) for p in curve]
            line, = ax.plot(xs, [p["val_bpb"] for p in curve], marker="o", label=label,
                            color=colours.get(arm))
            colours[arm] = line.get_color()
            if arm != OFF:
                ax.plot(xs, [p["val_bpb_retrieval_off"] for p in curve], linestyle=":",
                        color=line.get_color(),
                        label=None if label is None else f"{label}, retrieval off")
        label = None
    axes[0].set(xlabel="step", ylabel="validation bits per byte")
    axes[1].set(xlabel="training wall time (min)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Memorizing Transformer in miniature: held-out standard-library packages")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    task = argparse.ArgumentParser(add_help=False)
    task.add_argument("--task", choices=("text", "recall"), default="text")
    known, argv = task.parse_known_args(argv)
    if known.task == "recall":
        from bench.recall_experiment import main as recall_main
        return recall_main(argv)
    d = ExperimentConfig()
    parser = argparse.ArgumentParser(prog="python -m bench.experiment", description=__doc__,
                                     allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--eval-batches", type=int, default=d.eval_batches)
    parser.add_argument("--sizes", type=token_counts, default=d.sizes,
                        help="kNN memory sizes, tokens per row (default 2048,8192,32768)")
    parser.add_argument("--seeds", type=token_counts, default=d.seeds,
                        help="one run of every arm per seed (default 0,1)")
    parser.add_argument("--finetune-steps", type=int, default=d.finetune_steps,
                        help="fine-tuning arms of this many steps from each seed's arm without "
                             "memory, with and without memory (default 0: none)")
    parser.add_argument("--finetune-size", type=int, default=d.finetune_size,
                        help="kNN memory of the fine-tuning arm with memory (default: the "
                             "largest of --sizes)")
    parser.add_argument("--jobs", type=int, default=d.jobs,
                        help="runs at once (default 1)")
    parser.add_argument("--eval-tokens", type=int, default=d.eval_tokens,
                        help="the final figures by history read whole validation documents "
                             "until at least this many tokens (default: all of them)")
    parser.add_argument("--memory", default=d.memory, help="remote (default) or inproc")
    parser.add_argument("--out", default=d.out)
    args, train_args = parser.parse_known_args(argv)
    try:
        config = ExperimentConfig(**vars(args), train_args=tuple(train_args))
        train_runs(Path(config.out), experiment_runs(config), eval_every=config.eval_every,
                   eval_batches=config.eval_batches, jobs=config.jobs,
                   after_training=lambda run: final_readings(
                       run, config, last_eval_step(read_log(run))))
        results = summarize(config)
    except (ValueError, RuntimeError, TrainError) as exc:
        print(f"bench.experiment: error: {exc}", file=sys.stderr)
        return 2
    lines = [results_table(results), "", history_table(results, config.arms, OFF)]
    if config.finetune_arms:
        lines += ["", history_table(results, config.finetune_arms, FINETUNE + OFF)]
    report(results, Path(config.out), plot, "validation.png",
           f"Runs {config.jobs} at a time; flags for every run: "
           f"{' '.join(config.train_args) or '(memtrans-train defaults)'}", lines)
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
