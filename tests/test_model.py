"""The model: shapes, causality, gradients, memory semantics, and each seed bug that was fixed."""

import pytest
import torch

from memtrans import MemorizingTransformer
from memtrans.model import T5RelativePositionBias, _GatherDot

SMALL = dict(num_tokens=64, dim=32, dim_head=8, heads=2, depth=3, memorizing_layers=(2,),
             max_knn_memories=256, num_retrieved_memories=4)


def model_of(**overrides):
    torch.manual_seed(0)
    return MemorizingTransformer(**{**SMALL, **overrides}).eval()


def entries(memories):
    return memories.backend.store.stats()["entries"]


def test_shapes_and_returns():
    model = model_of(xl_max_memories=8)
    memories = model.create_knn_memories(batch_size=3)
    x = torch.randint(3, 64, (3, 20))
    logits, xl = model(x, knn_memories=memories)
    assert logits.shape == (3, 20, 64)
    assert len(xl) == 3 and all(m.shape == (3, 8, 2, 8) for m in xl)
    loss, _ = model(x, knn_memories=memories, labels=x, xl_memories=xl)
    assert loss.ndim == 0 and torch.isfinite(loss)
    plain = model_of()
    assert plain(x, knn_memories=plain.create_knn_memories(batch_size=3)).shape == (3, 20, 64)


@pytest.mark.parametrize("smear_keys, qk_conv", [(False, 0), (True, 0), (False, 3)])
def test_causal_through_knn_and_xl_memory(smear_keys, qk_conv):
    """Changing token t of a segment never changes earlier outputs, with filled kNN and XL memory
    (smeared keys and the kNN convolutions mix in earlier tokens' keys, never a later one's)."""
    model = model_of(xl_max_memories=6, max_knn_memories=64, smear_keys=smear_keys,
                     qk_conv=qk_conv, qk_conv_layers=(1, 2))
    first = torch.randint(3, 64, (2, 16))
    second = torch.randint(3, 64, (2, 16))
    outputs = []
    for change in (False, True):
        memories = model.create_knn_memories(batch_size=2)
        with torch.no_grad():
            _, xl = model(first, knn_memories=memories)
            x = second.clone()
            if change:
                x[:, 9] = (x[:, 9] + 1) % 64
            logits, _ = model(x, knn_memories=memories, xl_memories=xl)
        outputs.append(logits)
        assert entries(memories) > 0
    torch.testing.assert_close(outputs[0][:, :9], outputs[1][:, :9], rtol=0, atol=0)
    assert not torch.allclose(outputs[0][:, 9:], outputs[1][:, 9:])


def test_gradients_reach_every_trainable_parameter():
    model = model_of(xl_max_memories=4).train()
    memories = model.create_knn_memories(batch_size=2)
    x = torch.randint(3, 64, (2, 16))
    with torch.no_grad():
        _, xl = model(x, knn_memories=memories)
    loss, _ = model(x, knn_memories=memories, labels=x, xl_memories=xl)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_gate_starts_closed_and_learns():
    model = model_of(gate_knn_output=True).train()
    memories = model.create_knn_memories(batch_size=2)
    x = torch.randint(3, 64, (2, 16))
    model(x, knn_memories=memories, labels=x).backward()
    gate = model.layers[1][0].fn.output_gate
    assert gate.item() == 0 and gate.grad.abs().item() > 0


def test_gather_dot_matches_dense_and_its_gradient():
    torch.manual_seed(1)
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    table = torch.randn(11, 8, dtype=torch.float64)
    positions = torch.randint(0, 11, (2, 3, 5, 4))
    dense = torch.einsum("bhnd,bhnkd->bhnk", q, table[positions])
    torch.testing.assert_close(_GatherDot.apply(q, table, positions), dense)
    assert torch.autograd.gradcheck(lambda t: _GatherDot.apply(t, table, positions), (q,))


