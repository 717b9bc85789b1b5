"""Document streams on the real default corpus (the standard library) and on small made-up ones."""

from __future__ import annotations

import collections
import errno
import gzip
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from memtrans.data import (EOS_ID, NUM_TOKENS, PAD_ID, SOS_ID, Corpus, CorpusError, Document,
                           DocumentStream, Segment, decode, encode, load_corpus)


PER_FILE = {"documents": "file", "max_document_bytes": 0, "val_fraction": 0.05}
"""The per-file corpus these stream tests were written for (the default before packages)."""


@pytest.fixture(scope="module")
def stdlib() -> Corpus:
    return load_corpus(**PER_FILE)


@pytest.fixture(scope="module")
def packages() -> Corpus:
    return load_corpus()


def make_corpus(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


class RowReader:
    """Checks every segment of a stream and rebuilds the documents each row has finished."""

    def __init__(self, batch_size: int, seq_len: int):
        self.batch_size, self.seq_len = batch_size, seq_len
        self.done: list[list[bytes]] = [[] for _ in range(batch_size)]
        self.pieces: list[list[np.ndarray] | None] = [None] * batch_size
        self.last_label: list[int | None] = [None] * batch_size

    def feed(self, seg: Segment) -> None:
        assert isinstance(seg, Segment)
        assert seg.x.shape == seg.labels.shape == (self.batch_size, self.seq_len)
        assert seg.x.dtype == seg.labels.dtype == torch.int64 and seg.reset.dtype == torch.bool
        x, labels, reset = seg.x.numpy(), seg.labels.numpy(), seg.reset.numpy()
        assert ((x >= 0) & (x < NUM_TOKENS)).all() and ((labels >= 0) & (labels < NUM_TOKENS)).all()
        for r in range(self.batch_size):
            valid = labels[r] != PAD_ID
            k = int(valid.sum())
            assert valid[:k].all(), "padding must only follow the document's end"
            assert (x[r, k:] == PAD_ID).all()
            if k == 0:  # an idle row (finite stream, no documents left)
                assert not reset[r] and self.pieces[r] is None
                continue
            assert (x[r, 1:k] == labels[r, :k - 1]).all(), "labels are the next inputs"
            # reset exactly where a document starts: its first input is SOS, and the row had
            # finished its previous document (or had none)
            assert bool(reset[r]) == (x[r, 0] == SOS_ID)
            assert bool(reset[r]) == (self.pieces[r] is None)
            if reset[r]:
                self.pieces[r] = []
            else:
                assert x[r, 0] == self.last_label[r], "a row continues where it stopped"
            self.pieces[r].append(x[r, :k])
            self.last_label[r] = int(labels[r, k - 1])
            if labels[r, k - 1] == EOS_ID:
                tokens = np.concatenate(self.pieces[r])
                assert tokens[0] == SOS_ID and (tokens[1:] > EOS_ID).all()
                self.done[r].append(decode(tokens))
                self.pieces[r] = None
            else:
                assert k == self.seq_len, "only a document's last segment is padded"


def run(stream: DocumentStream, steps: int) -> RowReader:
    reader = RowReader(stream.batch_size, stream.seq_len)
    for _ in range(steps):
        reader.feed(next(stream))
    return reader


def test_tokens():
    every_byte = bytes(range(256))
    tokens = encode(every_byte)
    assert tokens.dtype == np.int64 and tokens.tolist() == list(range(3, 259))
    assert NUM_TOKENS == 259 and (PAD_ID, SOS_ID, EOS_ID) == (0, 1, 2)
    assert decode(tokens) == every_byte
    assert decode(torch.tensor([SOS_ID, *tokens[:5].tolist(), EOS_ID, PAD_ID])) == every_byte[:5]
    with pytest.raises(ValueError, match="259"):
        decode([NUM_TOKENS])


def test_default_corpus_is_the_stdlib_sources(stdlib):
    root = Path(sysconfig.get_paths()["stdlib"])
    assert stdlib.root == root and "standard library" in stdlib.description
    names = {doc.name for doc in stdlib.train + stdlib.val}
    assert {"os.py", "asyncio/base_events.py", "json/decoder.py"} <= names
    assert all(name.endswith(".py") for name in names)
    excluded = {"site-packages", "test", "tests", "idle_test"}
    assert not any(excluded & set(name.split("/")) for name in names)
    assert len(names) > 300  # long code documents, and many of them
    assert all(doc.path == root / doc.name for doc in stdlib.train + stdlib.val)


def test_split_is_by_file_disjoint_and_stable(stdlib):
    train, val = set(stdlib.train_files), set(stdlib.val_files)
    assert not train & val
    assert 0.01 < len(val) / (len(train) + len(val)) < 0.12
    again = load_corpus(**PER_FILE)
    assert again.train == stdlib.train and again.val == stdlib.val
    # another interpreter with another string hash seed splits the same way
    code = ("from memtrans.data import load_corpus; print([d.name for d in load_corpus("
            "documents='file', max_document_bytes=0, val_fraction=0.05).val])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert eval(out) == [doc.name for doc in stdlib.val]


def test_split_known_answer(tmp_path):
    """Pinned so that a change of the split rule (or a machine that splits differently) shows."""
    make_corpus(tmp_path, {f"doc{i:02d}.txt": b"text %d\n" % i for i in range(20)})
    corpus = load_corpus(tmp_path, val_fraction=0.3, documents="file")
    assert [doc.name for doc in corpus.val] == [
        "doc01.txt", "doc04.txt", "doc06.txt", "doc09.txt", "doc11.txt", "doc12.txt", "doc13.txt"]
    assert len(corpus.train) == 13 and corpus.val_files == [tmp_path / d.name for d in corpus.val]


def test_ranks_read_disjoint_shares_of_each_epoch(stdlib):
    """Global row g reads positions g, g + R, ... of the epoch sequence: one copy per epoch."""
    batch_size, world_size, seq_len = 3, 2, 2048
    rows, n = batch_size * world_size, len(stdlib.train)
    per_row = [[] for _ in range(rows)]
    for rank in range(world_size):
        stream = stdlib.train_stream(batch_size=batch_size, seq_len=seq_len, rank=rank,
                                     world_size=world_size, seed=7)
        reader = RowReader(batch_size, seq_len)
        need = [len(range(rank * batch_size + r, 2 * n, rows)) for r in range(batch_size)]
        while any(len(done) < k for done, k in zip(reader.done, need)):
            reader.feed(next(stream))
        for r in range(batch_size):
            per_row[rank * batch_size + r] = reader.done[r]
    by_position = {g + j * rows: doc for g in range(rows) for j, doc in enumerate(per_row[g])}
    epochs = [[by_position[p] for p in range(e * n, (e + 1) * n)] for e in range(2)]
    files = collections.Counter(doc.path.read_bytes() for doc in stdlib.train)
    for epoch in epochs:  # every training file exactly once per epoch, each by one row
        assert collections.Counter(epoch) == files
    assert epochs[0] != epochs[1], "each epoch has its own order"


def test_rank_rows_are_global_rows(stdlib):
    """Rank 1 of 2 with 3 rows each streams exactly rows 3..5 of one rank with 6 rows."""
    whole = stdlib.train_stream(batch_size=6, seq_len=64, seed=3)
    ranks = [stdlib.train_stream(batch_size=3, seq_len=64, rank=r, world_size=2, seed=3)
             for r in range(2)]
    for _ in range(300):
        seg = next(whole)
        for rank, stream in enumerate(ranks):
            part = next(stream)
            rows = slice(3 * rank, 3 * rank + 3)
            assert torch.equal(part.x, seg.x[rows]) and torch.equal(part.labels, seg.labels[rows])
            assert torch.equal(part.reset, seg.reset[rows])


def test_seed_changes_the_order(stdlib):
    first = [next(stdlib.train_stream(batch_size=4, seq_len=8, seed=s)).x for s in (0, 1)]
    assert not torch.equal(*first)


def test_resume_continues_exactly(stdlib):
    stream = stdlib.train_stream(batch_size=3, seq_len=128, seed=5)
    for _ in range(257):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [next(stream) for _ in range(200)]
    resumed = load_corpus(**PER_FILE).train_stream(batch_size=3, seq_len=128, seed=5)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got.x, want.x) and torch.equal(got.labels, want.labels)
        assert torch.equal(got.reset, want.reset)


def test_resume_at_every_step_across_epochs(tmp_path):
    """Tiny documents: boundaries, exact-fit segments and epoch changes at almost every step."""
    sizes = [1, 3, 4, 7, 8, 12, 2]
    make_corpus(tmp_path, {f"f{i}.txt": bytes([97 + i]) * size for i, size in enumerate(sizes)})
    corpus = load_corpus(tmp_path, val_fraction=0, documents="file")
    stream = corpus.train_stream(batch_size=2, seq_len=4, seed=1)
    reference = [next(stream) for _ in range(60)]
    for k in range(50):
        stream = corpus.train_stream(batch_size=2, seq_len=4, seed=1)
        for _ in range(k):
            next(stream)
        resumed = corpus.train_stream(batch_size=2, seq_len=4, seed=1)
        resumed.load_state_dict(stream.state_dict())
        for want in reference[k:k + 10]:
            got = next(resumed)
            assert torch.equal(got.x, want.x) and torch.equal(got.reset, want.reset)
    reader = RowReader(2, 4)
    for seg in reference:
        reader.feed(seg)
    contents = {bytes([97 + i]) * size for i, size in enumerate(sizes)}
    assert set(reader.done[0] + reader.done[1]) == contents


def reads(segments: list, row: int) -> list[tuple[bool, bytes]]:
    """Row ``row``'s reads of documents, as (reset at its start, its bytes); a read starts at SOS."""
    found = []
    for seg in segments:
        k = int((seg.labels[row] != PAD_ID).sum())
        x = seg.x[row, :k].numpy()
        if k and x[0] == SOS_ID:
            found.append((bool(seg.reset[row]), []))
        if k:
            found[-1][1].append(x)
    return [(reset, decode(np.concatenate(pieces))) for reset, pieces in found]


def test_repeated_documents_are_read_twice_without_reset_and_resume_exactly(tmp_path):
    """repeat=1: every document twice in a row, the second read without reset (memories kept);
    repeat=0.5: about half of them, chosen by the seed; resuming at any step continues exactly,
    also in the middle of a second read; with repeat_span, each span twice instead."""
    sizes = [3, 9, 5, 14, 6, 11, 2, 8] * 4
    make_corpus(tmp_path, {f"f{i:02d}.txt": bytes([97 + i % 26]) * size
                           for i, size in enumerate(sizes)})
    corpus = load_corpus(tmp_path, val_fraction=0, documents="file")
    always = [next(s) for s in [corpus.train_stream(batch_size=2, seq_len=4, repeat=1.0)]
              for _ in range(120)]
    for row in range(2):
        found = reads(always, row)[:-1]  # the last may be cut off
        assert len(found) > 10
        for first, second in zip(found[::2], found[1::2]):
            assert first[0] and not second[0] and first[1] == second[1]
    plain = corpus.train_stream(batch_size=2, seq_len=4, seed=3)
    unrepeated = corpus.train_stream(batch_size=2, seq_len=4, seed=3, repeat=0.0)
    for _ in range(60):
        a, b = next(plain), next(unrepeated)
        assert torch.equal(a.x, b.x) and torch.equal(a.reset, b.reset)
    half = [next(s) for s in [corpus.train_stream(batch_size=2, seq_len=4, seed=3, repeat=0.5)]
            for _ in range(300)]
    repeated = [not reset for row in range(2) for reset, _ in reads(half, row)]
    assert 0.25 < sum(repeated) / (len(repeated) - sum(repeated)) < 0.75
    for k in range(0, 60, 3):
        stream = corpus.train_stream(batch_size=2, seq_len=4, seed=3, repeat=0.5)
        for _ in range(k):
            next(stream)
        resumed = corpus.train_stream(batch_size=2, seq_len=4, seed=3, repeat=0.5)
        resumed.load_state_dict(json.loads(json.dumps(stream.state_dict())))
        for want in half[k:k + 12]:
            got = next(resumed)
            assert torch.equal(got.x, want.x) and torch.equal(got.reset, want.reset)
    # Spans of 8 tokens (2 segments), each read twice: offsets 0, 4, 0, 4, 8, 12, 8, 12, ...
    spans = corpus.train_stream(batch_size=2, seq_len=4, repeat=1.0, repeat_span=8)
    segments = [next(spans) for _ in range(80)]
    checked = 0
    for row in range(2):
        offsets, document = [], None
        for seg in segments:
            if seg.reset[row] and offsets:
                length = len(document.tokens()) - 1  # labelled positions
                starts = range(0, length, 8)
                assert offsets == [o for s in starts for o in [s, s + 4] * 2 if o < length]
                offsets, checked = [], checked + 1
            document = seg.documents[row]
            offsets.append(seg.offsets[row])
    assert checked >= 6
    with pytest.raises(CorpusError, match="repeat_span must be a multiple of seq_len=4"):
        corpus.train_stream(batch_size=2, seq_len=4, repeat=1.0, repeat_span=6)
    with pytest.raises(CorpusError, match="repeat: saved None, now 0.5"):
        corpus.train_stream(batch_size=2, seq_len=4, seed=3, repeat=0.5).load_state_dict(
            plain.state_dict())
    with pytest.raises(CorpusError, match="repeat must be a probability"):
        corpus.train_stream(batch_size=2, seq_len=4, repeat=1.5)


def test_resume_refuses_another_stream(stdlib):
    state = stdlib.train_stream(batch_size=2, seq_len=64).state_dict()
    other = stdlib.train_stream(batch_size=2, seq_len=64, rank=1, world_size=2)
    with pytest.raises(CorpusError, match="rank: saved 0, now 1.*world_size: saved 1, now 2"):
        other.load_state_dict(state)
    on_val = DocumentStream(stdlib.val, batch_size=2, seq_len=64)
    with pytest.raises(CorpusError, match="corpus: saved"):
        on_val.load_state_dict(state)


def test_validation_stream_is_one_deterministic_pass(stdlib):
    """Both ranks together read every validation file once, the same way every evaluation."""
    batch_size, world_size, seq_len = 4, 2, 512
    read = collections.Counter()
    for rank in range(world_size):
        segments = list(stdlib.val_stream(batch_size=batch_size, seq_len=seq_len, rank=rank,
                                          world_size=world_size))
        again = list(stdlib.val_stream(batch_size=batch_size, seq_len=seq_len, rank=rank,
                                       world_size=world_size))
        assert len(segments) == len(again)
        assert all(torch.equal(a.x, b.x) and torch.equal(a.reset, b.reset)
                   for a, b in zip(segments, again))
        reader = RowReader(batch_size, seq_len)
        for seg in segments:
            reader.feed(seg)
        assert all(pieces is None for pieces in reader.pieces), "every document read to its end"
        assert (segments[-1].labels[:, 0] != PAD_ID).any() and len(segments) > 10
        read.update(doc for row in reader.done for doc in row)
    assert read == collections.Counter(doc.path.read_bytes() for doc in stdlib.val)


def test_directory_rules(tmp_path):
    make_corpus(tmp_path, {
        "a.txt": b"alpha\n",
        "sub/deeper/b.py": b"print('b')\n",
        "c.txt.gz": gzip.compress(b"gamma, compressed\n"),
        "empty.txt": b"",
        "image.bin": b"\x89PNG\r\n\x1a\n\0\0\0",
        ".hidden.txt": b"hidden\n",
        ".git/config": b"[core]\n",
        "latin1.txt": "caf\xe9\n".encode("latin-1"),  # bytes are kept: no decoding needed
    })
    corpus = load_corpus(tmp_path, val_fraction=0, documents="file")
    assert [doc.name for doc in corpus.train] == ["a.txt", "c.txt.gz", "latin1.txt",
                                                  "sub/deeper/b.py"]
    assert corpus.train[1].read() == b"gamma, compressed\n"
    reader = RowReader(4, 8)
    for seg in DocumentStream(corpus.train, batch_size=4, seq_len=8, epochs=1):
        reader.feed(seg)
    assert sorted(d for row in reader.done for d in row) == sorted(
        [b"alpha\n", b"gamma, compressed\n", b"caf\xe9\n", b"print('b')\n"])


@pytest.mark.parametrize("compress", [False, True])
def test_single_file_is_cut_at_line_breaks(tmp_path, compress):
    lines = b"".join(b"line %d %s\n" % (i, b"x" * (i % 37)) for i in range(400)) + b"y" * 300
    path = tmp_path / ("book.txt.gz" if compress else "book.txt")
    path.write_bytes(gzip.compress(lines) if compress else lines)
    corpus = load_corpus(path, val_fraction=0.1, chunk_bytes=256)
    docs = sorted(corpus.train + corpus.val, key=lambda d: d.start)
    pieces = [doc.read() for doc in docs]
    assert b"".join(pieces) == lines and len(corpus.val) > 0
    assert all(len(p) <= 256 for p in pieces)
    assert all(p.endswith(b"\n") for p in pieces[:-2])  # the last 300 bytes have no line break
    assert pieces[-2:] == [b"y" * 256, b"y" * 44]
    reader = run(corpus.train_stream(batch_size=2, seq_len=100), 400)
    assert set(d for row in reader.done for d in row) <= set(pieces)
    assert len({d for row in reader.done for d in row}) > 10


def test_stream_reads_lazily_and_names_a_vanished_file(tmp_path):
    make_corpus(tmp_path, {f"{i}.txt": b"%d\n" % i * 50 for i in range(6)})
    corpus = load_corpus(tmp_path, val_fraction=0, documents="file")
    for doc in corpus.train:
        doc.path.unlink()
    stream = corpus.train_stream(batch_size=2, seq_len=8)  # nothing read yet, so no error
    with pytest.raises(CorpusError, match=r"cannot read corpus file .*\d\.txt"):
        next(stream)


def deny_reading(monkeypatch, path: Path) -> None:
    """Make ``path`` unreadable. Root ignores permission bits, so there the refusal is emulated."""
    path.chmod(0)
    if not os.access(path, os.R_OK):
        return
    real_open = Path.open

    def open_(self, *args, **kwargs):
        if self == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    make_corpus(tmp_path, {"fine.txt": b"ok\n", "secret.txt": b"hidden\n"})
    deny_reading(monkeypatch, tmp_path / "secret.txt")
    with pytest.raises(CorpusError, match=r"secret\.txt: Permission denied"):
        load_corpus(tmp_path)
    with pytest.raises(CorpusError, match=r"secret\.txt: Permission denied"):
        load_corpus(tmp_path / "secret.txt")


def test_unreadable_file_while_streaming_is_named(tmp_path, monkeypatch):
    make_corpus(tmp_path, {"a.txt": b"a\n", "b.txt": b"b\n"})
    corpus = load_corpus(tmp_path, val_fraction=0, documents="file")
    deny_reading(monkeypatch, tmp_path / "b.txt")
    with pytest.raises(CorpusError, match=r"b\.txt: Permission denied"):
        next(corpus.train_stream(batch_size=2, seq_len=4))


def test_corpus_errors_name_the_path(tmp_path):
    def fails(path, match, **kwargs):
        with pytest.raises(CorpusError, match=match) as info:
            load_corpus(path, **kwargs)
        assert str(path) in str(info.value)

    fails(tmp_path / "nope", "does not exist")
    os.mkfifo(tmp_path / "pipe")
    fails(tmp_path / "pipe", "neither a regular file nor a directory")
    (tmp_path / "empty_dir").mkdir()
    fails(tmp_path / "empty_dir", "no documents")
    make_corpus(tmp_path / "blank", {"e.txt": b"", "z.bin": b"\0\1\2"})
    fails(tmp_path / "blank", r"1 empty, 1 binary and 0 generated")
    make_corpus(tmp_path, {"empty.txt": b"", "bad.gz": b"not gzip at all"})
    fails(tmp_path / "empty.txt", "is empty")
    fails(tmp_path / "bad.gz", "not a valid gzip file")
    make_corpus(tmp_path / "badgz", {"x.txt": b"x\n", "y.txt.gz": b"\x1f\x8bbroken"})
    fails(tmp_path / "badgz", r"y\.txt\.gz: not a valid gzip file")
    make_corpus(tmp_path / "one", {"a.txt": b"a\n"})
    fails(tmp_path / "one", r"none of its 1 documents .* raise val_fraction")
    make_corpus(tmp_path / "only", {"only.txt": b"a\n"})
    fails(tmp_path / "only", r"all 1 documents fell in the validation split", val_fraction=0.5)


def test_validation_needs_a_document_per_row(tmp_path):
    make_corpus(tmp_path, {f"doc{i:02d}.txt": b"text\n" for i in range(20)})
    corpus = load_corpus(tmp_path, val_fraction=0.3, documents="file")  # 7 validation documents
    assert len(list(corpus.val_stream(batch_size=7, seq_len=4))) == 2
    with pytest.raises(CorpusError, match=rf"{tmp_path}: the validation split has 7 documents "
                                          r"but evaluation uses 8 rows .*val_fraction \(now 0.3\)"):
        corpus.val_stream(batch_size=4, world_size=2)
    no_val = load_corpus(tmp_path, val_fraction=0, documents="file")
    with pytest.raises(CorpusError, match="has 0 documents"):
        no_val.val_stream(batch_size=1)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"seq_len": 0}, "seq_len must be a positive integer"),
    ({"world_size": 0}, "world_size must be a positive integer"),
    ({"rank": 2, "world_size": 2}, r"rank must be in \[0, 2\)"),
    ({"epochs": 0}, "epochs must be"),
    ({"batch_size": 4, "world_size": 2}, "7 documents cannot feed 8 rows"),
])
def test_stream_settings_are_checked(tmp_path, kwargs, match):
    make_corpus(tmp_path, {f"{i}.txt": b"x\n" for i in range(7)})
    with pytest.raises(CorpusError, match=match):
        DocumentStream(load_corpus(tmp_path, val_fraction=0, documents="file").train,
                       **{"batch_size": 1, **kwargs})


