"""Snapshot files written byte by byte, to restore what no server would write (a config it
refuses, say): the same layout and checksum as ``memory_server.snapshot``, no validation."""

from __future__ import annotations

import hashlib
import struct
import time

import msgpack
import numpy as np

from memory_server.snapshot import ALIGN, FORMAT_VERSION, MAGIC, snapshot_path


def forge_snapshot(data_dir, namespace: str, tag: str, config, memories=(),
                   version: int = FORMAT_VERSION) -> None:
    """Write ``config`` (any map) and ``memories`` (``(layer, row, total, keys, values)``, numpy)
    as the snapshot ``namespace@tag`` in format ``version``, checksummed as a real one."""
    header = msgpack.packb({
        "namespace": namespace, "tag": tag, "created": time.time(), "config": config,
        "memories": [[layer, row, total, keys.shape[0], *([0, 0] if version > 1 else [])]
                     for layer, row, total, keys, _ in memories],  # no ivf centroids
    }, use_bin_type=True)
    data = struct.pack("<8sII", MAGIC, version, len(header)) + header
    data += bytes(-len(data) % ALIGN)
    data += b"".join(np.ascontiguousarray(m[3]).tobytes() for m in memories)
    data += b"".join(np.ascontiguousarray(m[4]).tobytes() for m in memories)
    data += hashlib.blake2b(data, digest_size=32).digest()
    path = snapshot_path(data_dir, namespace, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
