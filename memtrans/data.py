"""Document streams: each batch row reads one long document, segment after segment.

This is how the Memorizing Transformer is trained (Wu et al. 2022, section 4): a row's kNN and
Transformer-XL memories hold the earlier part of the document that row is reading, so a row must
read its document in order, and its memories must be cleared when it moves on to the next one.

Tokens are bytes: byte ``b`` is token ``b + 3``; ``PAD_ID``, ``SOS_ID`` and ``EOS_ID`` are 0, 1, 2,
so ``NUM_TOKENS = 259``. A document of ``n`` bytes is the ``n + 2`` tokens ``SOS, bytes..., EOS``.

Corpora (``load_corpus``):

- a **directory**: its files, except hidden files and directories (name starting with ``.``),
  empty files, and binary files (a NUL byte in the first 8000 bytes, git's rule). A file whose
  name ends in ``.gz`` is read through gzip. ``documents`` says what a document is:

  - ``"package"`` (the default, the paper's repositories): a **package** is a top-level directory
    of the corpus with everything under it, or a single file at the top level. A directory's
    document is its files concatenated in sorted path order, each preceded by the separator line
    ``# ==== <path relative to the corpus root> ====`` (and followed by a line break if it has
    none), so the memory holds the sibling files a file imports and calls into. The top-level
    files are grouped: in sorted order, consecutive files join one document while it stays
    within ``max_document_bytes`` (a rule that keeps top-level modules in documents as long as
    the packages' pieces, and that needs no knowledge of what the files are). Generated data
    tables are left out (``GENERATED``: the stdlib's character-map codecs and the Sphinx dump in
    ``pydoc_data``): they are long, purely local and would crowd out the code.
  - ``"file"``: every file is one document (the corpus before packages existed).

  Documents longer than ``max_document_bytes`` (default 256 KiB; 0: no limit) are cut into
  pieces that become documents of their own: each ends at the last file separator in the second
  half of its window, else at the window's last line break, else at the window's end. The
  separators stay in the pieces (a piece that starts inside a file does not repeat its line).
- a **single file** (plain, or ``.gz``): cut into documents of at most ``chunk_bytes`` bytes, each
  ending at its window's last line break (or at the window's end if it has none). Any file works:
  splitting at a separator would leave a file without separators as one document, which only one
  row could read and none could validate on. The bytes are kept as given (no NUL check). A ``.gz``
  file cannot be read at an offset without decompressing what comes before, so a single-``.gz``
  corpus is decompressed into memory once per process; gunzip it to stream it from disk.
- **default** (no path): the ``*.py`` files of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``), leaving out ``site-packages``, ``dist-packages`` and the
  test directories (``test``, ``tests``, ``idle_test``): long code documents, like the paper's
  GitHub set, on every machine with Python.

The train / validation split is by **unit**: the package in ``"package"`` mode (all pieces of a
package and a top-level file's group on one side: whole packages go to validation), the file in
``"file"`` mode, the piece for a single file. A unit is in validation when the first 8 bytes of
the BLAKE2b hash of its name (the path relative to the corpus root, plus ``@offset`` for a piece
of a single file), read as a fraction of 2**64, are below ``val_fraction``. That is stable across
machines, Python runs and corpus growth (adding a file never moves another one). Top-level files
are split one by one, then grouped on each side.

Sharding (``DocumentStream``): with ``R = world_size * batch_size`` global rows, global row
``g = rank * batch_size + local_row`` reads documents number ``g, g + R, g + 2R, ...`` of an endless
sequence made of one shuffled copy of the corpus per epoch (the order of epoch ``e`` is fixed by
hashing ``(seed, e, document index)``). Every document is read exactly once per epoch, by one row,
and no two ranks share a document. A file is read when a row starts it, never earlier (package
documents are measured once at load to be cut). With documents cut at ``max_document_bytes``, a row
spends at most that many bytes of an epoch, about ``train bytes / R``, in one document.
``DocumentStream.coverage`` counts the documents started and the tokens read, for the log.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import mmap
import os
import re
import sys
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PAD_ID = 0
SOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3
"""Byte ``b`` is token ``b + BYTE_OFFSET``."""
NUM_TOKENS = 256 + BYTE_OFFSET

SNIFF_BYTES = 8000
"""A directory file with a NUL byte in its first this many bytes is binary: skipped (git's rule)."""
DEFAULT_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
"""Left out of the default corpus: installed packages are not the standard library, and test
directories hold deliberately odd files (bad encodings, NUL bytes) rather than ordinary code."""
DOCUMENT_KINDS = ("package", "file")
"""What a directory corpus's document is; see the module docstring."""
MAX_DOCUMENT_BYTES = 256 * 1024
"""Documents longer than this are cut: with the default 4 rows on the stdlib, about a tenth of
what a row reads in an epoch, and still 256K tokens of history for the longest memory."""
GENERATED = re.compile(rb'\A"""\s*Python Character Mapping Codec|Autogenerated by Sphinx')
"""A file whose first ``SNIFF_BYTES`` match this is a generated data table, left out of package
documents: the stdlib's character-map codecs (``encodings/cp1252.py`` ..., tables of 256 code
points made by gencodec.py) and ``pydoc_data/topics.py`` (757 KB of help text dumped by Sphinx)."""
SEPARATOR = "# ==== {} ====\n"
"""The line before each file of a package document, naming the file."""


class CorpusError(ValueError):
    """The corpus or a stream setting cannot be used; the message says which path and what to do."""


def encode(data: bytes) -> np.ndarray:
    """Bytes to int64 tokens (``b + 3``), without SOS/EOS."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET


def decode(tokens) -> bytes:
    """Tokens (array, tensor or sequence) back to bytes, dropping PAD/SOS/EOS."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= NUM_TOKENS):
        raise ValueError(f"tokens must be in [0, {NUM_TOKENS}), got values in "
                         f"[{tokens.min()}, {tokens.max()}]")
    return (tokens[tokens >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tobytes()


_READ_ERRORS = (OSError, EOFError, zlib.error)
"""What reading a (gzip) file raises; ``gzip.BadGzipFile`` is an ``OSError``."""


def _cannot_read(path: Path, exc: Exception) -> CorpusError:
    if isinstance(exc, (gzip.BadGzipFile, EOFError, zlib.error)):
        reason = f"not a valid gzip file ({exc})"
    else:
        reason = getattr(exc, "strerror", None) or str(exc)
    return CorpusError(f"cannot read corpus file {path}: {reason}")


@functools.lru_cache(maxsize=1)
def _gunzip(path: Path) -> bytes:
    """The decompressed bytes of a single-``.gz`` corpus (see the module docstring)."""
    return gzip.decompress(path.read_bytes())


@dataclass(frozen=True, slots=True)
class Document:
    """One document: a whole file, or the bytes ``[start, stop)`` of a (decompressed) file."""

    path: Path
    name: str
    """Stable identity (the path relative to the corpus root): decides the split and the
    fingerprint a saved stream position is checked against."""
    start: int = 0
    stop: int | None = None
    """``None``: to the end of the file."""

    @property
    def identity(self) -> str:
        """What a saved stream position is checked against."""
        return f"{self.name}\0{self.start}\0{self.stop}"

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.path,)

    def read(self) -> bytes:
        try:
            if self.path.name.endswith(".gz"):
                if self.stop is None:
                    return gzip.decompress(self.path.read_bytes())
                return _gunzip(self.path)[self.start:self.stop]
            if self.stop is None:
                return self.path.read_bytes()
            with self.path.open("rb") as f:
                f.seek(self.start)
                return f.read(self.stop - self.start)
        except _READ_ERRORS as exc:
            raise _cannot_read(self.path, exc) from None

    def tokens(self) -> np.ndarray:
        """``SOS, bytes..., EOS`` as int64 tokens."""
        return _framed(self.read())


def _framed(data: bytes) -> np.ndarray:
    return np.concatenate((np.array([SOS_ID]), encode(data), np.array([EOS_ID])), dtype=np.int64)


def _concatenate(files: Sequence[Document]) -> tuple[bytes, list[int]]:
    """Files as one package document (each after its separator line, ending in a line break),
    and where each file's separator starts."""
    parts, starts, size = [], [], 0
    for doc in files:
        data = doc.read()
        framed = SEPARATOR.format(doc.name).encode() + data + (b"" if data.endswith(b"\n")
                                                                 else b"\n")
        parts.append(framed)
        starts.append(size)
        size += len(framed)
    return b"".join(parts), starts


@dataclass(frozen=True, slots=True)
class PackageDocument:
    """Files of one package concatenated with separators (``_concatenate``), or the bytes
    ``[start, stop)`` of that: a piece holds only the files it overlaps, so reading it reads
    those, not the whole package."""

    files: tuple[Document, ...]
    name: str
    """The package (its directory, or ``first...last`` for grouped top-level files), plus
    ``@offset`` for a piece."""
    start: int = 0
    stop: int | None = None

    @property
    def identity(self) -> str:
        return "\0".join((self.name, str(self.start), str(self.stop),
                          *(doc.name for doc in self.files)))

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(doc.path for doc in self.files)

    def read(self) -> bytes:
        return _concatenate(self.files)[0][self.start:self.stop]

    def tokens(self) -> np.ndarray:
        """``SOS, bytes..., EOS`` as int64 tokens."""
        return _framed(self.read())


@dataclass(frozen=True, slots=True)
class Segment:
    """One step of a stream: ``seq_len`` tokens of each row's document.

    ``labels`` are the next tokens, ``PAD_ID`` where the document has ended (ignore them in the
    loss). ``reset[r]`` says row ``r`` starts a new document here: clear its kNN and XL memories
    before using this segment.
    """

    x: torch.Tensor
    """(batch, seq_len) int64 inputs."""
    labels: torch.Tensor
    """(batch, seq_len) int64 targets."""
    reset: torch.Tensor
    """(batch,) bool."""
    documents: tuple = ()
    """Per row, the document this segment is from (None for a row with nothing left)."""
    offsets: tuple[int, ...] = ()
    """Per row, the position in its document's tokens of this segment's first input."""


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    """Document indices in the order of one epoch: a hash sort, the same on every machine."""
    def key(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{epoch}:{i}".encode(), digest_size=8).digest()
    return tuple(sorted(range(n), key=key))


def _fingerprint(docs: Sequence[Document]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for doc in docs:
        h.update(f"{doc.identity}\n".encode())
    return h.hexdigest()


class DocumentStream(Iterator[Segment]):
    """Segments of ``seq_len`` tokens for this rank's ``batch_size`` rows; see the module docstring.

    ``epochs=None`` streams forever. With ``epochs=k`` each document is read ``k`` times in all, a
    row with nothing left is all ``PAD_ID`` (``reset`` false), and iteration stops once every row of
    this rank is done (ranks may stop at different steps).

    ``repeat = f``: a document is read in spans of ``repeat_span`` tokens (a multiple of
    ``seq_len``; 0: the whole document), and each span is, with probability ``f`` (fixed by the
    seed and its place), read a second time right after the first, without ``reset``: the second
    read finds the first in the row's memories, as the repeat probe's does
    (``memtrans.evaluate``). A span no longer than the kNN memory is all in it. A corpus rarely
    repeats a passage exactly, so without this training seldom rewards copying what the kNN
    memory returns.

    ``state_dict()`` is the position after the last segment returned (plain ints, JSON-safe);
    ``load_state_dict`` on a stream built with the same documents and settings continues exactly.
    """

    def __init__(self, docs: Sequence[Document | str | os.PathLike], *, batch_size: int,
                 seq_len: int = 512, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epochs: int | None = None, repeat: float = 0.0, repeat_span: int = 0):
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                            ("world_size", world_size)):
            if not isinstance(value, int) or value < 1:
                raise CorpusError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise CorpusError(f"rank must be in [0, {world_size}), got {rank!r}")
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise CorpusError(f"epochs must be a positive integer or None, got {epochs!r}")
        if not 0 <= repeat <= 1:
            raise CorpusError(f"repeat must be a probability in [0, 1], got {repeat!r}")
        if not isinstance(repeat_span, int) or repeat_span < 0 or repeat_span % seq_len:
            raise CorpusError(f"repeat_span must be a multiple of seq_len={seq_len} tokens (0: "
                              f"whole documents), got {repeat_span!r}")
        self.docs = tuple(Document(Path(d), str(d)) if isinstance(d, (str, os.PathLike)) else d
                          for d in docs)
        self.batch_size, self.seq_len, self.seed, self.epochs = batch_size, seq_len, seed, epochs
        self.repeat, self.repeat_span = repeat, repeat_span
        self.rank, self.world_size = rank, world_size
        self.num_rows = world_size * batch_size
        """Global rows ``R``: row ``g`` reads documents ``g, g + R, g + 2R, ...``."""
        if len(self.docs) < self.num_rows:
            raise CorpusError(f"{len(self.docs)} documents cannot feed {self.num_rows} rows "
                              f"(world_size {world_size} x batch_size {batch_size}): every row "
                              f"needs a document of its own; use fewer rows or more documents")
        self._fingerprint = _fingerprint(self.docs)
        self._started = [0] * batch_size
        """Documents each local row has started; its current one is number ``started - 1``."""
        self._offset = [0] * batch_size
        """Next input position in the current document's tokens."""
        self._span = [0] * batch_size
        """Where the current span of a local row's document starts (``repeat``)."""
        self._second = [False] * batch_size
        """Whether the current read of that span is its repeat."""
        self._tokens: list[np.ndarray | None] = [None] * batch_size
        self._tokens_read = 0
        """Labelled tokens (targets) this rank's rows have been given, for ``coverage``."""

    def _document(self, row: int, j: int) -> Document | None:
        """The ``j``-th document of local ``row``, or ``None`` past the last epoch."""
        n = len(self.docs)
        position = self.rank * self.batch_size + row + j * self.num_rows
        epoch = position // n
        if self.epochs is not None and epoch >= self.epochs:
            return None
        return self.docs[_epoch_order(self.seed, epoch, n)[position % n]]

    def _repeats(self, row: int) -> bool:
        """Whether local ``row``'s current span is read twice."""
        if not self.repeat or self._second[row]:
            return False
        position = self.rank * self.batch_size + row + (self._started[row] - 1) * self.num_rows
        span = self._span[row] // self.repeat_span if self.repeat_span else 0
        return bool(np.random.default_rng([self.seed, position, span]).random() < self.repeat)

    def _span_ended(self, row: int, length: int) -> bool:
        offset = self._offset[row]
        return offset >= length - 1 or (
            self.repeat_span > 0 and offset - self._span[row] >= self.repeat_span)

    def __next__(self) -> Segment:
        b, length = self.batch_size, self.seq_len
        x = np.full((b, length), PAD_ID, dtype=np.int64)
        labels = np.full((b, length), PAD_ID, dtype=np.int64)
        reset = np.zeros(b, dtype=bool)
        documents, offsets = [None] * b, [0] * b
        for row in range(b):
            tokens = self._tokens[row]
            if tokens is not None and self._span_ended(row, len(tokens)):
                if self._repeats(row):  # the span again, its first read in memory
                    self._offset[row], self._second[row] = self._span[row], True
                else:
                    self._span[row], self._second[row] = self._offset[row], False
            if tokens is None or self._offset[row] >= len(tokens) - 1:
                doc = self._document(row, self._started[row])
                if doc is None:
                    continue
                tokens = self._tokens[row] = doc.tokens()
                self._started[row] += 1
                self._offset[row] = self._span[row] = 0
                self._second[row] = False
                reset[row] = True
            start = self._offset[row]
            documents[row], offsets[row] = self._document(row, self._started[row] - 1), start
            k = min(length, len(tokens) - 1 - start)
            x[row, :k] = tokens[start:start + k]
            labels[row, :k] = tokens[start + 1:start + 1 + k]
            self._offset[row] = start + k
            self._tokens_read += k
        if not (labels[:, 0] != PAD_ID).any():  # a row with a document has at least one label
            raise StopIteration
        return Segment(torch.from_numpy(x), torch.from_numpy(labels), torch.from_numpy(reset),
                       tuple(documents), tuple(offsets))

    def coverage(self) -> dict:
        """How far this rank's rows are through the corpus, for the log (sum ``started`` and
        ``tokens`` over ranks, take the minimum of ``complete``):

        - ``started``: documents the rows have started (a document read in two epochs counts
          twice);
        - ``complete``: the first position of the epoch sequence that no row has started: every
          document before it has been started, so ``complete / len(docs)`` is the share of
          epochs covered;
        - ``tokens``: tokens read (the labels given).
        """
        return {"started": sum(self._started), "tokens": self._tokens_read,
                "complete": min(self.rank * self.batch_size + row + j * self.num_rows
                                for row, j in enumerate(self._started))}

    def _settings(self) -> dict:
        settings = {"corpus": self._fingerprint, "batch_size": self.batch_size,
                    "seq_len": self.seq_len, "rank": self.rank, "world_size": self.world_size,
                    "seed": self.seed, "epochs": self.epochs}
        if self.repeat:  # streams from before repeats have neither
            settings.update(repeat=self.repeat, repeat_span=self.repeat_span)
        return settings

    def state_dict(self) -> dict:
        return {**self._settings(), "started": list(self._started), "offset": list(self._offset),
                "span": list(self._span), "second": list(self._second),
                "tokens_read": self._tokens_read}

    def load_state_dict(self, state: dict) -> None:
        settings = self._settings()
        changed = [f"{key}: saved {state.get(key)!r}, now {value!r}"
                   for key, value in settings.items() if state.get(key) != value]
        if changed:
            raise CorpusError("the saved data position belongs to a different stream ("
                              + "; ".join(changed) + "); resume with the same corpus and settings")
        self._started = [int(j) for j in state["started"]]
        self._offset = [int(o) for o in state["offset"]]
        self._span = [int(s) for s in state.get("span", [0] * self.batch_size)]
        self._second = [bool(s) for s in state.get("second", [False] * self.batch_size)]
        self._tokens_read = int(state.get("tokens_read", 0))  # older positions: from here on
        self._tokens = [self._document(row, j - 1).tokens() if j else None
                        for row, j in enumerate(self._started)]


def _in_validation(name: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


class DocumentStreams:
    """The training and validation streams of a corpus's ``train`` and ``val`` documents."""

    __slots__ = ()

    def train_stream(self, *, batch_size: int, seq_len: int = 512, rank: int = 0,
                     world_size: int = 1, seed: int = 0, repeat: float = 0.0,
                     repeat_span: int = 0) -> DocumentStream:
        """Endless training segments, reshuffled every epoch (``repeat``: ``DocumentStream``)."""
        return DocumentStream(self.train, batch_size=batch_size, seq_len=seq_len, rank=rank,
                              world_size=world_size, seed=seed, repeat=repeat,
                              repeat_span=repeat_span)

    def val_stream(self, *, batch_size: int, seq_len: int = 512, rank: int = 0,
                   world_size: int = 1) -> DocumentStream:
        """One pass over the validation documents, the same segments at every evaluation."""
        rows = world_size * batch_size
        if len(self.val) < rows:
            raise CorpusError(self.too_few_for_validation(rows))
        return DocumentStream(self.val, batch_size=batch_size, seq_len=seq_len, rank=rank,
                              world_size=world_size, seed=0, epochs=1)


@dataclass(frozen=True, kw_only=True, slots=True)
class Corpus(DocumentStreams):
    """The documents of a corpus, split into train and validation (see the module docstring)."""

    root: Path
    train: tuple[Document, ...]
    val: tuple[Document, ...]
    val_fraction: float
    description: str
    """One line for logs: what the corpus is, how big, how it was split."""

    @property
    def train_files(self) -> list[Path]:
        return list(dict.fromkeys(path for doc in self.train for path in doc.paths))

    @property
    def val_files(self) -> list[Path]:
        return list(dict.fromkeys(path for doc in self.val for path in doc.paths))

    def too_few_for_validation(self, rows: int) -> str:
        return (f"{self.root}: the validation split has {len(self.val)} documents but evaluation "
                f"uses {rows} rows (world_size x batch_size); raise val_fraction (now "
                f"{self.val_fraction}) or evaluate with fewer rows")


def _sniff(path: Path) -> bytes:
    """The first ``SNIFF_BYTES`` bytes of a directory file (decompressed if ``.gz``)."""
    try:
        with path.open("rb") as f:
            if path.name.endswith(".gz"):
                with gzip.GzipFile(fileobj=f) as g:
                    return g.read(SNIFF_BYTES)
            return f.read(SNIFF_BYTES)
    except _READ_ERRORS as exc:
        raise _cannot_read(path, exc) from None


def _scan_directory(root: Path, *, suffix: str = "", excluded_dirs: frozenset[str] = frozenset(),
                    skip_generated: bool = False) -> list[Document]:
    """Every non-hidden, non-empty, non-binary regular file under ``root`` ending in ``suffix``
    (and, with ``skip_generated``, not a ``GENERATED`` data table)."""
    def fail(exc: OSError):
        raise CorpusError(f"cannot list corpus directory {exc.filename}: {exc.strerror}")

    docs, skipped = [], {"empty": 0, "binary": 0, "generated": 0}
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in excluded_dirs]
        for filename in filenames:
            path = Path(dirpath, filename)
            if filename.startswith(".") or not filename.endswith(suffix) or not path.is_file():
                continue
            head = _sniff(path)
            if not head or b"\0" in head:
                skipped["empty" if not head else "binary"] += 1
                continue
            if skip_generated and GENERATED.search(head):
                skipped["generated"] += 1
                continue
            docs.append(Document(path, path.relative_to(root).as_posix()))
    if not docs:
        kind = f"{suffix} files" if suffix else "files"
        raise CorpusError(f"no documents in corpus directory {root}: no readable {kind} with text "
                          f"({skipped['empty']} empty, {skipped['binary']} binary and "
                          f"{skipped['generated']} generated files skipped); point the corpus "
                          f"at a directory of text files")
    return sorted(docs, key=lambda doc: doc.name)


def _cut(data, start: int, stop: int, size: int, boundaries: Sequence[int] = ()) -> int:
    """Where the piece ``[start, ...)`` ends, at most ``stop``: the last boundary (file separator)
    in the second half of the window, else the last line break, else ``stop``."""
    if stop >= size:
        return size
    inside = [b for b in boundaries if start + (stop - start) // 2 < b <= stop]
    if inside:
        return inside[-1]
    return data.rfind(b"\n", start, stop) + 1 or stop


def _split_file(path: Path, chunk_bytes: int, name: str | None = None) -> list[Document]:
    """A file cut into pieces of at most ``chunk_bytes``, each ending at a line break; pieces are
    named ``<name>@<offset>`` (``name``: the file's name)."""
    name = path.name if name is None else name
    def pieces(data) -> list[Document]:
        docs, start, size = [], 0, len(data)
        while start < size:
            stop = _cut(data, start, min(start + chunk_bytes, size), size)
            docs.append(Document(path, f"{name}@{start}", start, stop))
            start = stop
        return docs

    try:
        if path.name.endswith(".gz"):
            docs = pieces(_gunzip(path))
        elif path.stat().st_size == 0:
            docs = []
        else:
            with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                docs = pieces(data)
    except _READ_ERRORS as exc:
        raise _cannot_read(path, exc) from None
    if not docs:
        raise CorpusError(f"corpus file {path} is empty: no documents to train on")
    return docs


def _package_pieces(files: Sequence[Document], name: str,
                    max_bytes: int) -> list[PackageDocument]:
    """One package document, or its pieces of at most ``max_bytes`` (0: no limit)."""
    data, starts = _concatenate(files)
    if not max_bytes or len(data) <= max_bytes:
        return [PackageDocument(tuple(files), name)]
    pieces, start = [], 0
    while start < len(data):
        stop = _cut(data, start, min(start + max_bytes, len(data)), len(data), starts[1:])
        first = max(i for i, s in enumerate(starts) if s <= start)
        last = max(i for i, s in enumerate(starts) if s < stop)
        base = starts[first]
        pieces.append(PackageDocument(tuple(files[first:last + 1]), f"{name}@{start}",
                                      start - base, stop - base))
        start = stop
    return pieces


def _framed_size(doc: Document) -> int:
    return len(_concatenate([doc])[0])


def _package_documents(files: Sequence[Document], max_bytes: int) -> list[PackageDocument]:
    """One document per top-level directory (cut at ``max_bytes``), and the top-level files
    grouped in sorted runs that stay within ``max_bytes`` (a longer file alone, cut)."""
    packages: dict[str, list[Document]] = {}
    top, group, group_bytes = [], [], 0
    for doc in files:  # sorted by name
        if "/" in doc.name:
            packages.setdefault(doc.name.split("/", 1)[0], []).append(doc)
            continue
        size = _framed_size(doc)
        if group and max_bytes and group_bytes + size > max_bytes:
            top.append(group)
            group, group_bytes = [], 0
        group.append(doc)
        group_bytes += size
    if group:
        top.append(group)
    docs = []
    for name, members in packages.items():
        docs += _package_pieces(members, name, max_bytes)
    for members in top:
        name = members[0].name if len(members) == 1 else f"{members[0].name}...{members[-1].name}"
        docs += _package_pieces(members, name, max_bytes)
    return sorted(docs, key=lambda doc: doc.name)


def _file_documents(files: Sequence[Document], max_bytes: int) -> list[Document]:
    """Each file a document; with ``max_bytes``, a longer one cut into pieces at line breaks."""
    docs = []
    for doc in files:
        if max_bytes:  # a .gz file's length is known only once decompressed
            size = len(doc.read()) if doc.path.name.endswith(".gz") else doc.path.stat().st_size
            if size > max_bytes:
                docs += _split_file(doc.path, max_bytes, doc.name)
                continue
        docs.append(doc)
    return docs


def _split_directory(files: Sequence[Document], documents: str, val_fraction: float,
                     max_bytes: int) -> tuple[list, list]:
    """Train and validation documents of a directory: units (packages or files) are split by
    name first, then made into documents on each side, so no unit has pieces on both."""
    unit = (lambda doc: doc.name.split("/", 1)[0]) if documents == "package" else \
        (lambda doc: doc.name)
    make = _package_documents if documents == "package" else _file_documents
    val = [doc for doc in files if _in_validation(unit(doc), val_fraction)]
    train = [doc for doc in files if not _in_validation(unit(doc), val_fraction)]
    return make(train, max_bytes), make(val, max_bytes)


def load_corpus(path: str | os.PathLike | None = None, *, val_fraction: float = 0.1,
                chunk_bytes: int = 65536, documents: str = "package",
                max_document_bytes: int = MAX_DOCUMENT_BYTES) -> Corpus:
    """A directory, a single (``.gz``) file, or by default the Python standard library's sources;
    ``documents`` and ``max_document_bytes`` apply to directories (see the module docstring).

    Raises ``CorpusError`` naming the path for a missing or unreadable corpus, one with no
    documents, or a split that leaves train or validation empty.
    """
    if not 0 <= val_fraction < 1:
        raise CorpusError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise CorpusError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
    if documents not in DOCUMENT_KINDS:
        raise CorpusError(f"documents must be one of {DOCUMENT_KINDS}, got {documents!r}")
    if not isinstance(max_document_bytes, int) or max_document_bytes < 0:
        raise CorpusError(f"max_document_bytes must be a non-negative integer (0: no limit), got "
                          f"{max_document_bytes!r}")
    skip_generated = documents == "package"
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        what = f"Python {sys.version_info.major}.{sys.version_info.minor} standard library"
        if not root.is_dir():
            raise CorpusError(f"the default corpus, the standard library at {root}, is not a "
                              f"directory here; pass a corpus path")
        files = _scan_directory(root, suffix=".py", excluded_dirs=DEFAULT_EXCLUDED_DIRS,
                                skip_generated=skip_generated)
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise CorpusError(f"corpus path {root} does not exist")
        if root.is_dir():
            what, files = "directory", _scan_directory(root, skip_generated=skip_generated)
        elif root.is_file():
            what, files = "file", None
        else:
            raise CorpusError(f"corpus path {root} is neither a regular file nor a directory")
    if files is None:
        docs = _split_file(root, chunk_bytes)
        val = tuple(doc for doc in docs if _in_validation(doc.name, val_fraction))
        train = tuple(doc for doc in docs if not _in_validation(doc.name, val_fraction))
    else:
        train, val = map(tuple, _split_directory(files, documents, val_fraction,
                                                 max_document_bytes))
        docs = train + val
        what += f", {documents} documents" + (f" of at most {max_document_bytes} bytes"
                                              if max_document_bytes else "")
    if not train:
        raise CorpusError(f"{root}: all {len(docs)} documents fell in the validation split; "
                          f"lower val_fraction (now {val_fraction})")
    if val_fraction > 0 and not val:
        raise CorpusError(f"{root}: none of its {len(docs)} documents fell in the validation "
                          f"split; raise val_fraction (now {val_fraction}), add documents, or set "
                          f"val_fraction=0 to train without validation")
    description = (f"{what} {root}: {len(docs)} documents, {len(train)} train / {len(val)} "
                   f"validation (val_fraction {val_fraction})")
    return Corpus(root=root, train=train, val=val, val_fraction=val_fraction,
                  description=description)
