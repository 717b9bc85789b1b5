"""The recall experiment: does the kNN memory decide answers that only it holds?

    python -m bench.experiment --task recall [--steps 2500] [--out runs/recall]
                                             [any memtrans-train flag, e.g. --recall-bindings 256]

Trains three arms on ``--data recall`` (``memtrans.recall``), one after another, the same model,
seed and documents: ``none`` (no memorizing layers: a Transformer-XL, with the query/key
convolutions where the memory arms have them), ``memory`` (kNN layers
where ``--memorizing-layers`` puts them, one softmax over memory and local keys) and ``gate``
(the same with the paper's gate). Then, on the final checkpoints, it evaluates on the validation
documents:

- each memory arm with retrieval on and off (the same model, its memories left empty);
- the **leak control**: each memory arm reading memories that another row's documents filled
  (adds go to the row's own memory, searches to the next row's): it must stay at chance;
- the **memory pressure** of the ``memory`` arm: documents whose bindings fill 1K, 4K and 16K
  memories per row, with memory-only queries 2x, 8x and 32x the XL window away (``--pressure``).

Writes ``<out>/<arm>/`` (each run), ``<out>/results.json``, ``<out>/recall.png`` (answer accuracy
against steps) and prints the README's tables. Run it again with the same ``--out`` to finish an
interrupted experiment: finished arms are kept, an unfinished one resumes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from bench.common import machine_line, table
from bench.experiment import read_log, report, run_arms
from memtrans.build import build_model, make_memories, open_corpus
from memtrans.checkpoint import CHECKPOINT, resolve_config
from memtrans.config import TrainConfig, build_parser
from memtrans.evaluation import EvalSettings, evaluate, other_rows
from memtrans.recall import CHANCE_ACCURACY, CHANCE_BITS, LINE, RecallCorpus, RecallTask

ARMS = ("none", "memory", "gate")
LABELS = {"none": "no memorizing layer", "memory": "kNN memory (joint softmax)",
          "gate": "kNN memory (gate)"}
FIXED = {"--data", "--memory", "--knn-combine", "--steps", "--eval-every", "--eval-batches",
         "--out", "--resume"}


@dataclass(kw_only=True, slots=True)
class RecallExperimentConfig:
    steps: int = 2500
    """Optimizer steps per arm."""
    eval_every: int = 250
    """Validate every this many steps (and at the end)."""
    eval_batches: int = 1000
    """Validation segments per evaluation; more than the validation documents hold: all."""
    memory: str = "inproc"
    """Where the memory arms keep their memory: ``inproc`` or ``remote`` (a local server)."""
    pressure: tuple[tuple[int, int], ...] = ((1024, 2), (4096, 8), (16384, 32))
    """(kNN memories per row, memory-only distance in XL windows) for the pressure evaluation."""
    pressure_documents: int | None = None
    """Validation documents per pressure setting; None: one per batch row of the arm."""
    out: str = "runs/recall"
    train_args: tuple[str, ...] = ()
    """Further ``memtrans-train`` flags, the same for every arm."""

    def __post_init__(self):
        for name in ("steps", "eval_every", "eval_batches", "pressure_documents"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got "
                                 f"{getattr(self, name)}")
        if self.memory not in ("remote", "inproc"):
            raise ValueError(f"--memory must be remote or inproc, got {self.memory!r}")
        clash = sorted(FIXED & {arg.split("=")[0] for arg in self.train_args})
        if clash:
            raise ValueError(f"{', '.join(clash)} is set per arm by the recall experiment")

    def arm_flags(self) -> dict[str, list[str]]:
        common = ["--data", "recall", *self.train_args]
        memory_arm = TrainConfig(**vars(build_parser().parse_args(common)))
        # The no-memory arm keeps the memory arms' query/key convolutions, where they have them.
        layers = (memory_arm.memorizing_layers if memory_arm.qk_conv_layers is None
                  else memory_arm.qk_conv_layers)
        convs = ["--qk-conv-layers", ",".join(map(str, layers))]
        return {"none": ["--memory", "off", *common, "--memorizing-layers", "", *convs],
                "memory": ["--memory", self.memory, *common],
                "gate": ["--memory", self.memory, "--knn-combine", "gate", *common]}


def _load(run: Path):
    checkpoint = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=True)
    config = resolve_config({}, checkpoint, run / CHECKPOINT)
    model = build_model(config)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), config


def _settings(config, segments: int) -> EvalSettings:
    return EvalSettings(batch_size=config.batch_size, seq_len=config.seq_len, segments=segments)


def leak_control(run: Path, segments: int) -> dict:
    """A memory arm's final model reading memories filled from another row's documents."""
    model, config = _load(run)
    memories = make_memories(model, config, None)
    try:
        return evaluate(model, open_corpus(config), _settings(config, segments),
                        other_rows(memories), retrieval=True, recall=True)
    finally:
        memories.cleanup()


def pressure(run: Path, settings: tuple[tuple[int, int], ...],
             documents: int | None) -> list[dict]:
    """The final model on documents whose bindings fill ``max_memories`` per row, with
    memory-only queries ``windows`` XL windows away: twice as many tokens as the memory holds
    plus the distance, so most queries search a full memory."""
    model, config = _load(run)
    rows = []
    for max_memories, windows in settings:
        distance = windows * config.xl_max_memories
        task = RecallTask(bindings=(2 * max_memories + distance) // (2 * LINE), distance=distance,
                          in_context_fraction=config.recall_in_context_fraction,
                          val_documents=documents or config.batch_size)
        task.check_window(config.seq_len, config.xl_max_memories)
        sized = replace(config, max_memories=max_memories)
        memories = make_memories(model, sized, None)
        try:
            figures = evaluate(model, RecallCorpus.create(task), _settings(config, 10**9),
                               memories, retrieval=True, recall=True)
        finally:
            memories.cleanup()
        rows.append({"max_memories": max_memories, "distance": distance,
                     "xl_windows": distance / config.xl_max_memories,
                     "bindings": task.bindings, **figures})
    return rows


def summarize(config: RecallExperimentConfig) -> dict:
    out = Path(config.out)
    curves, final = {}, {}
    for arm in ARMS:
        evals = {r["step"]: r for r in read_log(out / arm) if r["kind"] == "eval"}
        if not evals:
            raise RuntimeError(f"no evaluations logged for arm {arm} in {out}")
        curves[arm] = [{"step": step, "train_seconds": r["train_seconds"],
                        "with_memory": r.get("recall_memory"),
                        "retrieval_off": r["recall_no_memory"], "knn_layers": r.get("knn_layers")}
                       for step, r in sorted(evals.items())]
        final[arm] = curves[arm][-1]
    leaks = {arm: leak_control(out / arm, config.eval_batches) for arm in ("memory", "gate")}
    return {"config": asdict(config), "machine": machine_line(), "curves": curves,
            "leak_control": leaks,
            "pressure": pressure(out / "memory", config.pressure, config.pressure_documents),
            "chance": {"accuracy": CHANCE_ACCURACY, "bits": CHANCE_BITS}}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _bits(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _layer_figure(figures: dict, name: str, as_pct: bool = True) -> str:
    values = [v for k, v in figures.items() if k.startswith(name) and v is not None]
    if not values:
        return "-"
    return _pct(max(values)) if as_pct else f"{max(values):.3f}"


def _row(label: str, figures: dict, minutes: str, steps) -> list:
    return [label, steps, minutes, _pct(figures["in_context_accuracy"]),
            _bits(figures["in_context_bits"]), _pct(figures["memory_only_accuracy"]),
            _bits(figures["memory_only_bits"]), _layer_figure(figures, "hit_rate_layer"),
            _layer_figure(figures, "binding_attention_layer", as_pct=False)]


def results_table(results: dict) -> str:
    rows = []
    for arm in ARMS:
        last = results["curves"][arm][-1]
        minutes, steps = f"{last['train_seconds'] / 60:.1f} min", last["step"]
        if last["with_memory"] is not None:
            rows.append(_row(LABELS[arm], last["with_memory"], minutes, steps))
            rows.append(_row(f"{LABELS[arm]}, retrieval off", last["retrieval_off"], "", ""))
            rows.append(_row(f"{LABELS[arm]}, leak control", results["leak_control"][arm], "", ""))
        else:
            rows.append(_row(LABELS[arm], last["retrieval_off"], minutes, steps))
    chance = results["chance"]
    rows.append(["chance", "", "", _pct(chance["accuracy"]), _bits(chance["bits"]),
                 _pct(chance["accuracy"]), _bits(chance["bits"]), "", ""])
    return table(["arm", "steps", "training time", "in-context accuracy", "bits/answer token",
                  "memory-only accuracy", "bits/answer token", "hit rate",
                  "attention on binding"], rows)


def pressure_table(results: dict) -> str:
    rows = [[f"{p['max_memories']:,}", f"{p['distance']:,} ({p['xl_windows']:g}x XL)",
             f"{p['memory_only_tokens']:,}", _pct(p["memory_only_accuracy"]),
             _bits(p["memory_only_bits"]), _layer_figure(p, "hit_rate_layer"),
             _layer_figure(p, "binding_attention_layer", as_pct=False),
             _pct(p["in_context_accuracy"])] for p in results["pressure"]]
    return table(["kNN memories per row", "memory-only distance (tokens)", "answer tokens",
                  "memory-only accuracy", "bits/answer token", "hit rate",
                  "attention on binding", "in-context accuracy"], rows)


def gates_line(results: dict) -> str:
    parts = []
    for arm in ("memory", "gate"):
        layers = results["curves"][arm][-1]["knn_layers"] or {}
        for number, p in layers.items():
            text = f"{arm} layer {number}: temperature {', '.join(f'{t:.1f}' for t in p['temperature'])}"
            if "gate" in p:
                text += f"; gate {', '.join(f'{g:.2f}' for g in p['gate'])}"
            parts.append(text)
    return "Learned per head: " + " | ".join(parts)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for kind, ax in zip(("memory_only", "in_context"), axes):
        for arm in ARMS:
            curve = results["curves"][arm]
            steps = [p["step"] for p in curve]
            source = "retrieval_off" if arm == "none" else "with_memory"
            line, = ax.plot(steps, [100 * (p[source] or {}).get(f"{kind}_accuracy", 0)
                                    for p in curve], marker="o", label=LABELS[arm])
            if arm != "none":
                ax.plot(steps, [100 * p["retrieval_off"][f"{kind}_accuracy"] for p in curve],
                        linestyle=":", color=line.get_color(), label=f"{LABELS[arm]}, retrieval off")
        ax.axhline(100 * results["chance"]["accuracy"], color="grey", linewidth=0.8,
                   label="chance")
        ax.set(xlabel="step", title=f"{kind.replace('_', '-')} queries")
    axes[0].set(ylabel="answer accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Recall task: answers that only the kNN memory holds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pressure(text: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple(tuple(int(v) for v in part.split(":")) for part in text.split(",") if part)
    except ValueError:
        pairs = ()
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected MEMORIES:XL_WINDOWS pairs like "
                                         f"1024:2,4096:8, got {text!r}")
    return pairs


def main(argv: list[str] | None = None) -> int:
    d = RecallExperimentConfig()
    parser = argparse.ArgumentParser(prog="python -m bench.experiment --task recall",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=d.steps)
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--eval-batches", type=int, default=d.eval_batches)
    parser.add_argument("--memory", default=d.memory, help="inproc (default) or remote")
    parser.add_argument("--pressure", type=_pressure, default=d.pressure,
                        help="memory-pressure settings MEMORIES:XL_WINDOWS,... (default "
                             "1024:2,4096:8,16384:32)")
    parser.add_argument("--pressure-documents", type=int, default=d.pressure_documents)
    parser.add_argument("--out", default=d.out)
    args, train_args = parser.parse_known_args(argv)
    try:
        config = RecallExperimentConfig(**vars(args), train_args=tuple(train_args))
        run_arms(Path(config.out), config.arm_flags(), steps=config.steps,
                 eval_every=config.eval_every, eval_batches=config.eval_batches)
        results = summarize(config)
    except (ValueError, RuntimeError) as exc:
        print(f"bench.experiment: error: {exc}", file=sys.stderr)
        return 2
    report(results, Path(config.out), plot, "recall.png",
           f"Arms trained one after another; flags for every arm: --data recall "
           f"{' '.join(config.train_args)}",
           [results_table(results), "", pressure_table(results), gates_line(results)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