def test_compact_attention_equals_the_dense_formula():
    """The gather/embedding_bag path gives the seed's dense-tensor attention."""
    model = model_of(max_knn_memories=40)
    attn = model.layers[1][0].fn
    memories = model.create_knn_memories(batch_size=2)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        for _ in range(4):  # fill past capacity so eviction is exercised too
            attn(x + torch.randn_like(x), knn_memory=memories[0], add_knn_memory=True)
        memories.collect_adds()
        got, _ = attn(x, knn_memory=memories[0], add_knn_memory=False)

        q = torch.nn.functional.normalize(attn.to_q(x).view(2, 16, 2, 8).transpose(1, 2), dim=-1)
        k, v = attn.to_kv(x).chunk(2, dim=-1)
        k = torch.nn.functional.normalize(k, dim=-1)
        scale = attn.scale.exp()
        sim = torch.einsum("bhid,bjd->bhij", q, k) * scale
        sim = sim.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), -torch.finfo(sim.dtype).max)
        mem_kv, mem_mask = memories[0].search(q, 4)
        sim_mem = torch.einsum("bhid,bhijd->bhij", q, mem_kv[..., 0, :]) * scale
        sim_mem = sim_mem.masked_fill(~mem_mask, -torch.finfo(sim.dtype).max)
        a = torch.cat((sim_mem, sim), dim=-1).softmax(-1)
        out = torch.einsum("bhij,bjd->bhid", a[..., 4:], v) + \
            torch.einsum("bhij,bhijd->bhid", a[..., :4], mem_kv[..., 1, :])
        expected = attn.to_out(out.transpose(1, 2).reshape(2, 16, 16))
    assert mem_mask.all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_read_only_memory_is_unchanged():
    model = model_of()
    memories = model.create_knn_memories(batch_size=2)
    x = torch.randint(3, 64, (2, 16))
    with torch.no_grad():
        model(x, knn_memories=memories)
        memories.collect_adds()
        before = entries(memories)
        model(x, knn_memories=memories, add_knn_memory=False)
        memories.collect_adds()
    assert before == 2 * 16 and entries(memories) == before


def _row_entries(memories, row):
    store = memories.backend.store
    return sum(m.live for (layer, r), m in store._namespaces["local"].memories.items() if r == row)


def test_sos_clears_the_row_before_the_segment_uses_it():
    # The seed passed token embeddings to clear_memory, so this never fired (and ids raised).
    model = model_of(clear_memories_on_sos_token_id=1)
    memories = model.create_knn_memories(batch_size=2)
    x = torch.randint(3, 64, (2, 16))
    with torch.no_grad():
        model(x, knn_memories=memories)
        x2 = torch.randint(3, 64, (2, 16))
        x2[0, 0] = 1
        model(x2, knn_memories=memories)
        memories.collect_adds()
    assert _row_entries(memories, 0) == 16 and _row_entries(memories, 1) == 32


def test_eos_clears_after_the_memories_were_used():
    model = model_of(clear_memories_on_eos_token_id=2)
    filled = model.create_knn_memories(batch_size=2)
    empty = model.create_knn_memories(batch_size=2)
    x = torch.randint(3, 64, (2, 16))
    x2 = torch.randint(3, 64, (2, 16))
    x2[0, -1] = 2
    with torch.no_grad():
        model(x, knn_memories=filled)
        with_memory = model(x2, knn_memories=filled)
        without = model(x2, knn_memories=empty)
        filled.collect_adds()
    assert not torch.allclose(with_memory[0], without[0]), "row 0 did not use its memories"
    assert _row_entries(filled, 0) == 0 and _row_entries(filled, 1) == 32


