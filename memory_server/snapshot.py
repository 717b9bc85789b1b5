"""Snapshots: one namespace of a ``MemoryStore`` in one file under the server's ``--data-dir``.

A snapshot is written to a temporary name in the same directory, fsynced, renamed over its final
name and the directory fsynced: a crash at any point leaves the previous snapshot of that name
whole (and at worst a stray ``.*.tmp-*`` file, which nothing reads). A snapshot is read and
verified completely (size, magic, version, header schema, array sizes, checksum) before anything
is handed to the store, so a corrupt, truncated or foreign file is refused with a
``SnapshotError`` naming the file and is never loaded half.

Streamed: a snapshot is written one memory at a time (each copied under its lock, written, let
go) and read straight into the arrays the restored memories keep, so neither holds a second copy
of the namespace: a snapshot costs the server one memory on top of its store, a restore the
namespace it loads (``bench/snapshot.py``). Before an array is allocated, the bytes it needs must
still be in the file, so a forged header cannot make a restore allocate more than the file holds.
Admitted: a restore first reads only the header and the memories' records (seeking past their
arrays) and lets the server book what they describe against ``--max-bytes`` and the tenant's
quota, so a snapshot too large for the server is refused before its arrays are allocated.

Keyed: with a snapshot key (``--snapshot-key-file``) the checksum is a MAC, BLAKE2b keyed with it
(BLAKE2's keyed mode, which needs no HMAC construction around it), so a file changed by anyone
without the key, or written under another key, is refused at restore; without one it is plain
BLAKE2b, which catches corruption but not a deliberate change. A server with a key refuses
snapshots written without one (format 1 and 2 files included), and says so; one without a key
refuses keyed snapshots, naming the key they need by its id.

File ``<data-dir>/<namespace>@<tag>.snapshot``, all integers little-endian::

    magic        8 bytes   b"MTSNAP\\r\\n" (the CR LF catches text-mode copies, as in PNG)
    version      u32       FORMAT_VERSION
    header size  u32       h
    header       h bytes   msgpack map {"namespace": str, "tag": str, "created": float (unix s),
                           "config": NamespaceConfig map, "memories": count, "mac": MAC_PLAIN or
                           MAC_KEYED, "key_id": hex id of the key or None}
    padding      zeros up to a multiple of ALIGN from the start of the file
    memories     count records, each: layer, row, total, slots, trained_at, centroids as i64
                 (RECORD), then its keys key_dtype (slots, dim), values value_dtype (slots, dim)
                 and centroids float32 (centroids, dim): a trained ``ivf`` index's, fitted when
                 the memory held ``trained_at`` entries (0 rows and 0 for other memories; with
                 float16 keys 2 rows more, its 8-bit ranges: ``IVFIndex.state``)
    checksum     32 bytes  BLAKE2b-256 of every byte before it, keyed with the snapshot key if any

``slots`` is the allocated ring of the memory (``store.Memory.export``), so a restore is the same
ring, slot for slot, and the index is rebuilt from it (an ivf index under the same centroids, so
it gives the same results). Versions 1 and 2 (every memory's keys, then every memory's values,
then the centroids, described in the header; version 1 without centroids) are read, unkeyed.
No pickle: the header is plain msgpack and the arrays are raw bytes whose dtypes and shapes
follow from the config (a config without ``key_dtype``, as every file before it, has float32
keys).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
import struct
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from .errors import InvalidRequest, SnapshotError
from .store import KEY_DTYPES, VALUE_DTYPES, NamespaceConfig

MAGIC = b"MTSNAP\r\n"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
ALIGN = 64
SUFFIX = ".snapshot"
MAC_PLAIN = "blake2b-256"
MAC_KEYED = "blake2b-256-keyed"
RECORD = struct.Struct("<6q")
"""A memory's layer, row, total, slots, trained_at and centroid rows, before its arrays."""
KEY_ENV = "MEMORY_SERVER_SNAPSHOT_KEY_FILE"
"""The default of the server's ``--snapshot-key-file``."""
MIN_KEY_BYTES = 16
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


@dataclass(frozen=True, slots=True)
class SnapshotKey:
    """The key of snapshot MACs, derived from a key file's bytes, and its public id."""

    secret: bytes
    id: str

    @classmethod
    def from_bytes(cls, material: bytes) -> SnapshotKey:
        secret = hashlib.blake2b(material, digest_size=32, person=b"memtrans-snapkey").digest()
        return cls(secret, hashlib.blake2b(secret, digest_size=8,
                                           person=b"memtrans-keyid").hexdigest())


