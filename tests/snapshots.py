"""Snapshot files written byte by byte, to restore what no server would write (a config it
refuses, say): the same layout and checksum as ``memory_server.snapshot``, no validation."""

from __future__ import annotations

import hashlib
import struct
import time

import msgpack
import numpy as np

from memory_server.snapshot import (ALIGN, FORMAT_VERSION, MAC_KEYED, MAC_PLAIN, MAGIC, RECORD,
                                    SnapshotKey, snapshot_path)


def forge_snapshot(data_dir, namespace: str, tag: str, config, memories=(),
                   version: int = FORMAT_VERSION, key: SnapshotKey | None = None) -> None:
    """Write ``config`` (any map) and ``memories`` (``(layer, row, total, keys, values)``, numpy)
    as the snapshot ``namespace@tag`` in format ``version``, checksummed as a real one (MACed
    with ``key``, format 3 only)."""
    if version >= 3:
        header = {"memories": len(memories), "mac": MAC_KEYED if key else MAC_PLAIN,
                  "key_id": key.id if key else None}
    else:
        header = {"memories": [[layer, row, total, keys.shape[0],
                                *([0, 0] if version > 1 else [])]  # no ivf centroids
                               for layer, row, total, keys, _ in memories]}
    header = msgpack.packb({"namespace": namespace, "tag": tag, "created": time.time(),
                            "config": config, **header}, use_bin_type=True)
    data = struct.pack("<8sII", MAGIC, version, len(header)) + header
    data += bytes(-len(data) % ALIGN)
    if version >= 3:
        data += b"".join(RECORD.pack(layer, row, total, keys.shape[0], 0, 0)
                         + np.ascontiguousarray(keys).tobytes()
                         + np.ascontiguousarray(values).tobytes()
                         for layer, row, total, keys, values in memories)
    else:
        data += b"".join(np.ascontiguousarray(m[3]).tobytes() for m in memories)
        data += b"".join(np.ascontiguousarray(m[4]).tobytes() for m in memories)
    data += hashlib.blake2b(data, digest_size=32, key=key.secret if key else b"").digest()
    path = snapshot_path(data_dir, namespace, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