def test_xl_relative_positions_count_the_memory():
    """With XL memory, query t sits m tokens after the memory; the seed measured from 0."""
    bias = T5RelativePositionBias(scale=1.0, heads=1)
    torch.nn.init.normal_(bias.relative_attention_bias.weight)  # distinct buckets (init: zero)
    i, m = 4, 6
    table = bias(i, i + m, device="cpu")[0, 0]
    for t in range(i):
        for s in range(i + m):
            distance = torch.tensor(s - (m + t))
            bucket = T5RelativePositionBias._bucket(distance, 32, 128)
            assert table[t, s] == bias.relative_attention_bias.weight[bucket, 0]


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_stale_xl_memory_is_masked_and_kept_out_of_the_knn_memory(micro_batches):
    """A row that starts a new document (xl_valid False) computes as if it had no XL memory, and
    its previous document's XL entries do not enter its fresh kNN memory."""
    model = model_of(xl_max_memories=16, max_knn_memories=64)
    memories = model.create_knn_memories(batch_size=2)
    fresh = model.create_knn_memories(batch_size=1)
    x1, x2 = torch.randint(3, 64, (2, 16)), torch.randint(3, 64, (2, 16))
    with torch.no_grad():
        _, xl = model(x1, knn_memories=memories)
        memories.clear_memory([1])  # row 1 starts its next document
        logits, _ = model(x2, knn_memories=memories, xl_memories=xl,
                          xl_valid=torch.tensor([True, False]), micro_batches=micro_batches)
        alone = model(x2[1:], knn_memories=fresh)[0]
        memories.collect_adds()
    torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=1e-5)
    assert _row_entries(memories, 0) == 16 and _row_entries(memories, 1) == 0
    with pytest.raises(ValueError, match=r"xl_valid must hold one bool or count per batch row, "
                                         r"shape \(2,\)"):
        model(x2, knn_memories=memories, xl_memories=xl, xl_valid=torch.tensor([True]))


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_xl_longer_than_a_segment_never_shows_or_stores_the_previous_document(micro_batches):
    """With XL 32 and 16-token segments the previous document stays in XL for two segments: a
    row given its valid XL counts (0, then 16) computes and stores exactly what it does when it
    starts alone, with no XL and fresh memories."""
    model = model_of(xl_max_memories=32, max_knn_memories=128)
    memories = model.create_knn_memories(batch_size=2)
    fresh = model.create_knn_memories(batch_size=1)
    segments = [torch.randint(3, 64, (2, 16)) for _ in range(5)]
    with torch.no_grad():
        xl = None
        for x in segments[:3]:
            _, xl = model(x, knn_memories=memories, xl_memories=xl)
        memories.clear_memory([1])  # row 1 starts its next document at segment 3
        alone_xl = None
        for read, x in zip((0, 16), segments[3:]):
            logits, xl = model(x, knn_memories=memories, xl_memories=xl,
                               xl_valid=torch.tensor([48 + read, read]),
                               micro_batches=micro_batches)
            alone, alone_xl = model(x[1:], knn_memories=fresh, xl_memories=alone_xl)
            torch.testing.assert_close(logits[1:], alone, atol=1e-5, rtol=1e-5)
        memories.collect_adds()
        fresh.collect_adds()
    assert _row_entries(memories, 1) == _row_entries(fresh, 0) == 0  # nothing left XL yet
    # Row 0 kept reading one document: its whole XL memory is valid and its memory fills.
    assert _row_entries(memories, 0) == 5 * 16 - 32


def test_shift_knn_memories_down_reads_the_memory_of_a_higher_layer():
    """Layer 1 of 2 searches the memory layer 2 writes; each still writes its own."""
    model = model_of(depth=3, memorizing_layers=(1, 2), shift_knn_memories_down=1)
    unshifted = model_of(depth=3, memorizing_layers=(1, 2))
    unshifted.load_state_dict(model.state_dict())
    x = torch.randint(3, 64, (2, 16))
    searched = []
    outputs = []
    for m in (model, unshifted):
        memories = m.create_knn_memories(batch_size=2)
        with torch.no_grad():
            m(x, knn_memories=memories)  # fills both memories
            for number, memory in enumerate(memories):
                search = memory.search_async

                def spy(q, k, number=number, search=search):
                    searched.append(number)
                    return search(q, k)

                memory.search_async = spy
            outputs.append(m(x.flip(1), knn_memories=memories))
        memories.cleanup()
    assert searched == [1, 1, 0, 1]  # shifted: both layers read memory 1; unshifted: their own
    assert not torch.allclose(outputs[0], outputs[1])


def test_shift_xl_memories_down_hands_each_layer_the_xl_of_the_one_above():
    model = model_of(xl_max_memories=8, shift_xl_memories_down=1)
    x = torch.randint(3, 64, (2, 16))
    memories = model.create_knn_memories(batch_size=2)
    with torch.no_grad():
        _, xl = model(x, knn_memories=memories)
        shifted, _ = model(x, knn_memories=memories, xl_memories=xl, add_knn_memory=False)
        model.shift_xl_memories_down = 0
        unshifted, _ = model(x, knn_memories=memories, xl_memories=xl, add_knn_memory=False)
        rotated, _ = model(x, knn_memories=memories, xl_memories=xl[1:] + xl[:1],
                           add_knn_memory=False)
    torch.testing.assert_close(shifted, rotated)
    assert not torch.allclose(shifted, unshifted)


