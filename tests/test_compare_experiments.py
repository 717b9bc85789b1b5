"""``bench.compare_experiments``: pooled per-arm differences between two experiments from their
saved per-document sums, on all tokens and from a history edge; mismatches refused."""

import json
import math

import numpy as np
import pytest

from bench.compare_experiments import main


def write_experiment(out, sizes, edges, cost):
    """An experiment directory as ``bench.experiment`` leaves it: 3 documents of 300 scored
    tokens in history buckets at ``edges``, each token costing ``cost[arm]`` nats."""
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"config": {"seeds": [0, 1], "sizes": sizes}}))
    for arm in ["off", *map(str, sizes)]:
        side = "off" if arm == "off" else "on"
        for seed in (0, 1):
            per_bucket = np.bincount(np.searchsorted(edges, np.arange(300), side="right"),
                                     minlength=len(edges) + 1)
            tokens = np.tile(per_bucket, (3, 1, 1))
            reading = {"documents": ["a", "b", "c"], "nats": (tokens * cost[arm]).tolist(),
                       "tokens": tokens.tolist()}
            run = out / f"{arm}-s{seed}"
            run.mkdir()
            (run / "final_evaluation.json").write_text(json.dumps(
                {"key": {"edges": edges}, "readings": {side: reading}}))


def test_pooled_differences_per_arm(tmp_path, capsys):
    write_experiment(tmp_path / "a", [64, 128], [64, 128], {"off": 2.0, "64": 1.5, "128": 1.0})
    write_experiment(tmp_path / "b", [128], [128], {"off": 2.0, "128": 2.0})
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--from", "128"]) == 0
    printed = capsys.readouterr().out
    ln2 = math.log(2)
    assert f"| none | all | {2 / ln2:.4f} | {2 / ln2:.4f} | +0.0000 [+0.0000, +0.0000] |" in printed
    assert (f"| 128 tokens | >=128 | {1 / ln2:.4f} | {2 / ln2:.4f} | {-1 / ln2:+.4f} "
            f"[{-1 / ln2:+.4f}, {-1 / ln2:+.4f}] |") in printed
    assert "64 tokens" not in printed  # only arms both experiments have


def test_an_edge_one_experiment_lacks_is_refused(tmp_path, capsys):
    write_experiment(tmp_path / "a", [64], [64], {"off": 2.0, "64": 1.0})
    write_experiment(tmp_path / "b", [64], [32, 64], {"off": 2.0, "64": 1.0})
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--from", "32"]) == 2
    assert "not at 32" in capsys.readouterr().err
    assert main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert "No such file" in capsys.readouterr().err


@pytest.mark.parametrize("history", ["0", "64"])
def test_different_documents_are_refused(tmp_path, capsys, history):
    write_experiment(tmp_path / "a", [64], [64], {"off": 2.0, "64": 1.0})
    write_experiment(tmp_path / "b", [64], [64], {"off": 2.0, "64": 1.0})
    path = tmp_path / "b" / "off-s0" / "final_evaluation.json"
    saved = json.loads(path.read_text())
    saved["readings"]["off"]["documents"] = ["a", "b", "d"]
    path.write_text(json.dumps(saved))
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--from", history]) == 2
    assert "different" in capsys.readouterr().err
