"""``bench.experiment --task recall`` end to end at toy size: three arms train as real
``memtrans-train`` processes, then the leak control and memory-pressure evaluations, the tables
and the plot come out."""

import json

import pytest

from bench.experiment import main

pytestmark = pytest.mark.timeout(300)

TOY = ["--recall-bindings", "40", "--recall-distance", "256", "--seq-len", "64",
       "--xl-max-memories", "192", "--dim", "32", "--depth", "2", "--heads", "2",
       "--dim-head", "16", "--batch-size", "2", "--max-memories", "512", "--num-retrieved", "8",
       "--log-every", "1"]


def test_recall_experiment_reports_every_arm_the_leak_control_and_memory_pressure(tmp_path,
                                                                                    capsys):
    out = tmp_path / "recall"
    args = ["--task", "recall", "--steps", "2", "--eval-every", "1", "--eval-batches", "12",
            "--pressure", "512:2,1024:3", "--pressure-documents", "2", "--out", str(out), *TOY]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["curves"]) == ["none", "memory", "gate"]
    for arm, curve in results["curves"].items():
        assert [p["step"] for p in curve] == [1, 2], arm
        assert (curve[-1]["with_memory"] is None) == (arm == "none")
        assert curve[-1]["retrieval_off"]["memory_only_tokens"] > 0
    assert "gate" in results["curves"]["gate"][-1]["knn_layers"]["1"]
    for arm in ("memory", "gate"):
        leak = results["leak_control"][arm]
        # The same validation answers, read against another row's memory.
        assert leak["memory_only_tokens"] == \
            results["curves"][arm][-1]["with_memory"]["memory_only_tokens"]
    assert [(p["max_memories"], p["distance"]) for p in results["pressure"]] == \
        [(512, 384), (1024, 576)]
    assert all(p["memory_only_tokens"] > 0 for p in results["pressure"])
    assert (out / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| kNN memory (joint softmax), leak control |" in printed
    assert "| 1,024 | 576 (3x XL) |" in printed
    assert "Learned per head: memory layer 1: temperature" in printed

    assert main(args) == 0  # finished arms are kept
    assert capsys.readouterr().out.count("already finished") == 3


def test_flags_the_recall_experiment_sets_itself_are_refused(tmp_path, capsys):
    assert main(["--task", "recall", "--knn-combine", "gate", "--out", str(tmp_path)]) == 2
    assert "--knn-combine is set per arm" in capsys.readouterr().err