def test_gate_combine_matches_a_dense_float64_reference_and_its_gradients():
    """knn_combine="gate": separate softmaxes over the retrieved and the local keys, mixed per
    head by sigmoid(gate); forward and every gradient equal a dense float64 formula."""
    model = model_of(max_knn_memories=40, knn_combine="gate").double().train()
    attn = model.layers[1][0].fn
    assert attn.combine_gate.shape == (2,) and (attn.combine_gate == 0).all()
    with torch.no_grad():
        attn.combine_gate.copy_(torch.tensor([0.7, -1.2]))
    memories = model.create_knn_memories(batch_size=2)
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(3):
            attn(x + torch.randn_like(x), knn_memory=memories[0], add_knn_memory=True)
        memories.collect_adds()
    got, _ = attn(x, knn_memory=memories[0], add_knn_memory=False)
    grads = torch.autograd.grad(got.square().sum(), [attn.to_q.weight, attn.to_kv.weight,
                                                      attn.scale, attn.combine_gate])

    def dense():
        q = torch.nn.functional.normalize(attn.to_q(x).view(2, 16, 2, 8).transpose(1, 2), dim=-1)
        k, v = attn.to_kv(x).chunk(2, dim=-1)
        k = torch.nn.functional.normalize(k, dim=-1)
        scale = attn.scale.exp()
        sim = torch.einsum("bhid,bjd->bhij", q, k) * scale
        sim = sim.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
        mem_kv, mem_mask = memories[0].search(q.detach().float(), 4)
        mem_kv = mem_kv.double()
        sim_mem = torch.einsum("bhid,bhijd->bhij", q, mem_kv[..., 0, :]) * scale
        sim_mem = sim_mem.masked_fill(~mem_mask, float("-inf"))
        local = torch.einsum("bhij,bjd->bhid", sim.softmax(-1), v)
        remote = torch.einsum("bhij,bhijd->bhid", sim_mem.softmax(-1), mem_kv[..., 1, :])
        g = attn.combine_gate.sigmoid().view(1, 2, 1, 1)
        return attn.to_out((g * remote + (1 - g) * local).transpose(1, 2).reshape(2, 16, 16))

    expected = dense()
    expected_grads = torch.autograd.grad(expected.square().sum(), [
        attn.to_q.weight, attn.to_kv.weight, attn.scale, attn.combine_gate])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)
    memories.cleanup()


def test_joint_models_have_no_gate_parameters_and_load_seed_names():
    joint = model_of()
    assert not any("combine_gate" in name for name in joint.state_dict())
    gated = model_of(knn_combine="gate")
    assert [n for n in gated.state_dict() if n not in joint.state_dict()] == \
        ["layers.1.0.fn.combine_gate"]
    with pytest.raises(ValueError, match="knn_combine must be one of"):
        model_of(knn_combine="mean")


def test_position_biases_start_at_zero():
    """Times sqrt(dim_head), a unit-normal start would add position noise of std ~6 to every
    attention logit and drown the content scores that copying needs."""
    model = model_of()
    assert (model.rel_pos_bias.relative_attention_bias.weight == 0).all()
    assert (model.knn_rel_pos_bias.relative_attention_bias.weight == 0).all()


def test_bad_arguments_say_what_was_expected():
    model = model_of()
    memories = model.create_knn_memories(batch_size=2)
    with pytest.raises(ValueError, match="batch size 3 but the kNN memories hold 2 rows"):
        model(torch.randint(3, 64, (3, 8)), knn_memories=memories)
    with pytest.raises(ValueError, match="expected 1 kNN memories"):
        model(torch.randint(3, 64, (2, 8)), knn_memories=[])
    with pytest.raises(ValueError, match="topk must be an integer"):
        memories[0].search(torch.randn(2, 4, 8), 0)
    with pytest.raises(ValueError, match=r"memories must have shape \(2, \*, 2, 8\)"):
        memories[0].add(torch.randn(2, 4, 2, 16))


def test_at_batch_indices_scopes_rows():
    model = model_of()
    memories = model.create_knn_memories(batch_size=4)
    with torch.no_grad(), memories.at_batch_indices([1, 3]):
        model(torch.randint(3, 64, (2, 16)), knn_memories=memories)
    memories.collect_adds()
    assert [_row_entries(memories, r) for r in range(4)] == [0, 16, 0, 16]


def test_seed_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from memtrans import KNNMemory

    model = MemorizingTransformer(
        num_tokens=20000, dim=512, dim_head=64, depth=8, memorizing_layers=(4, 5),
        max_knn_memories=2048, num_retrieved_memories=32, clear_memories_on_sos_token_id=1)
    data = torch.randint(0, 20000, (2, 1024))
    knn_memories = model.create_knn_memories(batch_size=2)
    with torch.no_grad():
        logits, _ = model(data, knn_memories=knn_memories)
    assert logits.shape == (1024, 20000)

    memory = KNNMemory(dim=64, max_memories=1024, num_indices=2)
    memory.add(torch.randn(2, 512, 2, 64))
    memory.add(torch.randn(2, 512, 2, 64))
    memory.clear([0])
    memory.add(torch.randn(2, 512, 2, 64))
    memory.add(torch.randn(2, 512, 2, 64))
    key_values, mask = memory.search(torch.randn(2, 512, 64), topk=32)
    assert key_values.shape == (2, 512, 32, 2, 64) and mask.all()
    with model.knn_memories_context(batch_size=2) as memories:
        assert len(memories) == 2
    assert list(tmp_path.iterdir()) == [], "memories left files on disk"