def test_load_settings_are_checked():
    with pytest.raises(CorpusError, match="val_fraction must be in"):
        load_corpus(val_fraction=1.0)
    with pytest.raises(CorpusError, match="chunk_bytes must be"):
        load_corpus(chunk_bytes=0)


def test_stream_accepts_plain_paths(tmp_path):
    make_corpus(tmp_path, {"a.txt": b"one\n", "b.txt": b"two\n"})
    stream = DocumentStream([tmp_path / "a.txt", str(tmp_path / "b.txt")], batch_size=2,
                            seq_len=8, epochs=1)
    reader = run(stream, 1)
    assert sorted(reader.done[0] + reader.done[1]) == [b"one\n", b"two\n"]
    with pytest.raises(StopIteration):
        next(stream)
    assert isinstance(stream.docs[0], Document)


# -----------------------------------------------------------------------------
# package documents


def separated(name: str, data: bytes) -> bytes:
    return f"# ==== {name} ====\n".encode() + data + (b"" if data.endswith(b"\n") else b"\n")


PACKAGES = {
    "alpha/__init__.py": b"from .core import run\n",
    "alpha/core.py": b"def run():\n    return 1\n",
    "alpha/sub/deep.py": b"X = 2",  # no final line break: the separator still starts a line
    "beta/b.py": b"import alpha\n",
    "top1.py": b"a = 1\n" * 30,
    "top2.py": b"b = 2\n" * 30,
    "top3.py": b"c = 3\n" * 30,
    "enc/cp9999.py": b'""" Python Character Mapping Codec cp9999 generated from X with gencodec.py.\n'
                     b'"""\ntable = (\n' + b"    '\\x00'\n" * 50 + b")\n",
    "docs/topics.py": b"# -*- coding: utf-8 -*-\n# Autogenerated by Sphinx on Mon Dec 4\n"
                      b"topics = {}\n",
}