def read_key_file(path: str | os.PathLike) -> SnapshotKey:
    """The snapshot key in ``path`` (any bytes, at least ``MIN_KEY_BYTES``); refuses a file other
    users can read, as a token file."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        material = path.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"--snapshot-key-file {path}: cannot read it: "
                         f"{exc.strerror or exc}") from None
    if mode & 0o077:
        raise ValueError(f"--snapshot-key-file {path} can be read by other users (mode "
                         f"{mode:04o}): run chmod 600 {path}")
    if len(material) < MIN_KEY_BYTES:
        raise ValueError(f"--snapshot-key-file {path} holds {len(material)} bytes; a key needs "
                         f"at least {MIN_KEY_BYTES}: make one with `head -c 32 /dev/urandom | "
                         f"base64 > {path}`")
    return SnapshotKey.from_bytes(material)


def _hasher(key: SnapshotKey | None):
    return hashlib.blake2b(digest_size=_DIGEST_BYTES, key=key.secret if key else b"")


def check_name(kind: str, name) -> str:
    """``name`` if it can be part of a file name as is; raises ``InvalidRequest`` otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidRequest(f"snapshot {kind} must be 1 to 128 letters, digits, '_', '-' or '.', "
                             f"not starting with '.' or '-' and without '..', got {name!r}")
    return name


def snapshot_path(data_dir: str | os.PathLike, namespace: str, tag: str) -> Path:
    return Path(data_dir) / f"{check_name('namespace', namespace)}@{check_name('tag', tag)}{SUFFIX}"


def write_snapshot(data_dir: str | os.PathLike, namespace: str, tag: str, config: dict,
                   count: int, memories: Iterable[dict],
                   key: SnapshotKey | None = None) -> SnapshotInfo:
    """Write a namespace's ``config`` and its ``count`` ``memories`` (``MemoryStore.
    export_stream``: each exported only when reached) atomically, MACed with ``key`` if given;
    replaces a same-named one."""
    path = snapshot_path(data_dir, namespace, tag)
    config = NamespaceConfig.from_dict(config)
    header = msgpack.packb({
        "namespace": namespace, "tag": tag, "created": time.time(), "config": config.to_dict(),
        "memories": count, "mac": MAC_KEYED if key else MAC_PLAIN,
        "key_id": key.id if key else None,
    }, use_bin_type=True)
    head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)) + header
    head += bytes(-len(head) % ALIGN)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    digest = _hasher(key)

    try:
        with open(tmp, "wb") as f:
            def write(chunk) -> None:
                data = memoryview(chunk).cast("B")
                digest.update(data)
                f.write(data)

            write(head)
            written = 0
            for memory in memories:
                _write_memory(write, memory, config)
                written += 1
                del memory  # its copy goes before the next memory is exported
            if written != count:
                raise SnapshotError(f"cannot write snapshot {path}: {written} memories were "
                                    f"exported, not the {count} announced")
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SnapshotError(f"cannot write snapshot {path}: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    info = path.stat()
    return SnapshotInfo(namespace, tag, path, info.st_size, info.st_mtime)


def _write_memory(write, memory: dict, config: NamespaceConfig) -> None:
    """One memory's record and arrays."""
    key_dtype, value_dtype = _dtypes(config)
    keys = np.ascontiguousarray(memory["keys"], dtype=key_dtype)
    values = np.ascontiguousarray(memory["values"], dtype=value_dtype)
    centroids = memory.get("centroids")
    centroids = np.ascontiguousarray(
        centroids if centroids is not None else np.empty((0, config.dim)), dtype="<f4")
    write(RECORD.pack(int(memory["layer"]), int(memory["row"]), int(memory["total"]),
                      keys.shape[0], int(memory.get("trained_at", 0)), centroids.shape[0]))
    for array in (keys, values, centroids):
        if array.size:
            write(array)


Admit = Callable[[NamespaceConfig, list[int]], None]
"""Told a snapshot's config and every memory's slot count before any array is read; raises to
refuse the restore (the server books the bytes against ``--max-bytes`` and quotas)."""


def _arrays_bytes(config: NamespaceConfig, slots: int, rows: int) -> int:
    """The bytes of a memory's arrays: keys and values of ``slots`` slots, ``rows`` centroids."""
    key_dtype, value_dtype = _dtypes(config)
    return config.dim * (slots * (key_dtype.itemsize + value_dtype.itemsize) + rows * 4)


def read_snapshot(data_dir: str | os.PathLike, namespace: str, tag: str,
                  key: SnapshotKey | None = None, admit: Admit | None = None) -> dict:
    """The verified ``state`` of a snapshot, ready for ``MemoryStore.import_namespace``; with
    ``key``, only a snapshot MACed with it is accepted. ``admit`` sees the config and the slots
    of each memory (from the header and the memories' records, seeking past their arrays)
    before anything large is read or allocated, so a snapshot too large for the server is
    refused at the cost of its records; the arrays read are then exactly those admitted."""
    path = snapshot_path(data_dir, namespace, tag)
    try:
        with open(path, "rb") as f:
            return _Reader(path, f, namespace, tag, key, admit).read()
    except FileNotFoundError:
        raise SnapshotError(f"no snapshot {path}: namespace {namespace!r} was never snapshotted "
                            f"with tag {tag!r} in this data directory") from None
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc}") from None


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