def test_micro_batches_give_the_same_numbers():
    model = model_of(xl_max_memories=6, max_knn_memories=40)
    whole = model.create_knn_memories(batch_size=5)
    split = model.create_knn_memories(batch_size=5)
    xl_a = xl_b = None
    with torch.no_grad():
        for _ in range(4):
            x = torch.randint(3, 64, (5, 16))
            a, xl_a = model(x, knn_memories=whole, xl_memories=xl_a, labels=x)
            b, xl_b = model(x, knn_memories=split, xl_memories=xl_b, labels=x, micro_batches=3)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
            for m, n in zip(xl_a, xl_b):
                torch.testing.assert_close(m, n, atol=1e-6, rtol=1e-6)
    assert entries(whole) == entries(split) > 0
    with pytest.raises(ValueError, match="micro_batches must be an integer in"):
        model(x, knn_memories=whole, micro_batches=6)


def test_smeared_keys_carry_the_previous_token_and_learn():
    """``smear_keys=True``: every layer, the kNN one included, mixes each key with the previous
    one (causality: ``test_causal_through_knn_and_xl_memory``), and every smear weight learns."""
    model = model_of(smear_keys=True, xl_max_memories=6, max_knn_memories=64)
    smears = [n for n, _ in model.named_parameters() if "key_smear" in n]
    assert len(smears) == 3

    attn = model.layers[0][0].fn
    k = torch.randn(1, 5, 8)
    smeared = attn.key_smear(k)
    torch.testing.assert_close(smeared[:, 0], 0.5 * k[:, 0])
    torch.testing.assert_close(smeared[:, 1:], 0.5 * k[:, 1:] + 0.5 * k[:, :-1])

    model.train()
    x = torch.randint(3, 64, (2, 16))
    loss, _ = model(x, knn_memories=model.create_knn_memories(batch_size=2), labels=x)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "key_smear" in n)


def test_qk_convolutions_reach_back_w_queries_and_w_plus_1_keys_and_learn():
    """``qk_conv=3``: by default only the kNN layer gets convolutions, over 3 queries and 4 keys,
    starting as the identity on queries and the smear on keys; positions before the segment count
    as zero; every weight learns (causality: ``test_causal_through_knn_and_xl_memory``)."""
    from memtrans.model import ShortConv

    model = model_of(qk_conv=3, smear_keys=True, xl_max_memories=6, max_knn_memories=64)
    convs = {n: p.shape for n, p in model.named_parameters() if "conv" in n}
    assert convs == {"layers.1.0.fn.query_conv.weight": (3, 2 * 8),
                     "layers.1.0.fn.key_conv.weight": (4, 8)}
    assert model.layers[1][0].fn.key_smear is None  # the convolution replaces the smear there
    assert model.layers[0][0].fn.key_smear is not None
    plain = model_of(qk_conv=2, qk_conv_layers=(1,))  # a plain layer's, when asked for
    assert {n for n, _ in plain.named_parameters() if "conv" in n} == {
        "layers.0.0.fn.query_conv.weight", "layers.0.0.fn.key_conv.weight"}

    conv = ShortConv(2, 3, (0.5, 0.5))
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]]))
    t = torch.arange(1.0, 5.0).view(1, 4, 1).expand(1, 4, 2)
    expected = torch.tensor([[1.0, 12.0, 123.0, 234.0], [2.0, 24.0, 246.0, 468.0]]).T
    torch.testing.assert_close(conv(t)[0], expected)
    torch.testing.assert_close(conv(t[:, :1])[0], expected[:1])  # shorter than the window

    model.train()
    x = torch.randint(3, 64, (2, 16))
    memories = model.create_knn_memories(batch_size=2)
    with torch.no_grad():
        _, xl = model(x, knn_memories=memories)
    loss, _ = model(x, knn_memories=memories, labels=x, xl_memories=xl)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "conv" in n)