def test_package_documents_hold_each_file_once_in_order_with_separators(tmp_path):
    make_corpus(tmp_path, PACKAGES)
    corpus = load_corpus(tmp_path, val_fraction=0, max_document_bytes=200)
    by_name = {doc.name: doc.read() for doc in corpus.train}
    assert by_name["alpha"] == (separated("alpha/__init__.py", PACKAGES["alpha/__init__.py"])
                                + separated("alpha/core.py", PACKAGES["alpha/core.py"])
                                + separated("alpha/sub/deep.py", b"X = 2"))
    assert by_name["beta"] == separated("beta/b.py", b"import alpha\n")
    # top-level modules: sorted runs that stay within max_document_bytes (each is 180 + 18)
    assert by_name["top1.py"] == separated("top1.py", PACKAGES["top1.py"])
    assert {"top2.py", "top3.py"} <= set(by_name)
    # generated data tables are left out; a package left with no files has no document
    assert not any("cp9999" in n or "topics" in n or n in ("enc", "docs") for n in by_name)
    assert corpus.train_files == sorted(tmp_path / n for n in PACKAGES
                                        if not n.startswith(("enc/", "docs/")))
    again = load_corpus(tmp_path, val_fraction=0, max_document_bytes=200)
    assert [d.identity for d in again.train] == [d.identity for d in corpus.train]
    grouped = load_corpus(tmp_path, val_fraction=0)  # 256 KiB: all top-level files in one
    assert {d.name for d in grouped.train} == {"alpha", "beta", "top1.py...top3.py"}
    every = load_corpus(tmp_path, val_fraction=0, documents="file")  # per file: none left out
    assert {d.name for d in every.train} == set(PACKAGES)


