"""Snapshots: one namespace of a ``MemoryStore`` in one file under the server's ``--data-dir``.

A snapshot is written to a temporary name in the same directory, fsynced, renamed over its final
name and the directory fsynced: a crash at any point leaves the previous snapshot of that name
whole (and at worst a stray ``.*.tmp-*`` file, which nothing reads). A snapshot is read and
verified completely (size, magic, version, checksum, header schema, array sizes) before anything
is handed to the store, so a corrupt, truncated or foreign file is refused with a
``SnapshotError`` naming the file and is never loaded half.

File ``<data-dir>/<namespace>@<tag>.snapshot``, all integers little-endian::

    magic        8 bytes   b"MTSNAP\\r\\n" (the CR LF catches text-mode copies, as in PNG)
    version      u32       FORMAT_VERSION
    header size  u32       h
    header       h bytes   msgpack map {"namespace": str, "tag": str, "created": float (unix s),
                           "config": NamespaceConfig map, "memories": [[layer, row, total, slots,
                           trained_at, centroids], ...]}
    padding      zeros up to a multiple of ALIGN from the start of the file
    keys         float32 (slots, dim) of each memory in header order, back to back
    values       value_dtype (slots, dim) of each memory in header order, back to back
    centroids    float32 (centroids, dim) of each memory in header order, back to back: a trained
                 ``ivf`` index's centroids, fitted when the memory held ``trained_at`` entries
                 (0 rows and 0 for other memories)
    checksum     32 bytes  BLAKE2b-256 of every byte before it

``slots`` is the allocated ring of the memory (``store.Memory.export``), so a restore is the same
ring, slot for slot, and the index is rebuilt from it (an ivf index under the same centroids, so
it gives the same results). Version 1 files (no centroids: ``[layer, row, total, slots]``) are
read. No pickle: the header is plain msgpack and the arrays are raw bytes whose dtypes and shapes
follow from the config.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from .errors import InvalidRequest, SnapshotError
from .store import VALUE_DTYPES, NamespaceConfig

MAGIC = b"MTSNAP\r\n"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ALIGN = 64
SUFFIX = ".snapshot"
_PREAMBLE = struct.Struct("<8sII")
_DIGEST_BYTES = 32
_MAX_HEADER_BYTES = 64 << 20
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """A snapshot file on disk."""

    namespace: str
    tag: str
    path: Path
    bytes: int
    mtime: float

    def to_dict(self) -> dict:
        return {"namespace": self.namespace, "tag": self.tag, "path": str(self.path),
                "bytes": self.bytes, "mtime": self.mtime}


def check_name(kind: str, name) -> str:
    """``name`` if it can be part of a file name as is; raises ``InvalidRequest`` otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidRequest(f"snapshot {kind} must be 1 to 128 letters, digits, '_', '-' or '.', "
                             f"not starting with '.' or '-' and without '..', got {name!r}")
    return name


def snapshot_path(data_dir: str | os.PathLike, namespace: str, tag: str) -> Path:
    return Path(data_dir) / f"{check_name('namespace', namespace)}@{check_name('tag', tag)}{SUFFIX}"


def write_snapshot(data_dir: str | os.PathLike, namespace: str, tag: str,
                   state: dict) -> SnapshotInfo:
    """Write ``state`` (``MemoryStore.export_namespace``) atomically; replaces a same-named one."""
    path = snapshot_path(data_dir, namespace, tag)
    config = NamespaceConfig.from_dict(state["config"])
    value_dtype = np.dtype(VALUE_DTYPES[config.value_dtype]).newbyteorder("<")
    keys = [np.ascontiguousarray(m["keys"], dtype=np.dtype("<f4")) for m in state["memories"]]
    values = [np.ascontiguousarray(m["values"], dtype=value_dtype) for m in state["memories"]]
    centroids = [np.ascontiguousarray(m["centroids"] if m.get("centroids") is not None
                                      else np.empty((0, config.dim)), dtype=np.dtype("<f4"))
                 for m in state["memories"]]
    header = msgpack.packb({
        "namespace": namespace, "tag": tag, "created": time.time(), "config": config.to_dict(),
        "memories": [[int(m["layer"]), int(m["row"]), int(m["total"]), k.shape[0],
                      int(m.get("trained_at", 0)), c.shape[0]]
                     for m, k, c in zip(state["memories"], keys, centroids)],
    }, use_bin_type=True)
    head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)) + header
    head += bytes(-len(head) % ALIGN)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    try:
        with open(tmp, "wb") as f:
            for chunk in (head, *keys, *values, *(c for c in centroids if c.size)):
                data = memoryview(chunk).cast("B")
                digest.update(data)
                f.write(data)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SnapshotError(f"cannot write snapshot {path}: {exc}") from None
    stat = path.stat()
    return SnapshotInfo(namespace, tag, path, stat.st_size, stat.st_mtime)


