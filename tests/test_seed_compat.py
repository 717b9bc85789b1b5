"""Compatibility with memorizing-transformers-pytorch 0.4.1: its checkpoints load, logits agree."""

import pytest
import torch

from memtrans import MemorizingTransformer

seed = pytest.importorskip("memorizing_transformers_pytorch",
                           reason="install memorizing-transformers-pytorch==0.4.1 --no-deps")

CONFIG = dict(num_tokens=256, dim=64, dim_head=16, heads=4, depth=4, memorizing_layers=(2, 3),
              max_knn_memories=512, num_retrieved_memories=8)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    # The seed writes its memmap files under ./.tmp.
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _pair(**overrides):
    torch.manual_seed(0)
    theirs = seed.MemorizingTransformer(**{**CONFIG, **overrides}).eval()
    ours = MemorizingTransformer(**{**CONFIG, **overrides}).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def test_state_dict_names_and_shapes_match():
    ours, theirs = _pair()
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("overrides", [dict(memorizing_layers=()), {}],
                         ids=["memory disabled", "first segment, empty memories"])
def test_logits_equal(in_tmp, overrides):
    ours, theirs = _pair(**overrides)
    x = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        expected = theirs(x, knn_memories=theirs.create_knn_memories(batch_size=2))
        got = ours(x, knn_memories=ours.create_knn_memories(batch_size=2))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_loss_equal_with_labels_and_xl_memories(in_tmp):
    ours, theirs = _pair(xl_max_memories=16)
    x = torch.randint(0, 256, (2, 48))
    labels = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        expected, expected_xl = theirs(x, knn_memories=theirs.create_knn_memories(batch_size=2),
                                       labels=labels)
        got, got_xl = ours(x, knn_memories=ours.create_knn_memories(batch_size=2), labels=labels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_xl, expected_xl):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