def test_long_packages_are_cut_preferring_file_boundaries(tmp_path):
    files = {f"pkg/m{i:02d}.py": b"".join(b"line %d of m%d\n" % (j, i) for j in range(40 + i))
             for i in range(12)}
    files["pkg/huge.py"] = b"x = 1\n" * 3000  # 18 KB: longer than a piece, cut at line breaks
    make_corpus(tmp_path, files)
    whole = load_corpus(tmp_path, val_fraction=0, max_document_bytes=0).train
    assert [d.name for d in whole] == ["pkg"]
    pieces = load_corpus(tmp_path, val_fraction=0, max_document_bytes=4096).train
    data = [p.read() for p in sorted(pieces, key=lambda p: int(p.name.split("@")[1]))]
    assert b"".join(data) == whole[0].read() and len(data) > 5
    assert all(0 < len(d) <= 4096 and d.endswith(b"\n") for d in data)
    starts_at_a_file = [d.startswith(b"# ==== pkg/") for d in data]
    assert sum(starts_at_a_file) >= 3  # small files: cut between them
    assert all(p.name.startswith("pkg@") for p in pieces)
    for piece in pieces:  # a piece reads only the files it overlaps
        assert all(f"# ==== {f.name} ====".encode() in piece.read() or f is piece.files[0]
                   for f in piece.files)
    assert len(pieces) == len({p.identity for p in pieces})


