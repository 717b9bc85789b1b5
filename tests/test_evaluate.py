"""``memtrans.evaluate`` and ``memtrans.bootstrap``: intervals that cover a known difference and
narrow with more documents, whole-document reads whose history buckets add up to the whole, the
repeat probe's plumbing on a real (barely trained) checkpoint, and the command's table."""

import json
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from memtrans.bootstrap import bpb_difference
from memtrans.build import build_model, make_memories, open_corpus
from memtrans.checkpoint import load_checkpoint, resolve_config
from memtrans.config import TrainError
from memtrans.evaluate import (EvaluationSettings, bucket_names, choose_documents, difference,
                               evaluate_run, main, read)

pytestmark = pytest.mark.timeout(240)

TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--dim-head", "16",
        "--memorizing-layers", "2", "--seq-len", "64", "--batch-size", "2", "--max-memories", "4096",
        "--num-retrieved", "8", "--xl-max-memories", "64", "--warmup-steps", "0",
        "--eval-batches", "2", "--val-fraction", "0.25",
        "--documents", "file"]  # a flat directory of modules: one document each
EDGES = (64, 256, 1024)


def synthetic(documents: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per-document sums where side a costs ``0.1 * ln 2`` nats a token more than side b on
    average (0.1 bits), with document-level and token-level noise."""
    tokens = rng.integers(200, 5000, documents).astype(float)
    level = rng.uniform(1, 3, documents)  # documents differ a lot in difficulty
    nats_b = level * tokens + rng.normal(0, 1, documents) * np.sqrt(tokens)
    gain = 0.1 * math.log(2) + rng.normal(0, 0.05, documents)
    return nats_b + gain * tokens, nats_b, tokens, 0.1


def test_the_interval_covers_a_known_difference_and_narrows_with_more_documents():
    rng = np.random.default_rng(1)
    widths = []
    for documents in (20, 80, 320):
        a, b, tokens, truth = synthetic(documents, rng)
        interval = bpb_difference(a, b, tokens)
        assert interval.low < truth < interval.high, (documents, interval)
        assert interval.low < interval.estimate < interval.high
        assert interval.documents == documents and interval.excludes_zero()
        widths.append(interval.high - interval.low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] > 2  # about sqrt(16) = 4


def test_the_interval_is_fixed_by_its_seed_and_leaves_out_empty_documents():
    a, b, tokens, _ = synthetic(30, np.random.default_rng(2))
    assert bpb_difference(a, b, tokens) == bpb_difference(a, b, tokens)
    assert bpb_difference(a, b, tokens, seed=1) != bpb_difference(a, b, tokens)
    padded = [np.append(v, 0.0) for v in (a, b, tokens)]
    assert bpb_difference(*padded) == bpb_difference(a, b, tokens)
    assert math.isnan(bpb_difference([0.0], [0.0], [0]).estimate)
    with pytest.raises(ValueError, match="one sum per document"):
        bpb_difference(a, b[:-1], tokens)


def test_bucket_names():
    assert bucket_names((2048, 8192, 32768)) == ["<2K", "2K-8K", "8K-32K", ">=32K"]
    assert bucket_names(EDGES) == ["<64", "64-256", "256-1K", ">=1K"]


def test_bad_settings_are_refused():
    with pytest.raises(TrainError, match="--tokens must be a positive"):
        EvaluationSettings(tokens=0)
    with pytest.raises(TrainError, match="edges must be increasing"):
        EvaluationSettings(edges=(8192, 2048))
    with pytest.raises(TrainError, match="--max-memories must be a positive"):
        EvaluationSettings(max_memories=0)
    with pytest.raises(TrainError, match="--compare-index must be one of flat, hnsw, ivf"):
        EvaluationSettings(compare_index="annoy")
    with pytest.raises(TrainError, match="--num-retrieved must be a positive"):
        EvaluationSettings(num_retrieved=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A memory model trained for two steps on 30 small standard-library files (a read of a
    few thousand tokens takes seconds on a busy machine)."""
    root = tmp_path_factory.mktemp("evaluate")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(p for p in stdlib.glob("*.py") if 1_500 < p.stat().st_size < 4_000)[:30]:
        shutil.copy(path, corpus / path.name)
    out = root / "run"
    result = subprocess.run([sys.executable, "-m", "memtrans.train", "--steps", "2", "--memory",
                             "inproc", "--data", str(corpus), "--out", str(out), *TINY],
                            capture_output=True, text=True, timeout=200)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def loaded(run):
    path, state = load_checkpoint(str(run))
    config = resolve_config({}, state, path)
    model = build_model(config)
    model.load_state_dict(state["model"])
    documents = choose_documents(open_corpus(config).val, 6_000)
    return config, model, documents


def test_reads_whole_documents_and_the_buckets_add_up(loaded):
    config, model, documents = loaded
    assert sum(len(ids) - 1 for _, ids in documents[:-1]) < 6_000
    assert sum(len(ids) - 1 for _, ids in documents) >= 6_000
    memories = make_memories(model, config, None)
    try:
        reading = read(model, documents, memories, retrieval=True, batch_size=2,
                       seq_len=config.seq_len, edges=EDGES)
    finally:
        memories.cleanup()
    assert reading.documents == tuple(name for name, _ in documents)
    assert reading.tokens.shape == (len(documents), 1, len(EDGES) + 1)
    # Every scored token is in exactly one bucket; a document of n tokens has n - 1 scored.
    assert reading.tokens.sum(-1)[:, 0].tolist() == [len(ids) - 1 for _, ids in documents]
    assert reading.tokens[:, 0, 0].tolist() == [min(64, len(ids) - 1) for _, ids in documents]
    assert (reading.tokens[:, 0, 1:].sum(0) > 0).all()  # the test documents reach every bucket
    total = reading.nats.sum() / reading.tokens.sum() / math.log(2)
    assert reading.bpb() == pytest.approx(total)
    by_bucket = [reading.bpb(0, b) * reading.tokens[:, 0, b].sum() for b in range(len(EDGES) + 1)]
    assert sum(by_bucket) / reading.tokens.sum() == pytest.approx(reading.bpb())


def test_repeat_probe_plumbing(loaded):
    """An untrained model cannot copy, so only the plumbing is tested: the first pass is a
    single read; with retrieval off the second pass is a fresh read (neither memory holds the
    first pass); with retrieval on it differs (it retrieves the first pass)."""
    config, model, documents = loaded
    documents = sorted(documents, key=lambda d: len(d[1]))[:2]
    memories = make_memories(model, config, None)
    kwargs = dict(batch_size=2, seq_len=config.seq_len, edges=EDGES)
    try:
        once_on = read(model, documents, memories, retrieval=True, **kwargs)
        once_off = read(model, documents, memories, retrieval=False, **kwargs)
        twice_on = read(model, documents, memories, retrieval=True, passes=2, **kwargs)
        twice_off = read(model, documents, memories, retrieval=False, passes=2, **kwargs)
    finally:
        memories.cleanup()
    for twice in (twice_on, twice_off):
        assert np.array_equal(twice.tokens[:, 0], twice.tokens[:, 1])
        assert np.array_equal(twice.tokens[:, :1], once_on.tokens)
    np.testing.assert_allclose(twice_on.nats[:, 0], once_on.nats[:, 0], rtol=1e-5)
    np.testing.assert_allclose(twice_off.nats[:, 1], once_off.nats[:, 0], rtol=1e-5)
    np.testing.assert_allclose(twice_off.nats[:, 0], once_off.nats[:, 0], rtol=1e-5)
    assert abs(twice_on.bpb(1) - twice_on.bpb(0)) > 1e-4
    interval = difference(twice_on, once_off, pass_a=1)
    assert interval.estimate == pytest.approx(twice_on.bpb(1) - once_off.bpb(0))
    assert interval.documents == 2


def test_evaluate_run_and_difference_against_another_checkpoint(run):
    settings = EvaluationSettings(tokens=3_000, repeat=True, edges=EDGES)
    result = evaluate_run(str(run), settings)
    readings = result["readings"]
    assert set(readings) == {"on", "off", "repeat"}
    np.testing.assert_array_equal(readings["on"].nats[:, 0], readings["repeat"].nats[:, 0])
    assert np.array_equal(readings["on"].tokens, readings["off"].tokens)
    # The same checkpoint against itself: no difference, no width.
    same = difference(readings["on"], readings["on"])
    assert (same.estimate, same.low, same.high) == (0, 0, 0)
    one_more = int(readings["on"].tokens.sum()) + 1  # takes one more document
    other = evaluate_run(str(run), EvaluationSettings(tokens=one_more, edges=EDGES))
    assert len(other["readings"]["on"].documents) == len(readings["on"].documents) + 1
    with pytest.raises(TrainError, match="different documents"):
        difference(other["readings"]["on"], readings["on"])


def test_command_prints_the_tables_and_writes_the_sums(run, tmp_path, capsys):
    out = tmp_path / "sums.json"
    assert main([str(run), str(run / "checkpoint.pt"), "--tokens", "2000", "--repeat",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "validation documents" in printed and "1000 bootstrap resamples" in printed
    assert "(4,096 kNN memories, flat, top 8), retrieval on |" in printed
    assert ": on - off |" in printed and "repeat probe (retrieval on)" in printed
    assert "| documents |" in printed
    saved = json.loads(out.read_text())
    assert len(saved) == 2 and set(saved[0]["readings"]) == {"on", "off", "repeat"}
    assert np.array(saved[0]["readings"]["repeat"]["tokens"]).shape[1] == 2
    assert "where the chain breaks" in printed and "second pass: aligned entry retrieved" in printed
    counted = np.array(saved[0]["trace"]["counted"])  # documents, passes, layers, heads, buckets
    assert saved[0]["trace"]["layers"] == [2] and counted.shape[1:4] == (2, 1, 2)
    assert (counted.sum(-1)[:, 0] > counted.sum(-1)[:, 1]).all()  # XL's tail left out


def test_command_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "Traceback" not in err
    assert main([str(tmp_path), "--tokens", "-5"]) == 2
    assert "--tokens must be a positive" in capsys.readouterr().err


def test_overrides_that_clash_with_the_checkpoint_are_one_line_errors(run, capsys):
    # The run retrieves 8: a memory of 4 cannot serve that, nor can 8 exceed a memory of 4.
    assert main([str(run), "--max-memories", "4"]) == 2
    err = capsys.readouterr().err
    assert "num_retrieved (8) cannot exceed max_memories (4)" in err and "Traceback" not in err
    assert main([str(run), "--num-retrieved", "64", "--max-memories", "32"]) == 2
    assert "num_retrieved (64) cannot exceed" in capsys.readouterr().err


def test_reading_time_memory_settings_and_a_second_index(run, capsys):
    """--max-memories, --index and --num-retrieved override the checkpoint's kNN settings for the
    reading only; --compare-index reads again through another index, on the same documents. A
    memory too small to hold a segment's history retrieves less, and fewer retrieved entries
    share the attention differently, so both read differently."""
    settings = EvaluationSettings(tokens=2_000, edges=EDGES, compare_index="ivf")
    result = evaluate_run(str(run), settings)
    readings = result["readings"]
    assert set(readings) == {"on", "off", "on-ivf"}
    assert np.array_equal(readings["on-ivf"].tokens, readings["on"].tokens)
    # Before an ivf memory holds enough keys to train it searches exactly: the same figures.
    np.testing.assert_allclose(readings["on-ivf"].nats, readings["on"].nats, rtol=1e-4)
    small = evaluate_run(str(run), EvaluationSettings(tokens=2_000, edges=EDGES, max_memories=64,
                                                      index="ivf"))
    assert small["config"]["max_memories"] == 64 and small["config"]["index"] == "ivf"
    assert small["readings"]["on"].bpb() != pytest.approx(readings["on"].bpb(), abs=1e-6)
    fewer = evaluate_run(str(run), EvaluationSettings(tokens=2_000, edges=EDGES, num_retrieved=4))
    assert fewer["config"]["num_retrieved"] == 4 and result["config"]["num_retrieved"] == 8
    assert fewer["readings"]["on"].bpb() != pytest.approx(readings["on"].bpb(), abs=1e-6)
    np.testing.assert_allclose(fewer["readings"]["off"].nats, readings["off"].nats, rtol=1e-5)
    assert main([str(run), "--tokens", "2000", "--compare-index", "ivf",
                 "--edges", "64,256,1024"]) == 0
    printed = capsys.readouterr().out
    assert ", retrieval on with ivf |" in printed and ": ivf - flat |" in printed