class _Reader:
    """Reads and verifies one open snapshot file: its preamble and header, then (format 3) each
    memory straight into the arrays it will keep, hashing as it goes, and the checksum last."""

    def __init__(self, path: Path, f, namespace: str, tag: str, key: SnapshotKey | None,
                 admit: Admit | None = None):
        self.path, self.f, self.namespace, self.tag, self.key = path, f, namespace, tag, key
        self.admit = admit
        # Each memory's slots and centroid rows as admitted: the reading pass must find them.
        self.admitted: list[tuple[int, int]] | None = None
        self.size = os.fstat(f.fileno()).st_size
        self.offset = 0
        self.digest = _hasher(key)

    def refuse(self, what: str) -> SnapshotError:
        return SnapshotError(f"snapshot {self.path} is refused: {what}; nothing was loaded")

    def read(self) -> dict:
        if self.size < _PREAMBLE.size + _DIGEST_BYTES:
            raise self.refuse(f"it is {self.size} bytes, shorter than any snapshot (truncated?)")
        preamble = self._take(_PREAMBLE.size)
        magic, version, header_size = _PREAMBLE.unpack(preamble)
        if magic != MAGIC:
            raise self.refuse(f"it does not start with the snapshot magic {MAGIC!r} (not a "
                              f"snapshot)")
        if version not in READABLE_VERSIONS:
            raise self.refuse(f"format version {version}; this server reads versions "
                              f"{READABLE_VERSIONS}")
        if version < 3:
            return self._legacy(preamble, version)
        if header_size > min(_MAX_HEADER_BYTES, self._left()):
            raise self.refuse(f"header size {header_size} does not fit in the file")
        try:
            header = msgpack.unpackb(self._take(header_size), raw=False, strict_map_key=True,
                                     max_ext_len=0)
            config = NamespaceConfig.from_dict(header["config"])
            count, mac, key_id = header["memories"], header["mac"], header["key_id"]
            if not isinstance(count, int) or count < 0 or mac not in (MAC_PLAIN, MAC_KEYED):
                raise ValueError(f"memories {count!r:.40}, mac {mac!r:.40}")
        except Exception as exc:  # msgpack errors, a missing key, a bad count, a bad config
            raise self.refuse(f"malformed header: {type(exc).__name__}: {exc}") from None
        self._check_names(header)
        self._check_key(mac, key_id)
        self._take(-self.offset % ALIGN)
        if self.admit is not None:
            self.admitted = self._records(config, count)
            self.admit(config, [slots for slots, _ in self.admitted])
        memories = [self._memory(config, i) for i in range(count)]
        if self._left():
            raise self.refuse(f"{self._left()} bytes follow the last of its {count} memories")
        if not hmac.compare_digest(self.digest.digest(), self._exactly(_DIGEST_BYTES)):
            raise self.refuse(
                "its MAC does not match its contents under this server's snapshot key: it was "
                "changed after it was written (tampered with, corrupt or truncated)" if self.key
                else "its checksum does not match its contents (corrupt or truncated)")
        return {"config": config.to_dict(), "memories": memories}

    def _check_names(self, header: dict) -> None:
        if (header.get("namespace"), header.get("tag")) != (self.namespace, self.tag):
            raise self.refuse(f"it holds namespace {header.get('namespace')!r} tag "
                              f"{header.get('tag')!r}, not {self.namespace!r} {self.tag!r} as "
                              f"its name says (renamed?)")

    def _check_key(self, mac: str, key_id) -> None:
        """Refuse at once what the header says was written under another key, or none."""
        if self.key is not None and mac != MAC_KEYED:
            raise self.refuse(
                "its header says it was written without a snapshot key, and this server "
                "(--snapshot-key-file) accepts only snapshots MACed with its key: anyone who can "
                "write to the data directory could have written one without")
        if self.key is None and mac == MAC_KEYED:
            raise self.refuse(f"it was written with snapshot key {key_id!r:.40}: start this "
                              f"server with that key (--snapshot-key-file) to restore it")
        if self.key is not None and key_id != self.key.id:
            raise self.refuse(f"it was written with snapshot key {key_id!r:.40}, not with this "
                              f"server's ({self.key.id!r}; --snapshot-key-file)")

    def _memory(self, config: NamespaceConfig, i: int) -> dict:
        if self._left() < RECORD.size:
            raise self.refuse(f"it ends before memory {i} (truncated?)")
        layer, row, total, slots, trained_at, rows = RECORD.unpack(self._take(RECORD.size))
        key_dtype, value_dtype = _dtypes(config)
        self._check_record(config, i, slots, rows, self._left())
        if self.admitted is not None and (slots, rows) != self.admitted[i]:
            raise self.refuse(f"memory {i} claims {slots} slots and {rows} centroids, not the "
                              f"{self.admitted[i]} admitted (changed while read)")
        memory = {"layer": layer, "row": row, "total": total,
                  "keys": self._array((slots, config.dim), key_dtype),
                  "values": self._array((slots, config.dim), value_dtype)}
        if rows:  # the store checks their shape and trained_at against its config
            memory["centroids"] = self._array((rows, config.dim), np.dtype("<f4"))
            memory["trained_at"] = trained_at
        return memory

    def _check_record(self, config: NamespaceConfig, i: int, slots: int, rows: int,
                      left: int) -> int:
        """The bytes of memory ``i``'s arrays; refuses a record claiming more than are ``left``."""
        need = _arrays_bytes(config, slots, rows)
        if slots < 0 or rows < 0 or need > left:
            raise self.refuse(f"memory {i} claims {slots} slots and {rows} centroids, "
                              f"{need} bytes, and {left} are left in the file (truncated?)")
        return need

    def _records(self, config: NamespaceConfig, count: int) -> list[tuple[int, int]]:
        """Every memory's slots and centroid rows, read by seeking from record to record (not
        hashed: the reading pass hashes them, and checks they are the same)."""
        start = end = self.offset
        found = []
        for i in range(count):
            left = self._left() - (end - start)
            if left < RECORD.size:
                raise self.refuse(f"it ends before memory {i} (truncated?)")
            self.f.seek(end)
            record = self.f.read(RECORD.size)
            if len(record) != RECORD.size:
                raise self.refuse(f"read {end + len(record)} of {self.size} bytes (changed "
                                  f"while read)")
            slots, rows = RECORD.unpack(record)[3::2]
            end += RECORD.size + self._check_record(config, i, slots, rows, left - RECORD.size)
            found.append((slots, rows))
        self.f.seek(start)
        return found

    def _array(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        array = np.empty(shape, dtype)
        view = memoryview(array).cast("B")
        got = 0
        while got < view.nbytes:
            n = self.f.readinto(view[got:])
            if not n:
                raise self.refuse(f"read {self.offset + got} of {self.size} bytes (changed "
                                  f"while read)")
            got += n
        self.digest.update(view)
        self.offset += got
        return array

    def _left(self) -> int:
        """Bytes from here to the checksum."""
        return self.size - _DIGEST_BYTES - self.offset

    def _exactly(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise self.refuse(f"read {self.offset + len(data)} of {self.size} bytes (changed "
                              f"while read)")
        self.offset += n
        return data

    def _take(self, n: int) -> bytes:
        data = self._exactly(n)
        self.digest.update(data)
        return data

    def _legacy(self, preamble: bytes, version: int) -> dict:
        """A format 1 or 2 file, read whole and checked as those versions were."""
        if self.key is not None:
            raise self.refuse(
                f"format version {version} carries no MAC, and this server "
                f"(--snapshot-key-file) accepts only snapshots MACed with its key; restore it "
                f"on a server without a key and snapshot it again on this one")
        if self.admit is not None:
            admitted = self._admit_legacy(preamble, version)
        buffer = bytearray(self.size)
        buffer[:len(preamble)] = preamble
        view = memoryview(buffer)
        got = len(preamble)
        while got < self.size:
            n = self.f.readinto(view[got:])
            if not n:
                raise self.refuse(f"read {got} of {self.size} bytes (changed while read)")
            got += n
        state = _parse_legacy(self.path, view, self.namespace, self.tag, version)
        if self.admit is not None and admitted != [m["keys"].shape[0] for m in state["memories"]]:
            raise self.refuse("its memories are not those its header said (changed while read)")
        return state

    def _admit_legacy(self, preamble: bytes, version: int) -> list[int] | None:
        """Admit what a format 1 or 2 header describes before the file is read whole; a header
        that does not parse is left to ``_parse_legacy`` to refuse (None)."""
        header_size = _PREAMBLE.unpack(preamble)[2]
        if header_size > min(_MAX_HEADER_BYTES, self.size - len(preamble)):
            return None
        try:
            config, entries = _legacy_header(msgpack.unpackb(
                self.f.read(header_size), raw=False, strict_map_key=True, max_ext_len=0), version)
        except Exception:  # refused by _parse_legacy, which says why
            return None
        finally:
            self.f.seek(len(preamble))
        slots = [entry[3] for entry in entries]
        if min(slots, default=0) < 0:
            return None
        self.admit(config, slots)
        return slots


def _parse_legacy(path: Path, data: memoryview, namespace: str, tag: str, version: int) -> dict:
    def refuse(what: str) -> SnapshotError:
        return SnapshotError(f"snapshot {path} is refused: {what}; nothing was loaded")

    header_size = _PREAMBLE.unpack_from(data)[2]
    body, stored = data[:-_DIGEST_BYTES], bytes(data[-_DIGEST_BYTES:])
    if hashlib.blake2b(body, digest_size=_DIGEST_BYTES).digest() != stored:
        raise refuse("its checksum does not match its contents (corrupt or truncated)")
    if header_size > min(_MAX_HEADER_BYTES, body.nbytes - _PREAMBLE.size):
        raise refuse(f"header size {header_size} does not fit in the file")
    try:
        header = msgpack.unpackb(data[_PREAMBLE.size:_PREAMBLE.size + header_size], raw=False,
                                 strict_map_key=True, max_ext_len=0)
        config, entries = _legacy_header(header, version)
    except Exception as exc:  # msgpack errors, a missing key, a malformed entry, a bad config
        raise refuse(f"malformed header: {type(exc).__name__}: {exc}") from None
    if (header.get("namespace"), header.get("tag")) != (namespace, tag):
        raise refuse(f"it holds namespace {header.get('namespace')!r} tag {header.get('tag')!r}, "
                     f"not {namespace!r} {tag!r} as its name says (renamed?)")
    key_dtype, value_dtype = _dtypes(config)
    offset = _PREAMBLE.size + header_size
    offset += -offset % ALIGN
    need = offset + sum(_arrays_bytes(config, slots, rows) for _, _, _, slots, _, rows in entries)
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
            memory["centroids"] = np.frombuffer(body, "<f4", rows * config.dim,
                                                offset).reshape(rows, config.dim)
            memory["trained_at"] = trained_at
            offset += memory["centroids"].nbytes
    return {"config": config.to_dict(), "memories": memories}


def _dtypes(config: NamespaceConfig) -> tuple[np.dtype, np.dtype]:
    """The little-endian dtypes of a memory's keys and values in a file of ``config``."""
    return (np.dtype(KEY_DTYPES[config.key_dtype]).newbyteorder("<"),
            np.dtype(VALUE_DTYPES[config.value_dtype]).newbyteorder("<"))


def _legacy_header(header: dict, version: int) -> tuple[NamespaceConfig, list[tuple]]:
    """The config and memory entries (layer, row, total, slots, trained_at, centroid rows) of a
    decoded format 1 or 2 header; raises on anything malformed."""
    config = NamespaceConfig.from_dict(header["config"])
    fields = 4 if version == 1 else 6
    if any(len(entry) != fields for entry in header["memories"]):
        raise ValueError(f"every memory entry of a version {version} file has {fields} fields")
    entries = [tuple(int(x) for x in entry) + ((0, 0) if version == 1 else ())
               for entry in header["memories"]]
    return config, entries


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
