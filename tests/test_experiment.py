"""``bench.experiment`` end to end at toy size: every arm trains as a real ``memtrans-train``
process, the results, table and plot come out, and an interrupted experiment resumes."""

import json
import math
import shutil
import sysconfig
from pathlib import Path

import pytest

from bench.experiment import main

pytestmark = pytest.mark.timeout(240)

TOY = ["--dim", "32", "--depth", "2", "--heads", "2", "--dim-head", "16",
       "--memorizing-layers", "2", "--seq-len", "64", "--batch-size", "2", "--num-retrieved", "8",
       "--xl-max-memories", "64", "--log-every", "1", "--val-fraction", "0.25",
       "--documents", "file"]  # a flat directory of modules: one document each


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(p for p in stdlib.glob("*.py") if 2_000 < p.stat().st_size < 40_000)[:20]:
        shutil.copy(path, root / path.name)
    return root


def experiment(out: Path, corpus: Path, steps: int, *extra: str) -> int:
    return main(["--steps", str(steps), "--eval-every", "2", "--eval-batches", "4",
                 "--sizes", "64,128", "--memory", "inproc", "--out", str(out),
                 "--eval-tokens", "8000",
                 "--data", str(corpus), *TOY, *extra])


def test_interrupted_experiment_resumes_and_reports_every_run(corpus, tmp_path, capsys):
    out = tmp_path / "exp"
    assert experiment(out, corpus, 2, "--seeds", "0") == 0
    first = json.loads((out / "results.json").read_text())
    assert [p["step"] for p in first["curves"]["64-s0"]] == [2]

    # A longer experiment in the same directory continues each run from its checkpoint, adds
    # the runs of a second seed and the fine-tuning arms, two runs at a time.
    assert experiment(out, corpus, 4, "--seeds", "0,1", "--finetune-steps", "2",
                      "--jobs", "2") == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["curves"]) == ["off-s0", "64-s0", "128-s0", "off-s1", "64-s1", "128-s1",
                                       "ft-off-s0", "ft-128-s0", "ft-off-s1", "ft-128-s1"]
    for name, curve in results["curves"].items():
        if name.startswith("ft-"):
            assert [p["step"] for p in curve] == [2], name
            continue
        assert [p["step"] for p in curve] == [2, 4], name
        if name.endswith("-s0"):
            assert curve[0]["val_bpb"] == first["curves"][name][0]["val_bpb"], name
        assert 0 < curve[0]["train_seconds"] < curve[1]["train_seconds"], name
        assert all(math.isfinite(p["val_bpb"]) for p in curve), name
        if name.startswith("off"):
            assert all(p["val_bpb_retrieval_off"] is None for p in curve)
        else:  # 4 segments of 64 with a 64-token XL window: later segments retrieve something
            assert all(p["val_bpb"] != p["val_bpb_retrieval_off"] for p in curve), name
    # Seeds differ; the fine-tuning arms start from their seed's arm without memory.
    curves = results["curves"]
    assert curves["off-s0"][-1]["val_bpb"] != curves["off-s1"][-1]["val_bpb"]
    init = [r for r in map(json.loads, (out / "ft-128-s1" / "log.jsonl").read_text().splitlines())
            if r["kind"] == "init"]
    assert init and init[0]["init_from"] == str(out / "off-s1")
    assert (out / "ft-128-s1" / "train.log").exists()  # --jobs 2: each run's output in its dir
    # The by-history figures: per-document sums on the same whole validation documents (two
    # here: the first of the fixed order, then enough to reach --eval-tokens).
    readings = results["by_history"]
    assert set(readings["off-s0"]) == {"off"} and set(readings["ft-off-s1"]) == {"off"}
    documents = readings["off-s0"]["off"]["documents"]
    assert len(documents) == 2
    for name in ("64-s0", "128-s1", "ft-128-s0"):
        assert set(readings[name]) == {"on", "off"}
        for side in ("on", "off"):
            assert readings[name][side]["documents"] == documents
            assert readings[name][side]["tokens"] == readings["off-s0"]["off"]["tokens"]
    tokens = readings["off-s0"]["off"]["tokens"]  # (documents, passes, buckets 0-64, 64-128, >=128)
    assert [len(doc[0]) for doc in tokens] == [3, 3] and all(n > 0 for doc in tokens
                                                            for n in doc[0])
    assert (out / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| none (Transformer-XL) | 0 | 4 |" in printed and "| 128 tokens | 1 | 4 |" in printed
    assert "| fine-tuned, 128 tokens | 1 | 2 |" in printed
    assert "| 128 tokens, retrieval off |" in printed
    assert "| 128 tokens - none | " in printed and "| 128 tokens, on - off | " in printed
    assert "| 128 tokens - none, seed 1 | " in printed
    assert "| fine-tuned, 128 tokens - fine-tuned, none | " in printed
    assert ("| kNN memory per row / history (tokens), 2 seed(s) pooled | all | <64 | 64-128 "
            "| >=128 |") in printed

    # Finished runs are not trained again, nor read again.
    assert experiment(out, corpus, 4, "--seeds", "0,1", "--finetune-steps", "2") == 0
    assert capsys.readouterr().out.count("already finished") == 10
    assert (out / "128-s1" / "final_evaluation.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--sizes", "0"], "--sizes must be positive"),
    (["--eval-tokens", "0"], "--eval-tokens must be a positive"),
    (["--max-memories", "64"], "--max-memories is set per run"),
    (["--seed", "3"], "--seed is set per run"),
    (["--seeds", "1,1"], "--seeds must be distinct"),
    (["--dim", "-1"], "off-s0 failed (memtrans-train exited with 2)"),
])
def test_bad_input_stops_with_a_message(corpus, tmp_path, capsys, args, message):
    assert experiment(tmp_path / "exp", corpus, 2, *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
