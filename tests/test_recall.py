"""The recall task: its documents hold what they claim, and its evaluation's figures add up."""

import re

import numpy as np
import pytest
import torch

from memtrans import MemorizingTransformer
from memtrans.data import CorpusError, decode
from memtrans.evaluation import EvalSettings, RecallProbe, evaluate, other_rows
from memtrans.memory import KNNMemoryList
from memtrans.recall import (IN_CONTEXT, KEY_LETTERS, LINE, MEMORY_ONLY, VALUE_LETTERS,
                             VALUE_START, RecallCorpus, RecallDocument, RecallTask)

SEQ, XL = 256, 256


def lines_of(doc: RecallDocument) -> list[str]:
    return decode(doc.tokens()).decode().splitlines()


@pytest.mark.parametrize("task", [RecallTask(), RecallTask(bindings=300, distance=2048)])
def test_an_oracle_that_looks_bindings_up_answers_every_query(task):
    for index in range(3):
        doc = RecallDocument(task, 1, index)
        tokens, answers = doc.build()
        lines = lines_of(doc)
        assert all(re.fullmatch(r"[=?][a-z]{%d}[A-Z]{%d}" % (KEY_LETTERS, VALUE_LETTERS), l)
                   for l in lines)
        seen, queried, oracle_answers = {}, set(), []
        for number, line in enumerate(lines):
            key, value = line[1:1 + KEY_LETTERS], line[1 + KEY_LETTERS:]
            assert (line[0] == "?") == (key in seen)
            if key in seen:  # a query: the oracle answers with the binding's value
                assert key not in queried, "a key is queried at most once"
                queried.add(key)
                oracle_answers.append((number, seen[key]))
                assert value == seen[key]
            else:
                seen[key] = value
        # Answers name exactly the value tokens of the query lines, and their sources hold them.
        expected = sorted(1 + n * LINE + VALUE_START + j for n, _ in oracle_answers
                          for j in range(VALUE_LETTERS))
        assert sorted(answers.positions.tolist()) == expected
        assert (tokens[answers.positions] == tokens[answers.sources]).all()
        assert (answers.sources < answers.positions).all()
        assert set(answers.kinds.tolist()) == {IN_CONTEXT, MEMORY_ONLY}