def test_file_documents_can_be_cut_too(tmp_path):
    make_corpus(tmp_path, {"long.txt": b"abcdefg\n" * 100, "short.txt": b"hi\n",
                           "long.txt.gz": gzip.compress(b"zz\n" * 200)})
    corpus = load_corpus(tmp_path, val_fraction=0, documents="file", max_document_bytes=256)
    names = [d.name for d in corpus.train]
    assert "short.txt" in names and "long.txt@0" in names and "long.txt.gz@0" in names
    long = [d.read() for d in corpus.train if d.name.startswith("long.txt@")]
    assert b"".join(long) == b"abcdefg\n" * 100 and all(len(p) <= 256 for p in long)


def test_split_keeps_whole_packages_on_one_side(tmp_path):
    files = {f"p{i:02d}/m{j}.py": b"v = %d\n" % j * 200 for i in range(40) for j in range(6)}
    files.update({f"t{i:02d}.py": b"t = %d\n" % i * 100 for i in range(40)})
    make_corpus(tmp_path, files)
    corpus = load_corpus(tmp_path, val_fraction=0.2, max_document_bytes=2048)
    package = {p: p.relative_to(tmp_path).parts[0] for p in map(Path, corpus.train_files
                                                                + corpus.val_files)}
    train = {package[p] for p in corpus.train_files}
    val = {package[p] for p in corpus.val_files}
    assert val and train and not train & val
    assert len(train | val) == 80  # every package and top-level module is somewhere
    assert any(d.name.startswith("p") and "@" in d.name for d in corpus.val), "cut pieces"


