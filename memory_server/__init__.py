"""memory_server: the kNN memory of memtrans as a torch-free library and a ZeroMQ daemon."""

from .errors import (ConfigMismatch, InvalidRequest, LimitExceeded, MemoryServerError,
                     QuotaExceeded, ServerRestarted, ServerUnavailable, SnapshotError, Unauthorized,
                     UnknownNamespace)
from .client import MemoryClient
from .store import MemoryStore, NamespaceConfig, Retrieval

__all__ = [
    "ConfigMismatch", "InvalidRequest", "LimitExceeded", "MemoryClient", "MemoryServerError",
    "MemoryStore",
    "NamespaceConfig", "QuotaExceeded", "Retrieval", "ServerRestarted", "ServerUnavailable", "SnapshotError",
    "Unauthorized", "UnknownNamespace",
]