@pytest.mark.parametrize("seq_len, xl", [(256, 256), (128, 384), (64, 192)])
def test_memory_only_bindings_are_never_in_the_local_and_xl_window(seq_len, xl):
    """Documents start at a segment boundary; the token at input position t sees positions from
    (t // seq_len) * seq_len - xl. A memory-only binding's whole line is before that for the
    inputs that predict its answer tokens; an in-context binding's whole line is after it."""
    task = RecallTask(distance=seq_len + xl)
    task.check_window(seq_len, xl)
    for index in range(5):
        answers = RecallDocument(task, 0, index).answers()
        t = answers.positions - 1                    # the input that predicts each answer
        window_start = (t // seq_len) * seq_len - xl
        first = answers.sources - (answers.sources - 1) % LINE  # the binding line's first token
        last = first + LINE - 1
        memory_only = answers.kinds == MEMORY_ONLY
        assert memory_only.sum() > 20
        assert (last[memory_only] < window_start[memory_only]).all()
        assert (first[~memory_only] >= window_start[~memory_only]).all()


def test_documents_are_deterministic_and_validation_is_another_seed():
    corpus = RecallCorpus.create(RecallTask(train_documents=10, val_documents=4))
    again = RecallCorpus.create(RecallTask(train_documents=10, val_documents=4))
    assert np.array_equal(corpus.train[3].tokens(), again.train[3].tokens())
    train_keys = {l[1:1 + KEY_LETTERS] for d in corpus.train for l in lines_of(d)}
    val_keys = {l[1:1 + KEY_LETTERS] for d in corpus.val for l in lines_of(d)}
    assert not np.array_equal(corpus.train[0].tokens()[:50], corpus.val[0].tokens()[:50])
    assert len(val_keys - train_keys) > 0  # fresh bindings, not a reshuffle of training ones


def test_window_and_size_errors_say_what_to_do():
    with pytest.raises(CorpusError, match=r"inside the model's local \+ XL window.*>= 512"):
        RecallTask(distance=300).check_window(256, 256)
    with pytest.raises(CorpusError, match="--xl-max-memories >= 121"):
        RecallTask().check_window(64, 100)
    with pytest.raises(CorpusError, match="bindings must be a positive integer"):
        RecallTask(bindings=0)


# evaluation

SMALL = dict(num_tokens=259, dim=32, dim_head=16, heads=2, depth=2, memorizing_layers=(2,),
             max_knn_memories=512, num_retrieved_memories=8, xl_max_memories=64)
TASK = RecallTask(bindings=40, distance=128, in_context_span=48, val_documents=4)


def small_model():
    torch.manual_seed(0)
    return MemorizingTransformer(**SMALL).eval()


def memories_for(model, rows=2):
    return KNNMemoryList.create_memories(batch_size=rows, num_memory_layers=1)(
        dim=16, max_memories=512, multiprocessing=False)


def test_evaluation_counts_every_answer_token_once_and_its_bpb_is_the_loss():
    model, corpus = small_model(), RecallCorpus.create(TASK)
    settings = EvalSettings(batch_size=2, seq_len=64, segments=10**6)
    memories = memories_for(model)
    figures = evaluate(model, corpus, settings, memories, retrieval=True, recall=True)
    kinds = np.concatenate([d.answers().kinds for d in corpus.val])
    assert figures["in_context_tokens"] == (kinds == IN_CONTEXT).sum()
    assert figures["memory_only_tokens"] == (kinds == MEMORY_ONLY).sum()
    for key in ("in_context_accuracy", "memory_only_accuracy", "hit_rate_layer2"):
        assert 0 <= figures[key] <= 1
    # bpb is the mean loss over every labelled token, as the trainer computes it.
    plain = evaluate(model, corpus, settings, memories, retrieval=True)
    assert plain["bpb"] == pytest.approx(figures["bpb"], rel=1e-6)
    off = evaluate(model, corpus, settings, memories, retrieval=False, recall=True)
    assert off["hit_rate_layer2"] == 0 and off["binding_attention_layer2"] == 0
    memories.cleanup()


def test_hits_are_the_binding_entries_among_the_retrieved():
    model = small_model()
    probe = RecallProbe(model)
    attn = probe.layers[0][1]
    target = torch.nn.functional.normalize(torch.randn(16), dim=0)
    other = torch.nn.functional.normalize(torch.randn(16), dim=0)
    mem_keys = torch.stack((torch.zeros(16), other, target))   # entry 0 is "no memory"
    positions = torch.tensor([[[1, 2], [1, 1]], [[1, 1], [0, 0]]]).view(1, 2, 2, 2)  # (b,h,n,k)
    mem_attn = torch.tensor([[[0.25, 0.5], [0.5, 0.5]], [[0.1, 0.1], [0.0, 0.0]]]).view(1, 2, 2, 2)
    call = dict(positions=positions, mem_keys=mem_keys, mem_attn=mem_attn)
    probe._hits(2, attn, {100: target, 101: other}, call, 0, np.array([0, 1]),
                np.array([100, 7]))
    # Query 0: head 0 retrieved the target at its 2nd slot (weight 0.5); query 1's binding key
    # was never seen, so it cannot count.
    assert probe.sums["hits_layer2"] == 1
    assert probe.sums["binding_attention_layer2"] == pytest.approx(0.5)


def test_the_leak_control_searches_the_next_rows_memory_and_adds_to_its_own():
    memories = KNNMemoryList.create_memories(batch_size=2, num_memory_layers=1)(
        dim=4, max_memories=16, multiprocessing=False)
    keys = torch.nn.functional.normalize(torch.randn(2, 1, 4), dim=-1)  # one per row
    crossed = other_rows(memories)[0]
    crossed.add(torch.stack((keys, keys), dim=2))  # goes to each row's own memory
    own = memories[0].retrieved(memories[0].search_async(keys, 1))
    torch.testing.assert_close(own.keys[own.positions.reshape(-1).long()], keys[:, 0])
    # Each row, searching with its own key, finds the only entry of the other row's memory.
    retrieval = crossed.retrieved(crossed.search_async(keys, 1))
    got = retrieval.keys[retrieval.positions.reshape(-1).long()]
    torch.testing.assert_close(got, keys[[1, 0], 0])
    assert memories[0].scoped_indices == [0, 1]
    assert memories.backend.store.stats()["entries"] == 2
    memories.cleanup()