def test_stdlib_packages(packages):
    docs = packages.train + packages.val
    names = {doc.name for doc in docs}
    assert {"json", "email@0", "http"} <= names
    files = {p.relative_to(packages.root).as_posix() for d in docs for p in d.paths}
    assert {"os.py", "asyncio/base_events.py", "json/decoder.py", "encodings/utf_8.py"} <= files
    assert "pydoc_data/topics.py" not in files and "encodings/cp1252.py" not in files
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(f.split("/"))
                   for f in files)
    assert all(len(doc.read()) <= 256 * 1024 for doc in docs)
    assert not set(packages.train_files) & set(packages.val_files)
    val_bytes = sum(len(doc.read()) for doc in packages.val)
    assert val_bytes > 300_000 and len(packages.val) >= 4  # evaluation has 4 rows by default


def test_every_package_document_is_read_in_an_epoch_and_coverage_says_so(tmp_path):
    files = {f"p{i}/m{j}.py": bytes([97 + i]) * (50 + 37 * j) for i in range(5) for j in range(4)}
    files.update({f"top{i}.py": b"t%d\n" % i * 40 for i in range(6)})
    make_corpus(tmp_path, files)
    corpus = load_corpus(tmp_path, val_fraction=0, max_document_bytes=300)
    n = len(corpus.train)
    stream = DocumentStream(corpus.train, batch_size=3, seq_len=32, epochs=1)
    reader = RowReader(3, 32)
    tokens = 0
    for seg in stream:
        reader.feed(seg)
        tokens += int((seg.labels != PAD_ID).sum())
    read = collections.Counter(d for row in reader.done for d in row)
    assert read == collections.Counter(doc.read() for doc in corpus.train)
    coverage = stream.coverage()
    assert coverage == {"started": n, "tokens": tokens, "complete": coverage["complete"]}
    assert coverage["complete"] >= n  # every position of the epoch started
    endless = corpus.train_stream(batch_size=3, seq_len=32)
    assert endless.coverage() == {"started": 0, "tokens": 0, "complete": 0}
    next(endless)
    assert endless.coverage() == {"started": 3, "tokens": 96, "complete": 3}