def read_snapshot(data_dir: str | os.PathLike, namespace: str, tag: str) -> dict:
    """The verified ``state`` of a snapshot, ready for ``MemoryStore.import_namespace``."""
    path = snapshot_path(data_dir, namespace, tag)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buffer = bytearray(size)
            got = f.readinto(buffer)
    except FileNotFoundError:
        raise SnapshotError(f"no snapshot {path}: namespace {namespace!r} was never snapshotted "
                            f"with tag {tag!r} in this data directory") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc}") from None
    if got != size:
        raise SnapshotError(f"snapshot {path}: read {got} of {size} bytes (changed while read)")
    return _parse(path, memoryview(buffer), namespace, tag)


def list_snapshots(data_dir: str | os.PathLike) -> list[SnapshotInfo]:
    """The snapshots in ``data_dir`` by name (not verified: reading them does that)."""
    found = []
    for path in sorted(Path(data_dir).glob(f"*@*{SUFFIX}")):
        namespace, _, tag = path.name[: -len(SUFFIX)].partition("@")
        if not (_NAME.fullmatch(namespace) and _NAME.fullmatch(tag)):
            continue
        try:
            stat = path.stat()
        except OSError:  # removed meanwhile
            continue
        found.append(SnapshotInfo(namespace, tag, path, stat.st_size, stat.st_mtime))
    return found


def _parse(path: Path, data: memoryview, namespace: str, tag: str) -> dict:
    def refuse(what: str) -> SnapshotError:
        return SnapshotError(f"snapshot {path} is refused: {what}; nothing was loaded")

    if data.nbytes < _PREAMBLE.size + _DIGEST_BYTES:
        raise refuse(f"it is {data.nbytes} bytes, shorter than any snapshot (truncated?)")
    magic, version, header_size = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise refuse(f"it does not start with the snapshot magic {MAGIC!r} (not a snapshot)")
    if version not in READABLE_VERSIONS:
        raise refuse(f"format version {version}; this server reads versions {READABLE_VERSIONS}")
    body, stored = data[:-_DIGEST_BYTES], bytes(data[-_DIGEST_BYTES:])
    if hashlib.blake2b(body, digest_size=_DIGEST_BYTES).digest() != stored:
        raise refuse("its checksum does not match its contents (corrupt or truncated)")
    if header_size > min(_MAX_HEADER_BYTES, body.nbytes - _PREAMBLE.size):
        raise refuse(f"header size {header_size} does not fit in the file")
    try:
        header = msgpack.unpackb(data[_PREAMBLE.size:_PREAMBLE.size + header_size], raw=False,
                                 strict_map_key=True, max_ext_len=0)
        config = NamespaceConfig.from_dict(header["config"])
        fields = 4 if version == 1 else 6
        if any(len(entry) != fields for entry in header["memories"]):
            raise ValueError(f"every memory entry of a version {version} file has {fields} fields")
        entries = [tuple(int(x) for x in entry) + ((0, 0) if version == 1 else ())
                   for entry in header["memories"]]
    except Exception as exc:  # msgpack errors, a missing key, a malformed entry, a bad config
        raise refuse(f"malformed header: {type(exc).__name__}: {exc}") from None
    if (header.get("namespace"), header.get("tag")) != (namespace, tag):
        raise refuse(f"it holds namespace {header.get('namespace')!r} tag {header.get('tag')!r}, "
                     f"not {namespace!r} {tag!r} as its name says (renamed?)")
    key_dtype = np.dtype("<f4")
    value_dtype = np.dtype(VALUE_DTYPES[config.value_dtype]).newbyteorder("<")
    offset = _PREAMBLE.size + header_size
    offset += -offset % ALIGN
    need = offset + config.dim * sum(slots * (key_dtype.itemsize + value_dtype.itemsize)
                                     + rows * key_dtype.itemsize
                                     for _, _, _, slots, _, rows in entries)
    if any(slots < 0 or rows < 0 for _, _, _, slots, _, rows in entries) or need != body.nbytes:
        raise refuse(f"its header describes {need} bytes of header and arrays, but the file has "
                     f"{body.nbytes}")
    memories = []
    for layer, row, total, slots, _, _ in entries:
        keys = np.frombuffer(body, key_dtype, slots * config.dim, offset).reshape(slots, config.dim)
        offset += keys.nbytes
        memories.append({"layer": layer, "row": row, "total": total, "keys": keys})
    for memory, (_, _, _, slots, _, _) in zip(memories, entries):
        memory["values"] = np.frombuffer(body, value_dtype, slots * config.dim,
                                         offset).reshape(slots, config.dim)
        offset += memory["values"].nbytes
    for memory, (_, _, _, _, trained_at, rows) in zip(memories, entries):
        if rows:  # the store checks their shape and trained_at against its config
            memory["centroids"] = np.frombuffer(body, key_dtype, rows * config.dim,
                                                offset).reshape(rows, config.dim)
            memory["trained_at"] = trained_at
            offset += memory["centroids"].nbytes
    return {"config": config.to_dict(), "memories": memories}


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