def test_package_stream_resumes_exactly(tmp_path):
    files = {f"p{i}/m{j}.py": b"%d%d\n" % (i, j) * (20 + 9 * j) for i in range(4) for j in range(5)}
    make_corpus(tmp_path, files)
    corpus = load_corpus(tmp_path, val_fraction=0, max_document_bytes=256)
    reference = [next(s) for s in [corpus.train_stream(batch_size=2, seq_len=16, seed=4)]
                 for _ in range(120)]
    for k in (0, 7, 33, 90):
        stream = corpus.train_stream(batch_size=2, seq_len=16, seed=4)
        for _ in range(k):
            next(stream)
        state = json.loads(json.dumps(stream.state_dict()))
        resumed = load_corpus(tmp_path, val_fraction=0, max_document_bytes=256).train_stream(
            batch_size=2, seq_len=16, seed=4)
        resumed.load_state_dict(state)
        assert resumed.coverage() == stream.coverage()
        for want in reference[k:k + 30]:
            got = next(resumed)
            assert torch.equal(got.x, want.x) and torch.equal(got.reset, want.reset)
    other = load_corpus(tmp_path, val_fraction=0, max_document_bytes=512).train_stream(
        batch_size=2, seq_len=16, seed=4)
    with pytest.raises(CorpusError, match="corpus: saved"):
        other.load_state_dict(state)


def test_document_settings_are_checked():
    with pytest.raises(CorpusError, match="documents must be one of"):
        load_corpus(documents="repository")
    with pytest.raises(CorpusError, match="max_document_bytes must be a non-negative integer"):
        load_corpus(max_document_bytes=-1)
